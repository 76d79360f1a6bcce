"""A workspace's own domain experts: integrations the router can pick, added with no restart.

An expert a workspace owner registers through the integration hub is a
``RemoteHandler`` (kind INTEGRATION_KIND_GRPC_HANDLER) or an ``A2AExpert``
(kind INTEGRATION_KIND_A2A_AGENT, ``remote_a2a.py``) whose id is the
integration's id, listed by that workspace's ``ListHandlers`` with
``Handler.integration`` set (operator-level handlers leave it empty) and
routed like any handler (SendMessage ``handler``, message metadata, a
``/id`` command prefix). Other workspaces do not see it.

Where they come from: the shared database (``integration/directory.py``),
read once per workspace and cached. Every dispatcher process drops a
workspace's entry when an INTEGRATION_CHANGED event of that workspace
arrives (``on_event``, wired to ``EventBus.listen``) and reads it again in the
background, so a created expert takes messages, and a deleted or disabled one
stops taking them, as soon as the event reaches the process. The entry is
also re-read (in the background; the cached one serves meanwhile) every
``refresh_s``: a missed event cannot keep a deleted expert routable for
longer, and a name whose addresses changed is resolved again.

Each gRPC expert gets one channel to the addresses the egress policy allowed
(``platform/security/egress.py``), never resolved again until the next read. An A2A
agent's card URL is checked at the read too (a blocked one is listed
unavailable with the reason); its client checks the card's own addresses
each time it connects. An
expert kept across reads (same endpoint, credential, timeout and addresses)
keeps its channel; a removed or changed one is retired: routing stops at
once, and its channel closes when its last run ends (a run in flight is not
cut off by an edit). All channels close at shutdown.

An id that an operator-level handler has (``echo``, ``llm``, a static
expert) is the operator's: such a workspace expert is neither listed nor
routed to, and a warning names it.

Calls go through the integration's circuit breaker (``platform/resilience/breaker.py``,
key = the integration's resource name), shared with the hub's tool calls
and probes: an open circuit makes the expert unavailable to the router.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final, Protocol

from switchboard.api.dispatcher.v1 import dispatcher_pb2
from switchboard.api.events.v1 import events_pb2
from switchboard.api.handler.v1 import handler_pb2
from switchboard.api.integration.v1 import integration_pb2
from switchboard.dispatcher.handlers.base import (
    Frame,
    HandleCall,
    Handler,
    HandlerFailure,
    capabilities,
)
from switchboard.dispatcher.handlers.remote import RemoteHandler
from switchboard.dispatcher.handlers.remote_a2a import A2AExpert
from switchboard.dispatcher.ports.experts import ExpertEntry, integration_name
from switchboard.integration.kinds.a2a import A2AAgent
from switchboard.platform import background
from switchboard.platform.errors import SwitchboardError
from switchboard.platform.security.egress import (
    EgressPolicy,
    check_host,
    grpc_target,
    parse_grpc_endpoint,
    parse_http_endpoint,
)
from switchboard.platform.values.resources import WorkspaceName, owner_or_none

log = logging.getLogger("switchboard.dispatcher.handlers.experts")

#: Reads a workspace's experts (``directory.workspace_experts`` with its arguments bound).
Reader = Callable[[str], Awaitable[Sequence[ExpertEntry]]]

#: Workspaces whose experts are kept; the least recently used beyond it are dropped.
MAX_WORKSPACES: Final = 1_000
#: How long a new expert's first GetCapabilities may hold up the read that found it.
DESCRIBE_WAIT_S: Final = 2.0
_KINDS: Final = (
    integration_pb2.INTEGRATION_KIND_GRPC_HANDLER,
    integration_pb2.INTEGRATION_KIND_A2A_AGENT,
    integration_pb2.INTEGRATION_KIND_UNSPECIFIED,
)


class ExpertClient(Protocol):
    """What calls an expert: a ``RemoteHandler`` or an ``A2AExpert``."""

    @property
    def capabilities(self) -> handler_pb2.HandlerCapabilities: ...

    @property
    def closed(self) -> bool: ...

    def available(self) -> bool: ...

    def handle(self, call: HandleCall) -> AsyncIterator[Frame]: ...

    async def refresh(self) -> bool: ...

    async def close(self) -> None: ...


class CircuitPermit(Protocol):
    """Leave for one call (``platform/breaker.Permit``)."""

    async def succeeded(self) -> None: ...
    async def failed(self) -> None: ...
    def released(self) -> None: ...


class CircuitState(Protocol):
    @property
    def state(self) -> str:
        """``closed``, ``open`` or ``half_open``."""
        ...


class CircuitBreakers(Protocol):
    """The integrations' circuit breakers (``platform/breaker.Breakers``)."""

    def state(self, key: str) -> CircuitState: ...
    async def acquire(self, key: str, *, label: str) -> CircuitPermit: ...


