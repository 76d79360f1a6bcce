"""Tests of dispatcher/handlers/."""
