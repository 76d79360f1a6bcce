"""The credential kernel: signed access tokens and their keys, opaque refresh tokens
and API keys, secrets sealed at rest, and the rows a credential check reads."""
