"""Tests of dispatcher/llm/."""