@dataclass(frozen=True)
class _Config:
    """What an expert's channel was built from; a change means a new channel."""

    entry: ExpertEntry
    target: str = ""
    options: tuple[tuple[str, str | int], ...] = ()
    tls: bool = False
    #: Why it cannot be called ("" if it can).
    problem: str = ""


class WorkspaceExpert:
    """One workspace expert as the router sees it: a RemoteHandler and its circuit."""

    kind = dispatcher_pb2.HANDLER_KIND_REMOTE

    def __init__(
        self,
        workspace_id: str,
        config: _Config,
        remote: ExpertClient | None,
        breakers: CircuitBreakers | None,
        on_idle: Callable[[WorkspaceExpert], None],
    ) -> None:
        entry = config.entry
        self.config = config
        #: ``workspaces/{w}/integrations/{i}`` (ListHandlers' ``Handler.integration``).
        self.integration = integration_name(workspace_id, entry.id)
        self.remote = remote
        self._breakers = breakers
        self._on_idle = on_idle
        self.retired = False
        self.calls = 0
        self._placeholder = capabilities(
            entry.id,
            entry.display_name or entry.id,
            f"workspace expert at {entry.endpoint}; unavailable: {config.problem}",
        )

    @property
    def capabilities(self) -> handler_pb2.HandlerCapabilities:
        return self.remote.capabilities if self.remote is not None else self._placeholder

    def available(self) -> bool:
        if self.remote is None or self.retired:
            return False
        if self._breakers is not None and self._breakers.state(self.integration).state == "open":
            return False
        return self.remote.available()

    async def handle(self, call: HandleCall) -> AsyncIterator[Frame]:
        remote = self.remote
        if remote is None:
            raise HandlerFailure(f"expert {self.config.entry.id!r}: {self.config.problem}")
        self.calls += 1
        try:
            if self._breakers is None:
                async for frame in remote.handle(call):
                    yield frame
                return
            permit = await self._breakers.acquire(
                self.integration, label=f"expert {self.config.entry.id!r}"
            )
            settled = False
            try:
                async for frame in remote.handle(call):
                    if not settled and frame.WhichOneof("frame") == "result":
                        # Before it is passed on: the run may stop reading at its result.
                        settled = True
                        await permit.succeeded()
                    yield frame
            except (HandlerFailure, TimeoutError) as exc:
                # Unreachable, or no answer in time: the expert's failure. An
                # answer that refused the request is the expert working.
                if isinstance(exc, TimeoutError) or exc.retryable:
                    await permit.failed()
                raise
            finally:
                permit.released()  # no verdict (cancelled); a no-op after one
        finally:
            self.calls -= 1
            if self.retired and not self.calls:
                self._on_idle(self)


@dataclass
class _Cached:
    experts: dict[str, WorkspaceExpert]
    loaded_at: float
    #: An event said it changed: the next lookup waits for a new read.
    stale: bool = False


