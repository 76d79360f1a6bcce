"""A run's tool calls.

The runner (offered tools, limits, each step's calls), the approvals its calls
wait for, the calls it sends to the integration hub, the messages its steps are
stored as, the run's journal, and the port to the integration hub.
"""
