"""Tests of context/windows/."""
