"""Semantic memory: embeddings of memory items, messages and document text, indexed
from the event log in the background, and searched by meaning beside full-text
(docs/semantic.md)."""
