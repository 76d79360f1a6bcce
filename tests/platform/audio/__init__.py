"""Tests of platform/audio/."""
