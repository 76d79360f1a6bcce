"""Memory that forms itself: finished exchanges turned into facts with time (docs/memory.md)."""
