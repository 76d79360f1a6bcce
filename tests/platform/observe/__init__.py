"""Tests of platform/observe/."""