class WorkspaceExperts:
    """Every workspace's experts, cached per workspace; see the module doc."""

    def __init__(
        self,
        read: Reader,
        policy: EgressPolicy,
        *,
        timeout_s: float,
        reserved: Callable[[str], bool],
        breakers: CircuitBreakers | None = None,
        refresh_s: float = 60.0,
        max_workspaces: int = MAX_WORKSPACES,
    ) -> None:
        """``timeout_s`` bounds connecting, GetCapabilities and DNS (capped by an
        integration's own call timeout); ``reserved`` says whether an id is an
        operator-level handler's."""
        self._read = read
        self._policy = policy
        self._timeout_s = timeout_s
        self._reserved = reserved
        self._breakers = breakers
        self._refresh_s = refresh_s
        self._max_workspaces = max_workspaces
        self._cache: OrderedDict[str, _Cached] = OrderedDict()
        self._loading: dict[str, asyncio.Task[dict[str, WorkspaceExpert]]] = {}
        # Workspaces an event named while their read was in flight.
        self._dirty: set[str] = set()
        # Retired experts still serving a run; closed when it ends.
        self._retired: set[WorkspaceExpert] = set()
        # Built by a read still in flight (not yet in the cache).
        self._building: set[WorkspaceExpert] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    # -- lookups -------------------------------------------------------------------

    async def of(self, workspace_id: str) -> Mapping[str, Handler]:
        """The workspace's experts by id (DependencyUnavailable if they cannot be read now)."""
        cached = self._cache.get(workspace_id)
        if cached is not None and not cached.stale:
            self._cache.move_to_end(workspace_id)
            if time.monotonic() - cached.loaded_at >= self._refresh_s:
                self._load_soon(workspace_id)
            return cached.experts
        return await asyncio.shield(self._load_task(workspace_id))

    def on_event(self, event: events_pb2.Event) -> None:
        """Bus listener: an expert of a workspace changed, or the workspace was deleted."""
        if event.type == events_pb2.EVENT_TYPE_INTEGRATION_CHANGED:
            if event.integration_changed.integration.kind not in _KINDS:
                return
            name = event.workspace or event.integration_changed.integration.name
        elif (
            event.type == events_pb2.EVENT_TYPE_WORKSPACE_CHANGED
            and event.workspace_changed.change == events_pb2.CHANGE_KIND_DELETED
        ):
            name = event.workspace
        else:
            return
        owner = owner_or_none(name)
        if not isinstance(owner, WorkspaceName):
            return
        workspace_id = owner.workspace
        if workspace_id in self._loading:
            self._dirty.add(workspace_id)
        cached = self._cache.get(workspace_id)
        if cached is None:
            return  # nothing cached: the next lookup reads it anyway
        cached.stale = True
        # Read now, so a removed expert's channel closes without waiting for a lookup.
        self._load_soon(workspace_id)

    # -- reading -------------------------------------------------------------------

    def _load_task(self, workspace_id: str) -> asyncio.Task[dict[str, WorkspaceExpert]]:
        """The read in flight for ``workspace_id``, started if there is none (one at a time)."""
        task = self._loading.get(workspace_id)
        if task is None:
            task = asyncio.get_running_loop().create_task(
                self._load(workspace_id), name=f"experts-{workspace_id}"
            )
            self._loading[workspace_id] = task
            task.add_done_callback(lambda done: self._loaded(workspace_id, done))
        return task

    def _loaded(self, workspace_id: str, task: asyncio.Task[dict[str, WorkspaceExpert]]) -> None:
        if self._loading.get(workspace_id) is task:
            del self._loading[workspace_id]
        if task.cancelled():
            return
        error = task.exception()
        if error is not None:
            # Retrieved here: a background read may have no one awaiting it.
            # Not read again until a lookup asks (no loop during an outage).
            if isinstance(error, SwitchboardError):  # the database, said in its own words
                log.warning(
                    "a workspace's experts were not read",
                    extra={"workspace": workspace_id, "reason": error.reason},
                )
            else:
                log.error(
                    "a workspace's experts were not read",
                    exc_info=(type(error), error, error.__traceback__),
                    extra={"workspace": workspace_id},
                )
            return
        cached = self._cache.get(workspace_id)
        if cached is not None and cached.stale:
            # An event came during the read: read again, so a removed expert's
            # channel closes without waiting for a lookup.
            self._load_soon(workspace_id)

    def _load_soon(self, workspace_id: str) -> None:
        if not self._closed:
            self._load_task(workspace_id)

    async def _load(self, workspace_id: str) -> dict[str, WorkspaceExpert]:
        self._dirty.discard(workspace_id)
        entries = await self._read(workspace_id)
        configs = await asyncio.gather(*(self._configure(entry) for entry in entries))
        cached = self._cache.get(workspace_id)
        previous = dict(cached.experts) if cached is not None else {}
        experts: dict[str, WorkspaceExpert] = {}
        built: list[WorkspaceExpert] = []
        replaced: list[WorkspaceExpert] = []
        for config in configs:
            handler_id = config.entry.id
            if self._reserved(handler_id):
                log.warning(
                    "a workspace expert has an operator-level handler's id; the operator's wins",
                    extra={"workspace": workspace_id, "handler": handler_id},
                )
                continue
            kept = previous.pop(handler_id, None)
            if kept is not None and kept.config == config:
                experts[handler_id] = kept
                continue
            if kept is not None:
                replaced.append(kept)
            expert = self._build(workspace_id, config)
            experts[handler_id] = expert
            built.append(expert)
        replaced.extend(previous.values())
        # Described before anyone can pick them, so ListHandlers shows what they
        # said. Cancelled only by close(), which closes what is building.
        self._building.update(built)
        await self._describe([e.remote for e in built if e.remote is not None])
        self._building.difference_update(built)
        if self._closed:  # pragma: no cover - close() cancels the read instead
            replaced.extend(built)
            experts = {}
        else:
            stale = workspace_id in self._dirty
            self._dirty.discard(workspace_id)
            self._cache[workspace_id] = _Cached(experts, time.monotonic(), stale=stale)
            self._cache.move_to_end(workspace_id)
            while len(self._cache) > self._max_workspaces:
                _, evicted = self._cache.popitem(last=False)
                replaced.extend(evicted.experts.values())
        # Only now: until the new entry was in place, lookups still used these.
        for expert in replaced:
            await self._retire(expert)
        return experts

    async def _configure(self, entry: ExpertEntry) -> _Config:
        """Where to dial ``entry`` (the checked addresses), or why it cannot be called."""
        if entry.disabled:
            return _Config(entry, problem="disabled")
        if entry.problem:
            return _Config(entry, problem=entry.problem)
        timeout = min(self._timeout_s, entry.timeout_s or self._timeout_s)
        try:
            if entry.kind == integration_pb2.INTEGRATION_KIND_A2A_AGENT:
                card = parse_http_endpoint(entry.endpoint, "endpoint")
                await check_host(card.host, card.port, self._policy, timeout_s=timeout)
                return _Config(entry)
            endpoint = parse_grpc_endpoint(entry.endpoint, "endpoint")
            target, options = await grpc_target(endpoint, self._policy, timeout_s=timeout)
        except SwitchboardError as exc:
            # Blocked by the egress policy, or the name does not resolve now
            # (read again at the next refresh). The message names only the host.
            return _Config(entry, problem=exc.message)
        return _Config(entry, target, tuple(options), endpoint.tls)

    def _build(self, workspace_id: str, config: _Config) -> WorkspaceExpert:
        entry = config.entry
        remote: ExpertClient | None = None
        timeout_s = min(self._timeout_s, entry.timeout_s or self._timeout_s)
        if not config.problem and entry.kind == integration_pb2.INTEGRATION_KIND_A2A_AGENT:
            agent = A2AAgent(
                entry.endpoint,
                self._policy,
                credential=entry.credential,
                timeout_s=timeout_s,
                allow_plain_http=self._policy.allow_loopback or self._policy.allow_private,
                field="endpoint",
            )
            remote = A2AExpert(entry.id, agent, timeout_s=timeout_s)
        elif not config.problem:
            metadata = (
                (("authorization", f"Bearer {entry.credential}"),) if entry.credential else ()
            )
            remote = RemoteHandler(
                entry.id,
                config.target,
                timeout_s=timeout_s,
                channel_options=config.options,
                metadata=metadata,
                shown_as=entry.endpoint,
                tls=config.tls,
            )
        return WorkspaceExpert(workspace_id, config, remote, self._breakers, self._idle)

    async def _describe(self, remotes: list[ExpertClient]) -> None:
        """Ask new experts what they can do; a slow one finishes in the background."""
        if not remotes:
            return
        tasks = [
            background.spawn(
                self._refresh(remote), name="expert-describe", logger=log, keep=self._tasks
            )
            for remote in remotes
        ]
        await asyncio.wait(tasks, timeout=min(DESCRIBE_WAIT_S, self._timeout_s))

    @staticmethod
    async def _refresh(remote: ExpertClient) -> None:
        # False when it cannot say: it logs why and is unavailable for a while. It
        # raises nothing it can foresee; anything else is logged by background.spawn.
        await remote.refresh()

    # -- closing -------------------------------------------------------------------

    async def _retire(self, expert: WorkspaceExpert) -> None:
        expert.retired = True
        if expert.calls:
            self._retired.add(expert)  # closed by _idle when its last run ends
        elif expert.remote is not None:
            await expert.remote.close()

    def _idle(self, expert: WorkspaceExpert) -> None:
        self._retired.discard(expert)
        if expert.remote is not None and not self._closed:
            background.spawn(
                expert.remote.close(), name="expert-close", logger=log, keep=self._tasks
            )

    async def close(self) -> None:
        """Close every channel (at shutdown, after the dispatcher stopped its runs)."""
        self._closed = True
        for task in (*self._loading.values(), *self._tasks):
            task.cancel()
        await asyncio.gather(*self._loading.values(), *self._tasks, return_exceptions=True)
        experts = [e for cached in self._cache.values() for e in cached.experts.values()]
        self._cache.clear()
        for expert in (*experts, *self._retired, *self._building):
            if expert.remote is not None:
                await expert.remote.close()
        self._retired.clear()
        self._building.clear()
