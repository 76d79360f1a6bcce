"""Erasing a deleted account's data (docs/privacy.md): the erasures and their parts
(``store``), each service's worker (``worker``), and the log's redaction (``redaction``)."""
