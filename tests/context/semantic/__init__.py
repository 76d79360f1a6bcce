"""Tests of context/semantic/."""
