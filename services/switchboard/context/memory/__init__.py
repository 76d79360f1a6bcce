"""Memory items and their search: validation, limits, events, and their persistence."""
