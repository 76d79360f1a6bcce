"""Tests of repo/."""
