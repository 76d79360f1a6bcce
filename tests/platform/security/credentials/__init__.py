"""Tests of platform/security/credentials/."""
