"""Tests of platform/values/."""
