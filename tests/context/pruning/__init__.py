"""Tests of context/pruning/."""
