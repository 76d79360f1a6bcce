"""Tests of kits/."""
