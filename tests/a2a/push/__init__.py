"""Tests of a2a/push/."""
