"""Tests of platform/events/."""
