"""Tests of context/messages/."""
