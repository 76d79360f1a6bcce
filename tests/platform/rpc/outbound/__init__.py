"""Tests of platform/rpc/outbound/."""
