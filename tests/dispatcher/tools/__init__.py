"""Tests of dispatcher/tools/."""
