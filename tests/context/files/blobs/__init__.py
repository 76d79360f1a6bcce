"""Tests of context/files/blobs/."""
