"""Tests of dispatcher/runs/intake/."""
