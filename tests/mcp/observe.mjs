// Preloaded into server-everything by tests/infra/mcpeverything.py (node
// --import): writes every tools/call request and every notifications/cancelled
// the server's protocol layer receives to stderr, so a test can see that a call
// reached the server and that the server saw its cancellation.
import { Protocol } from "@modelcontextprotocol/sdk/shared/protocol.js";

const originalCancel = Protocol.prototype._oncancel;
Protocol.prototype._oncancel = function (notification) {
  console.error(`observed cancel ${JSON.stringify(notification.params)}`);
  return originalCancel.call(this, notification);
};

const originalRequest = Protocol.prototype._onrequest;
Protocol.prototype._onrequest = function (request, extra) {
  if (request.method === "tools/call") {
    console.error(`observed call ${request.params?.name} ${JSON.stringify(request.id)}`);
  }
  return originalRequest.call(this, request, extra);
};
