"""How the client speaks gRPC: retries with backoff, interceptors, the methods'
idempotency, and stream policies."""
