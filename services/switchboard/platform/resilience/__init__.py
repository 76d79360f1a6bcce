"""Staying up: backoff, circuit breakers and the calls in flight (background work whose
failures are heard is the kernel's ``platform/background.py``)."""
