"""What a process opens once, whatever it serves, and how its services meet in it.

Every process authenticates and authorizes its callers, so every process opens
the database, the cache, the event bus and the key ring (``mesh.open_shared``):
one ``Shared``. Each service package then builds only itself from it
(``<service>/build.py``: ``async def build(shared) -> ServiceRegistration``); a
process builds only the services it serves. A build reads the kernel's settings
(``settings``) and its own section (``section(DispatcherSettings)``, say), and a
section it shares with another service (docs/decisions.md, entry 48); never
another service's.

Some parts are used by more than one service in one process: the integration
hub by the integration service and by the dispatcher's tool calls, the context
domain by the context service and by an in-process dispatcher. ``part`` builds
such a part the first time a service asks for it and hands the same one to the
next, so an auth-only process never builds either. ``built`` hands every part a
process has built to tests and tools.

A service that needs another's part declares what it needs as a ``Port`` in its
own package, typed by what it uses of it; it may not import the other service.
The composition root (``mesh.py``), which may import both, plugs the part in
(``plug``) before any service builds, and the build takes it (``plugged``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar, cast

from switchboard.platform.cache import Cache
from switchboard.platform.config import ConfigError, KernelSettings, Section, Sections
from switchboard.platform.events.bus import EventBus
from switchboard.platform.observe.metrics import Metrics
from switchboard.platform.security.accesswatch import AccessWatch
from switchboard.platform.security.authenticator import CredentialAuthenticator
from switchboard.platform.security.credentials.accesstokens import AccessTokens, KeyRing
from switchboard.platform.security.credentials.opaque import OpaqueSecrets
from switchboard.platform.security.credentials.secretbox import SecretBox
from switchboard.platform.security.membership import MembershipStore
from switchboard.platform.security.policy import Policy
from switchboard.platform.store.db import Database
from switchboard.platform.store.pagination import PageTokens

_T = TypeVar("_T")
_S = TypeVar("_S", bound=Section)


@dataclass(frozen=True, eq=False)
class Port(Generic[_T]):
    """What one service needs of another's, in the words of the one that needs it.

    Declared once, in the package that takes it (``dispatcher.build.NEIGHBOURS``,
    say); compared by identity, so two ports never meet by name.
    """

    #: What it is, for the error when the composition root plugged nothing in.
    what: str


@dataclass
class Shared:
    """The process's shared resources; each closes with ``resources``."""

    #: The kernel's settings: what every process reads.
    settings: KernelSettings
    #: Every section of the process's settings; a service asks for its own (``section``).
    sections: Sections
    #: Everything opened for this process closes with it, in reverse order.
    resources: contextlib.AsyncExitStack
    database: Database
    cache: Cache
    bus: EventBus
    keys: KeyRing
    tokens: AccessTokens
    secrets: OpaqueSecrets
    #: Credentials at rest (integrations', push configs'), sealed under the server secret:
    #: one box per process, its key derived once.
    secret_box: SecretBox
    authenticator: CredentialAuthenticator
    memberships: MembershipStore
    policy: Policy
    #: Keeps every open stream's access current (platform/security/accesswatch.py).
    access: AccessWatch
    page_tokens: PageTokens
    #: This replica's id: owns its runs and its webhook deliveries (``mesh.instance_id``).
    instance_id: str
    #: The process's metrics; None when SWITCHBOARD_METRICS_PORT is unset (nothing recorded).
    metrics: Metrics | None = None
    _parts: dict[type, object] = field(default_factory=dict, repr=False)
    _plugged: dict[Port[Any], object] = field(default_factory=dict, repr=False)

    def section(self, kind: type[_S]) -> _S:
        """The settings section ``kind`` (``DispatcherSettings``...)."""
        return self.sections.section(kind)

    async def part(self, kind: type[_T], make: Callable[[], Awaitable[_T]]) -> _T:
        """The process's one ``kind``, built by ``make`` the first time it is asked for."""
        if kind not in self._parts:
            self._parts[kind] = await make()
        return cast(_T, self._parts[kind])

    def built(self, kind: type[_T]) -> _T | None:
        """The process's ``kind`` if a service has built it, else None."""
        found = self._parts.get(kind)
        return cast(_T, found) if found is not None else None

    def plug(self, port: Port[_T], part: _T) -> None:
        """Hand ``part`` to the service that declared ``port`` (the composition root's)."""
        self._plugged[port] = part

    def plugged(self, port: Port[_T]) -> _T:
        """What the composition root plugged into ``port``."""
        if port not in self._plugged:
            raise LookupError(f"nothing is plugged into {port.what} (mesh.connect)")
        return cast(_T, self._plugged[port])


@contextlib.contextmanager
def setting(variable: str) -> Iterator[None]:
    """Turn a parser's ValueError/TypeError into a ConfigError that names ``variable``.

    The parsers' messages never quote the value (some settings hold keys).
    """
    try:
        yield
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{variable}: {exc}") from None
