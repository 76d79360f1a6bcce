"""Tests of integration/kinds/."""
