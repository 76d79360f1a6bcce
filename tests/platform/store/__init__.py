"""Tests of platform/store/."""
