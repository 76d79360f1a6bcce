"""Tests of dispatcher/runs/steering/."""
