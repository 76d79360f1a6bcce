"""A run's tool calls.

The runner (approvals, limits, results), the run's journal, and the port to the
integration hub.
"""
