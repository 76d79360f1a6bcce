"""Tests of dispatcher/schedules/."""
