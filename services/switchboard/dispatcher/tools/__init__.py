"""A run's tool calls.

The runner (approvals, limits, results) and the port to the integration hub.
"""
