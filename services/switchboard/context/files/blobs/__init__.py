"""The blob store: content-addressed bytes behind one port, on a directory or S3."""
