"""Staying up: backoff, circuit breakers, background work whose failures are heard, and
the calls in flight."""
