"""Messages: validation, limits, files as attachments, entity memory, events, and their
persistence."""
