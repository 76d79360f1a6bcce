"""Tests of context/workspaces/."""
