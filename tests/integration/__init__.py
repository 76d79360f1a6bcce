"""Tests of integration/."""
