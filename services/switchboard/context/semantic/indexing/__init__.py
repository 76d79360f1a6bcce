"""Indexing in the background: the event log cut into chunks, embedded and stored, with
each workspace's index settings and progress."""
