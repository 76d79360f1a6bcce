"""Tests of client/transport/."""
