"""Tests of platform/rpc/."""
