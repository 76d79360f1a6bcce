"""Tests of dispatcher/."""
