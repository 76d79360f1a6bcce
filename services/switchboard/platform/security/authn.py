"""The per-call guard: credential -> principal, then the RPC's access rule.

The error interceptor builds each method's wrapped handler once and calls the
checker built here on every call, before the servicer. Credentials are read
only from the ``authorization`` metadata (``Bearer <access JWT>`` or
``Bearer sbk_...`` for API keys): never from request bodies or query strings,
which end up in logs.
"""

from __future__ import annotations

import contextvars
from collections.abc import Awaitable, Callable
from typing import Any, Final, Protocol

from switchboard.platform.errors import PermissionDenied, Unauthenticated
from switchboard.platform.security.access import rule_for
from switchboard.platform.security.policy import (
    REQUIRED,
    Permission,
    Policy,
    Principal,
    Role,
    Scope,
)

AUTHORIZATION_KEY = "authorization"
_BEARER = "bearer "

principal_var: contextvars.ContextVar[Principal | None] = contextvars.ContextVar(
    "switchboard_principal", default=None
)

Checker = Callable[[Any, Any], Awaitable[None]]


class Authenticator(Protocol):
    async def authenticate(self, credential: str) -> Principal:
        """The principal behind a bearer credential, or Unauthenticated."""
        ...


# The caller's role in the workspace the RPC's resource belongs to (None for
# user-owned resources), as the guard found it: servicers need not ask again.
role_var: contextvars.ContextVar[Role | None] = contextvars.ContextVar(
    "switchboard_role", default=None
)


EMPTY: Final = (
    "the bearer credential is empty ('authorization: Bearer' with nothing after it): put "
    "the access token or API key after 'Bearer '; a token kept in a variable that was "
    "never set looks like this"
)
NOT_BEARER: Final = (
    "the authorization header must be 'Bearer <access token or API key>'; no other "
    "scheme is accepted"
)
SEVERAL: Final = (
    "the call carries more than one authorization header; send exactly one "
    "('Bearer <access token or API key>')"
)


def current_principal() -> Principal:
    """The caller of the RPC being served; Unauthenticated for anonymous calls."""
    principal = principal_var.get()
    if principal is None:
        raise Unauthenticated(REQUIRED)
    return principal


def bearer_credential(metadata: Any) -> str | None:
    """The bearer credential in ``authorization`` metadata; None if absent.

    Several authorization entries, or another scheme, are refused rather than
    guessed at. ``Bearer`` with nothing after it is an empty credential, not
    another scheme: gRPC drops a value's trailing space, so ``Bearer `` (a shell
    variable that was never set) arrives as ``Bearer``.
    """
    found: str | None = None
    for key, value in metadata or ():
        if key != AUTHORIZATION_KEY:
            continue
        if found is not None or not isinstance(value, str):
            raise Unauthenticated(SEVERAL if found is not None else NOT_BEARER)
        stripped = value.strip()
        if stripped.lower() == _BEARER.strip():
            raise Unauthenticated(EMPTY)
        if stripped[: len(_BEARER)].lower() != _BEARER:
            raise Unauthenticated(NOT_BEARER)
        found = stripped[len(_BEARER) :].strip()
        if not found:
            raise Unauthenticated(EMPTY)
    return found


def _field(request: Any, path: str) -> str:
    value = request
    for part in path.split("."):
        value = getattr(value, part)
    return str(value)


class Guard:
    """Builds one checker per method from its rule."""

    def __init__(self, authenticator: Authenticator, policy: Policy) -> None:
        self._authenticator = authenticator
        self._policy = policy

    async def _principal(self, context: Any) -> Principal:
        credential = bearer_credential(context.invocation_metadata())
        if credential is None:
            raise Unauthenticated(REQUIRED)
        return await self._authenticator.authenticate(credential)

    def checker(self, method: str) -> Checker | None:
        """The per-call check of ``method``; None when there is nothing to check."""
        rule = rule_for(method)
        if rule is None:
            return _undeclared
        if rule.public:
            return None
        if rule.resource_field and rule.permission is not None:
            return self._resource_checker(
                rule.resource_field, rule.permission, include_deleted=rule.include_deleted
            )
        if rule.scope is not None:
            return self._scope_checker(rule.scope)
        return _undeclared

    def _scope_checker(self, scope: Scope) -> Checker:
        async def check(request: Any, context: Any) -> None:
            principal = await self._principal(context)
            principal.require_scope(scope)
            principal_var.set(principal)

        return check

    def _resource_checker(
        self, field: str, permission: Permission, *, include_deleted: bool
    ) -> Checker:
        policy = self._policy

        async def check(request: Any, context: Any) -> None:
            principal = await self._principal(context)
            principal_var.set(principal)
            role = await policy.authorize(
                principal,
                _field(request, field),
                permission,
                field,
                include_deleted=include_deleted,
            )
            role_var.set(role)

        return check


async def _undeclared(request: Any, context: Any) -> None:
    # access.RULES must name every method; a test enforces it. Refusing here
    # means a forgotten declaration fails closed rather than open.
    raise PermissionDenied("this method has no access rule")
