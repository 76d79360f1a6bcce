"""Tests of integration/ports/."""
