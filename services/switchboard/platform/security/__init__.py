"""The security wing: who calls, and what they may do.

The credential kernel every process needs (access tokens and the key ring,
opaque secrets, the authenticator), the access table and the guard that checks
it on every call, the policy and memberships it reads, the access watch that
keeps open streams current, the secret box, and the egress (SSRF) check.
"""
