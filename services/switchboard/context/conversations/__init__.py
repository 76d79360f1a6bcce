"""Conversations: validation, limits, events, and their persistence."""
