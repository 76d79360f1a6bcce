"""Tests of deploy/edge/."""
