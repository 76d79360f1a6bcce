"""Tests of dispatcher/runs/."""
