"""The auth service as a process builds it: accounts, the password hasher, OIDC sign-in.

Verifying tokens is not here: every process does that with the shared
authenticator (``mesh.open_shared``). This is what only AuthService needs.
"""

from __future__ import annotations

from collections.abc import Callable

from switchboard.auth import servicer
from switchboard.auth.accounts import AccountLimits, Accounts, LoginLimits
from switchboard.auth.oidc import OidcVerifier
from switchboard.auth.passwords import PasswordHasher
from switchboard.auth.settings import AuthSettings
from switchboard.auth.store import AuthStore
from switchboard.platform.config import ConfigError
from switchboard.platform.process import Shared
from switchboard.platform.rpc.clientaddr import TrustedProxies
from switchboard.platform.rpc.server import ServiceRegistration


def checks(settings: AuthSettings) -> tuple[tuple[str, Callable[[], object]], ...]:
    """The auth settings to parse before anything opens (``mesh.check_settings``)."""
    # Names its variable and each bad entry.
    return (
        ("SWITCHBOARD_TRUSTED_PROXIES", lambda: TrustedProxies.parse(settings.trusted_proxies)),
    )


def oidc_verifier(settings: AuthSettings) -> OidcVerifier | None:
    """The configured identity provider's verifier, or None when sign-in with one is off."""
    if not settings.oidc_issuer:
        return None
    try:
        return OidcVerifier.from_jwks_file(
            settings.oidc_issuer, settings.oidc_audience, settings.oidc_jwks_file
        )
    except ValueError as exc:
        raise ConfigError(f"SWITCHBOARD_OIDC_JWKS_FILE: {exc}") from None


async def accounts(shared: Shared) -> Accounts:
    """The process's accounts domain."""

    async def make() -> Accounts:
        settings = shared.section(AuthSettings)
        oidc = oidc_verifier(settings)
        hasher = PasswordHasher(
            threads=settings.password_hash_threads,
            max_pending=settings.password_hash_max_pending,
        )
        shared.resources.callback(hasher.close)
        return Accounts(
            store=AuthStore(shared.database),
            hasher=hasher,
            tokens=shared.tokens,
            secrets=shared.secrets,
            authenticator=shared.authenticator,
            cache=shared.cache,
            bus=shared.bus,
            oidc=oidc,
            login_limits=LoginLimits(
                window_s=settings.login_window_s,
                max_failures_per_account=settings.login_max_failures_per_account,
                max_attempts_per_address=settings.login_max_attempts_per_address,
                max_failures_per_account_address=settings.login_max_failures_per_account_address,
            ),
            limits=AccountLimits(
                refresh_ttl_s=settings.refresh_token_ttl_s,
                max_sessions_per_user=settings.max_sessions_per_user,
                max_api_keys_per_user=settings.max_api_keys_per_user,
            ),
            page_tokens=shared.page_tokens,
        )

    return await shared.part(Accounts, make)


async def build(shared: Shared) -> ServiceRegistration:
    proxies = TrustedProxies.parse(shared.section(AuthSettings).trusted_proxies)
    return ServiceRegistration(
        servicer.SERVICE, servicer.AuthServiceServicer(await accounts(shared), proxies)
    )
