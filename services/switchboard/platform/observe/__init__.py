"""The observe wing: logs, traces and metrics, and the one reader of ``OTEL_*``."""
