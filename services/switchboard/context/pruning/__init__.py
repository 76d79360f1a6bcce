"""Pruning: archiving a conversation's oldest messages under a summary, purging, and
its persistence."""
