"""What a run can be routed to.

The handler contract, the built-in echo, the router, remote gRPC experts and A2A agents.
"""
