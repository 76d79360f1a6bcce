"""Tests of dispatcher/ports/."""
