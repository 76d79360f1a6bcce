// Preloaded into server-everything by tests/service/test_mcp_connector.py
// (node --import): writes every notifications/cancelled the server's protocol
// layer receives to stderr, so a test can see the server saw the cancellation.
import { Protocol } from "@modelcontextprotocol/sdk/shared/protocol.js";

const original = Protocol.prototype._oncancel;
Protocol.prototype._oncancel = function (notification) {
  console.error(`observed cancel ${JSON.stringify(notification.params)}`);
  return original.call(this, notification);
};
