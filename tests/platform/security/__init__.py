"""Tests of platform/security/."""
