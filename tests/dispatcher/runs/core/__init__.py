"""Tests of dispatcher/runs/core/."""
