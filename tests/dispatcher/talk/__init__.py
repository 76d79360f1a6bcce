"""Tests of dispatcher/talk/."""
