"""What a process opens once, whatever it serves, and what its services share in-process.

Every process authenticates and authorizes its callers, so every process opens
the database, the cache, the event bus and the key ring (``mesh.open_shared``).
Each service package then builds only itself from these (``<service>/build.py``:
``async def build(shared) -> ServiceRegistration``); a process builds only the
services it serves. A build reads the kernel's settings (``settings``) and its
own section (``section(DispatcherSettings)``, say), and a section it shares with
another service (docs/decisions.md, entry 48); never another service's.

Some parts are used by more than one service in one process: the integration
hub by the integration service and by the dispatcher's tool calls, the context
domain by the context service and by an in-process dispatcher. ``part`` builds
such a part the first time a service asks for it and hands the same one to the
next, so an auth-only process never builds either. The accounts and the
dispatcher are built the same way though one service uses each: ``built``
hands every part a process has built to tests and tools.

``SHARED_PARTS`` names the modules of one service that another imports to
build or run such a part; no other import crosses between services (the
layers contract in pyproject.toml allows exactly these, and
``tests/repo/test_import_layers.py`` holds its list to this one).

One part goes the other way: the integration service's webhook engine
delivers the A2A front door's push notifications, and a service may not
import the front door, so the engine knows them only as ``PushNotifications``
and the composition root hands it the front door's (``a2a/push/``).
"""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Final, Protocol, TypeVar, cast

from switchboard.api.events.v1 import events_pb2
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

#: Module -> what another service uses it for, in-process.
SHARED_PARTS: Final[dict[str, str]] = {
    "switchboard.context.build": "the context domain, for a dispatcher in the same process",
    "switchboard.context.text.tokencount": "the token counter: a prompt counts as its window did",
    "switchboard.context.text.parttext": "a message's parts as text: a prompt reads as "
    "it was counted",
    "switchboard.integration.build": "the integration hub, for the dispatcher's tool calls",
    "switchboard.integration.service": "the integration hub's type",
    "switchboard.integration.directory": "a workspace's experts as stored, for routing runs",
    "switchboard.integration.kinds.a2a": "the A2A agent client: a run on a remote agent",
    "switchboard.integration.connect.connectors": "the errors the A2A agent client raises",
    "switchboard.context.semantic.retrieval.filters": "the search filter's grammar: an assistant's "
    "retrieval filter is refused when saved, in SearchContext's words",
    "switchboard.dispatcher.budgets.ledger": "the budget ledger, which embedding calls "
    "(context service) reserve and settle in like model calls",
    "switchboard.dispatcher.budgets.embeddings": "the ledger's adapter for the context "
    "service's embeddings (its Charger)",
}


class PushNotifications(Protocol):
    """A2A push configs as the integration service's webhook engine delivers them.

    The feature is the A2A front door's (``a2a/push/``: what a config is, what
    is sent for it, how long it lives); the engine only sends, as it sends a
    webhook's events. A service may not import the front door, so the
    composition root hands the engine the front door's (``mesh.open_shared``).
    """

    def body(self, event: events_pb2.Event) -> str:
        """The JSON body for a ``RUN_UPDATED`` status change of the config's task."""
        ...

    def headers(
        self,
        workspace_id: str,
        endpoint_id: str,
        token: bytes | None,
        auth_scheme: str,
        credentials: bytes | None,
    ) -> tuple[dict[str, str], str]:
        """The config's own headers and its signing secret ("" when it signs nothing),
        from its sealed ``token`` and ``credentials``; raises if they cannot be opened."""
        ...

    async def disable(self, workspace_id: str, endpoint_id: str) -> None:
        """Stop delivering to a config that kept failing."""
        ...

    async def prune(self, current: dt.datetime) -> int:
        """Delete a batch of configs (and their deliveries) past their lifetime; how many."""
        ...


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
    #: A2A push configs, for the webhook engine, which delivers them (``a2a/push/``);
    #: None: push configs are not delivered.
    push: PushNotifications | None = None
    _parts: dict[type, object] = field(default_factory=dict, repr=False)

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


@contextlib.contextmanager
def setting(variable: str) -> Iterator[None]:
    """Turn a parser's ValueError/TypeError into a ConfigError that names ``variable``.

    The parsers' messages never quote the value (some settings hold keys).
    """
    try:
        yield
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{variable}: {exc}") from None
