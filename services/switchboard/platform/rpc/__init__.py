"""The rpc wing: how a process serves and calls gRPC.

The server and its one interceptor, registration from descriptors, reflection,
errors to ``google.rpc.Status`` and back, channels to experts, the client's
address, and calls to peer services in the caller's name.
"""
