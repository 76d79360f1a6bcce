"""Tests of dispatcher/assistants/."""
