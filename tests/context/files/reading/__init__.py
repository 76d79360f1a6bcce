"""Tests of context/files/reading/."""
