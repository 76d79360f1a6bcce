"""Tests of a2a/."""
