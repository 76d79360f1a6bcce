"""Tests of context/semantic/indexing/."""
