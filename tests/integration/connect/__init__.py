"""Tests of integration/connect/."""
