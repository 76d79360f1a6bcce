"""Tests of a2a/card/."""
