"""One client per kind of integration: gRPC domain experts, A2A agents, MCP servers and
webhook tools, each behind ``ports.connectors.Connector``."""
