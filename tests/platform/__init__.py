"""Tests of platform/."""
