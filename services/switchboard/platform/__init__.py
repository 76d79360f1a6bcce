"""Shared server plumbing: settings, errors, logging, server assembly."""
