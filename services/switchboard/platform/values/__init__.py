"""Plain values read from and written for clients: names and ids, field masks, bounded
JSON, Struct values, timestamps, idempotency keys, counts in words."""
