"""Tests of integration/tools/."""
