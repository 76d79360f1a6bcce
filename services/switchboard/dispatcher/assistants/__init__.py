"""Assistants: a workspace's configured ways of answering (instructions, model, tools)."""
