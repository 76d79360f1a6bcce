"""Tests of platform/resilience/."""
