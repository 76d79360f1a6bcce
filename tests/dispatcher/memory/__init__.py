"""Tests of dispatcher/memory/."""
