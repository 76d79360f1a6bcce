"""Files: a workspace's stored content (metadata in the database, bytes in a blob store)."""
