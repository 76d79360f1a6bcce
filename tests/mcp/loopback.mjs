// Preload for server-everything (node --import ./loopback.mjs): it calls
// app.listen(PORT) with no host, which listens on every interface, and one of
// its tools (get-env) answers with the server's whole environment. A listen()
// given a port and no host binds 127.0.0.1 instead.
import net from "node:net";

const listen = net.Server.prototype.listen;
net.Server.prototype.listen = function (...args) {
  const port = args[0];
  const portOnly = typeof port === "number" || (typeof port === "string" && /^\d+$/.test(port));
  if (portOnly && (args.length === 1 || typeof args[1] === "function")) {
    args.splice(1, 0, "127.0.0.1");
  }
  return listen.apply(this, args);
};
