"""The AuthService: identity, sessions, tokens and API keys."""
