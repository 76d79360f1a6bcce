"""Tests of context/text/."""
