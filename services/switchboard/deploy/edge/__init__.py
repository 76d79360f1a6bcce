"""The edge: Envoy's configuration from typed messages, its health endpoint, the dev
certificate, and which contracts it routes."""
