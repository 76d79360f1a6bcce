"""Tests of context/files/."""
