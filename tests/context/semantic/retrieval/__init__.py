"""Tests of context/semantic/retrieval/."""
