"""Tests of dispatcher/runs/reading/."""
