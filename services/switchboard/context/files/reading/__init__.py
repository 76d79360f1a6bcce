"""A file's content read: its media type, document text (PDFs in child processes), and
audio transcribed."""
