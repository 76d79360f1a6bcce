"""Tests of dispatcher/voice/."""
