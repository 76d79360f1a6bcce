"""The auth service's section: sessions, API keys, password hashing, OIDC, sign-in limits.

Verifying tokens is every process's, so the signing keys, the issuer, the
audience and the access tokens' lifetime are the kernel's (``platform/config.py``).
"""

from __future__ import annotations

from pydantic import Field, model_validator

from switchboard.platform.config import CommaSeparated, Section


class AuthSettings(Section):
    """What only AuthService reads (``auth/build.py``)."""

    refresh_token_ttl_s: int = Field(
        default=30 * 86_400,
        ge=300,
        le=365 * 86_400,
        description="session (refresh token family) lifetime, 30 days",
    )
    max_sessions_per_user: int = Field(
        default=100,
        ge=1,
        le=10_000,
        description="live sessions per user; a new login revokes the least recently used beyond it",
    )
    max_api_keys_per_user: int = Field(
        default=50,
        ge=1,
        le=10_000,
        description="live API keys per user; more gets `RESOURCE_EXHAUSTED`",
    )
    password_hash_threads: int = Field(
        default=2,
        ge=1,
        le=64,
        description="threads for argon2id (never on the event loop)",
    )
    password_hash_max_pending: int = Field(
        default=64,
        ge=1,
        le=10_000,
        description="password hashes queued or running; beyond it `RESOURCE_EXHAUSTED`",
    )
    # Federated login (all three or none).
    oidc_issuer: str = Field(
        default="",
        description="accepted external ID-token issuer (exact `iss`), e.g. "
        "`https://login.microsoftonline.com/<tenant>/v2.0`",
    )
    oidc_audience: str = Field(
        default="",
        description="our client id at that issuer (`aud`)",
    )
    oidc_jwks_file: str = Field(
        default="",
        description="the issuer's JWKS as a JSON file (public keys only; a file with private "
        "key material is refused)",
    )
    # Abuse limits on Login (fixed windows). A failed password counts for its
    # account from that address and for the account as a whole; the owner's
    # correct password from an address that is not throttled still signs in.
    login_window_s: int = Field(
        default=900,
        ge=1,
        le=86_400,
        description="window of the login rate limits",
    )
    login_max_failures_per_account_address: int = Field(
        default=10,
        ge=1,
        le=100_000,
        description="failed logins to one account from one client address (IPv6: its /64) per "
        "window; then only that address is refused for that account "
        "(`RESOURCE_EXHAUSTED` with `RetryInfo`), and the owner elsewhere still "
        "signs in",
    )
    login_max_failures_per_account: int = Field(
        default=100,
        ge=1,
        le=1_000_000,
        description="failed logins to one account from all addresses together per window, "
        "then `RESOURCE_EXHAUSTED` with `RetryInfo`",
    )
    login_max_attempts_per_address: int = Field(
        default=100,
        ge=1,
        le=1_000_000,
        description="logins and registrations per client address per window",
    )
    trusted_proxies: CommaSeparated = Field(
        default=(),
        description="comma-separated networks of proxies (Envoy) trusted to name the client "
        "in `x-forwarded-for`; sign-in limits and session addresses then use the "
        "client's address. From any other peer the header is ignored",
    )

    @model_validator(mode="after")
    def _check_oidc(self) -> AuthSettings:
        oidc = (self.oidc_issuer, self.oidc_audience, self.oidc_jwks_file)
        if any(oidc) and not all(oidc):
            raise ValueError(
                "SWITCHBOARD_OIDC_ISSUER, SWITCHBOARD_OIDC_AUDIENCE and "
                "SWITCHBOARD_OIDC_JWKS_FILE must be set together"
            )
        return self
