"""Workspaces and their members: validation, limits, events, and their persistence."""
