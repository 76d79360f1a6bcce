"""The integration hub's domain: registration, status, watching, tools.

Every integration is reached through one ``Connector`` (``connectors.py``),
built per process from its stored record, and every call to it goes through
the integration's circuit breaker (``platform/breaker.py``, shared by replicas
when Redis is configured) and a timeout. Addresses pass the egress policy
(``platform/egress.py``) when they are registered and again when connected.
Credentials are sealed at rest (``platform/secretbox.py``) and leave the hub
only towards the integration itself.

This module does not import grpc; the servicer is transport only.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import datetime as dt
import logging
import random
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol

import jsonschema
from google.protobuf import duration_pb2, json_format, struct_pb2
from google.rpc import code_pb2, status_pb2
from referencing.exceptions import Unresolvable

from switchboard.api.events.v1 import events_pb2
from switchboard.api.integration.v1 import integration_pb2 as pb
from switchboard.integration.connectors import (
    Connector,
    ConnectorError,
    ToolNotFound,
    ToolResult,
    ToolSpec,
    Unreachable,
)
from switchboard.integration.mapping import integration_name, integration_proto, name_of
from switchboard.integration.store import Health, IntegrationRecord, IntegrationStore
from switchboard.platform import names, pagination, timefields
from switchboard.platform.breaker import Breakers, BreakerState
from switchboard.platform.bus import EventBus
from switchboard.platform.cache import Cache
from switchboard.platform.egress import (
    EgressPolicy,
    ResolutionFailed,
    check_host,
    parse_grpc_endpoint,
    parse_http_endpoint,
)
from switchboard.platform.errors import (
    DeadlineExceeded,
    DependencyUnavailable,
    DestinationBlocked,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    RateLimited,
    RequestTooLarge,
    ResultTooLarge,
    SubscriberTooSlow,
    SwitchboardError,
    Violations,
)
from switchboard.platform.outbox import Staged
from switchboard.platform.policy import Principal
from switchboard.platform.secretbox import SecretBox
from switchboard.platform.storage import idempotency

log = logging.getLogger("switchboard.integration")

_WORKSPACE: Final = names.WORKSPACE
_INTEGRATION: Final = re.compile(rf"workspaces/({names.ID})/integrations/({names.ID})")
#: MCP tool names: letters, digits, ``_``, ``-`` and ``.`` (the MCP spec's
#: recommendation), at most 128 characters.
_TOOL: Final = re.compile(
    rf"workspaces/({names.ID})/integrations/({names.ID})/tools/([A-Za-z0-9_.-]{{1,128}})"
)
_DELIVERY: Final = re.compile(
    rf"workspaces/({names.ID})/integrations/({names.ID})/deliveries/({names.ID})"
)
_CLIENT_ID: Final = re.compile(r"[a-z][a-z0-9-]{1,62}")
_WEBHOOK_SECRET: Final = re.compile(r"whsec_([A-Za-z0-9+/=]{16,200})")
_EVENT_TYPES: Final = frozenset(
    name.removeprefix("EVENT_TYPE_")
    for name, number in events_pb2.EventType.items()
    if number != events_pb2.EVENT_TYPE_UNSPECIFIED
)
_KINDS: Final = frozenset(
    {pb.INTEGRATION_KIND_GRPC_HANDLER, pb.INTEGRATION_KIND_MCP_SERVER, pb.INTEGRATION_KIND_WEBHOOK}
)
_MUTABLE: Final = (
    "display_name",
    "endpoint",
    "call_timeout",
    "config",
    "credential",
    "disabled",
    "event_types",
)
MAX_DISPLAY_NAME: Final = 200
MAX_CREDENTIAL: Final = 4096
MAX_EVENT_TYPES: Final = 32
MAX_VIOLATIONS: Final = 20
#: Tools an integration's list is cached for before it is asked again.
TOOLS_TTL_S: Final = 300.0
#: Changes a watcher may have queued before it is ended as too slow.
WATCH_BUFFER: Final = 256
#: Probes run at once (each bounded by its own timeout).
PROBE_CONCURRENCY: Final = 8
PROBE_TIMEOUT_S: Final = 10.0
#: Time to resolve an endpoint's host when it is registered.
RESOLVE_TIMEOUT_S: Final = 5.0

#: Builds the connector of a record, given its credential in clear (None if unset).
ConnectorFactory = Callable[[IntegrationRecord, str | None], Connector | None]
#: Answers the health of a webhook from its deliveries: None if nothing was sent yet.
WebhookHealth = Callable[[str, str], Awaitable[tuple[int, str] | None]]


class WebhookDeliveries(Protocol):
    """The webhook engine's queries and commands (``webhooks.py``)."""

    async def list_deliveries(
        self, workspace_id: str, integration_id: str, *, page_size: int, page_token: str
    ) -> tuple[list[pb.WebhookDelivery], str]: ...

    async def redeliver(
        self, workspace_id: str, integration_id: str, delivery_id: str
    ) -> pb.WebhookDelivery: ...


@dataclass(frozen=True)
class Limits:
    max_per_workspace: int = 50
    max_config_bytes: int = 16_384
    default_call_timeout_s: float = 30.0
    max_call_timeout_s: float = 300.0
    max_result_bytes: int = 1_048_576
    tool_calls_per_minute: int = 600
    probe_interval_s: float = 30.0
    #: Plain http:// endpoints are accepted (only where loopback or private
    #: destinations are allowed: dev mode and tests).
    allow_plain_http: bool = False
    #: After a webhook secret is rotated, how long the previous one also signs.
    secret_overlap_s: float = 86_400.0


def _match(pattern: re.Pattern[str], value: str, field: str) -> re.Match[str]:
    return names.match(pattern, value, field)


def _status(code: int, message: str) -> bytes:
    data: bytes = status_pb2.Status(code=code, message=message[:500]).SerializeToString()
    return data


def _jsonable(value: Any) -> Any:
    """Struct numbers are doubles; JSON has one number type, so 3.0 is 3 again."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    if isinstance(value, dict):
        return {key: _jsonable(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_jsonable(item) for item in value]
    return value


def _path(error: jsonschema.ValidationError) -> str:
    parts = ["arguments"]
    for part in error.absolute_path:
        parts.append(f"[{part}]" if isinstance(part, int) else f".{part}")
    return "".join(parts).replace(".[", "[")


@dataclass
class _Tools:
    version: int
    fetched: float
    tools: list[ToolSpec]


@dataclass
class _Live:
    """A connector built for one version of a record."""

    version: int
    connector: Connector


class _Watcher:
    def __init__(self) -> None:
        self.queue: asyncio.Queue[events_pb2.Event | None] = asyncio.Queue(maxsize=WATCH_BUFFER)
        self.overflowed = False

    def offer(self, event: events_pb2.Event) -> None:
        try:
            self.queue.put_nowait(event)
        except asyncio.QueueFull:
            self.overflowed = True
            with contextlib.suppress(asyncio.QueueEmpty):
                self.queue.get_nowait()
            self.queue.put_nowait(None)


class IntegrationHub:
    def __init__(
        self,
        store: IntegrationStore,
        bus: EventBus,
        counters: Cache,
        breakers: Breakers,
        secrets: SecretBox,
        egress: EgressPolicy,
        page_tokens: pagination.PageTokens,
        limits: Limits,
        connectors: ConnectorFactory,
        *,
        stdio_servers: frozenset[str] = frozenset(),
        reserved_handler_ids: frozenset[str] = frozenset(),
    ) -> None:
        self._store = store
        self._bus = bus
        self._counters = counters
        self._breakers = breakers
        #: Shared with the dispatcher: an expert's circuit is one for runs and tools.
        self.breakers = breakers
        self._secrets = secrets
        self._egress = egress
        self._pages = page_tokens
        self.limits = limits
        self._build = connectors
        self._stdio = stdio_servers
        self._reserved = reserved_handler_ids
        #: Set by the composition root where webhook deliveries run.
        self.webhook_health: WebhookHealth | None = None
        self.webhooks: WebhookDeliveries | None = None
        self._live: dict[str, _Live] = {}
        self._tools: dict[str, _Tools] = {}
        self._watchers: dict[str, set[_Watcher]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._prober: asyncio.Task[None] | None = None
        self._unlisten: Callable[[], None] | None = None
        self._closed = False

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self, *, probe: bool) -> None:
        """Follow integration events; probe health only where the service is served."""
        self._unlisten = self._bus.listen(self._on_event)
        self._breakers.on_change(self._circuit_changed)
        if probe:
            self._prober = asyncio.create_task(self._probe_loop(), name="integration-prober")

    async def close(self) -> None:
        self._closed = True
        if self._unlisten is not None:
            self._unlisten()
        tasks = [t for t in (self._prober, *self._tasks) if t is not None and not t.done()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5)
        for watchers in self._watchers.values():
            for watcher in watchers:
                with contextlib.suppress(asyncio.QueueFull):
                    watcher.queue.put_nowait(None)
        live, self._live = self._live, {}
        await asyncio.gather(*(self._close(item.connector) for item in live.values()))

    async def _close(self, connector: Connector) -> None:
        try:
            # A stdio server gets stdin closed, then SIGTERM, then SIGKILL: about 7 s.
            async with asyncio.timeout(10):
                await connector.close()
        except Exception:  # closing must not fail a shutdown or an update
            log.warning("closing an integration's connector failed", exc_info=True)

    def _spawn(self, work: Awaitable[Any], name: str) -> None:
        async def run() -> None:
            await work

        task = asyncio.get_running_loop().create_task(run(), name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- events ---------------------------------------------------------------------------

    def _event(
        self,
        principal: Principal | None,
        change: events_pb2.ChangeKind.ValueType,
        record: IntegrationRecord,
    ) -> events_pb2.Event:
        actor = events_pb2.Actor(name="system")
        if principal is not None:
            actor = events_pb2.Actor(
                name=principal.user_name,
                credential=principal.session_name or principal.api_key_name,
            )
        return events_pb2.Event(
            type=events_pb2.EVENT_TYPE_INTEGRATION_CHANGED,
            actor=actor,
            workspace=f"workspaces/{record.workspace_id}",
            integration_changed=events_pb2.IntegrationChanged(
                change=change, integration=self._proto(record)
            ),
        )

    def _staged(
        self, build: Callable[[Any], Sequence[events_pb2.Event] | None], key: str = ""
    ) -> Staged[Any]:
        return Staged(self._bus.outbox, build, key=key)

    def _on_event(self, event: events_pb2.Event) -> None:
        """Every process: drop what a change made stale; wake the workspace's watchers."""
        if event.type != events_pb2.EVENT_TYPE_INTEGRATION_CHANGED:
            return
        integration = event.integration_changed.integration
        name = integration.name
        live = self._live.get(name)
        version = names.etag_version(integration.etag) or 0
        if live is not None and (
            event.integration_changed.change == events_pb2.CHANGE_KIND_DELETED
            or live.version != version
        ):
            del self._live[name]
            self._tools.pop(name, None)
            self._spawn(self._close(live.connector), "integration-close")
        for watcher in self._watchers.get(event.workspace, ()):
            watcher.offer(event)

    def _circuit_changed(self, key: str, state: BreakerState) -> None:
        """A circuit opened or closed: announce the integration's new status."""
        found = _INTEGRATION.fullmatch(key)
        if found is None or self._closed:
            return
        self._spawn(self._announce_status(found[1], found[2]), "integration-circuit")

    async def _announce_status(self, workspace_id: str, integration_id: str) -> None:
        try:
            record = await self._store.get(workspace_id, integration_id)
            if record is not None:
                await self._bus.publish(self._event(None, events_pb2.CHANGE_KIND_UPDATED, record))
        except Exception:  # a status announcement is best effort; the status itself is live
            log.warning("integration status not announced", exc_info=True)

    # -- mapping --------------------------------------------------------------------------

    def _proto(self, record: IntegrationRecord) -> pb.Integration:
        return integration_proto(record, self._breakers.state(name_of(record)))

    # -- validation -----------------------------------------------------------------------

    async def _endpoint(
        self, kind: int, endpoint: str, field: str, violations: Violations
    ) -> str | None:
        """The endpoint, checked for its kind and against the egress policy."""
        endpoint = endpoint.strip()
        if not endpoint:
            violations.add(field, "is required")
            return None
        try:
            if kind == pb.INTEGRATION_KIND_MCP_SERVER and endpoint.startswith("stdio:"):
                server = endpoint.removeprefix("stdio:")
                if server not in self._stdio:
                    violations.add(
                        field,
                        "names no stdio MCP server the operator configured "
                        "(SWITCHBOARD_INTEGRATION_MCP_STDIO_SERVERS)",
                    )
                    return None
                return endpoint
            if kind == pb.INTEGRATION_KIND_GRPC_HANDLER:
                target = parse_grpc_endpoint(endpoint, field)
                host, port = target.host, target.port
            else:
                url = parse_http_endpoint(endpoint, field)
                if url.scheme != "https" and not self.limits.allow_plain_http:
                    violations.add(field, "must be an https URL")
                    return None
                host, port = url.host, url.port
            await check_host(host, port, self._egress, timeout_s=RESOLVE_TIMEOUT_S)
        except DestinationBlocked as exc:
            # The policy's own message, on the field that named the address.
            raise DestinationBlocked(exc.message, [FieldViolation(field, exc.message)]) from None
        except InvalidArgument as exc:
            violations.items.extend(exc.violations or (FieldViolation(field, exc.message),))
            return None
        except ResolutionFailed:
            violations.add(field, "names a host that does not resolve")
            return None
        return endpoint

    def _timeout_ms(self, value: duration_pb2.Duration, field: str, violations: Violations) -> int:
        seconds = timefields.seconds(value, field)
        if seconds < 0 or (seconds == 0 and (value.seconds or value.nanos)):
            violations.add(field, "must be positive")
        elif seconds > self.limits.max_call_timeout_s:
            violations.add(field, f"must be at most {self.limits.max_call_timeout_s:g} s")
        return max(0, round(seconds * 1000))

    def _config(self, value: struct_pb2.Struct, field: str) -> bytes:
        data = value.SerializeToString(deterministic=True)
        if len(data) > self.limits.max_config_bytes:
            raise RequestTooLarge(f"{field} is larger than {self.limits.max_config_bytes} bytes")
        return data

    def _credential(
        self, kind: int, credential: str, field: str, violations: Violations, *, required: bool
    ) -> str | None:
        if not credential:
            if required and kind == pb.INTEGRATION_KIND_WEBHOOK:
                violations.add(field, "is required for webhooks: the signing secret, whsec_...")
            return None
        if len(credential) > MAX_CREDENTIAL:
            violations.add(field, f"is longer than {MAX_CREDENTIAL} characters")
            return None
        if kind == pb.INTEGRATION_KIND_WEBHOOK:
            found = _WEBHOOK_SECRET.fullmatch(credential)
            secret = b""
            if found is not None:
                with contextlib.suppress(binascii.Error, ValueError):
                    secret = base64.b64decode(found[1], validate=True)
            if not 24 <= len(secret) <= 64:
                violations.add(field, "must be whsec_ followed by 24 to 64 random bytes in base64")
                return None
        return credential

    def _event_types(
        self, kind: int, values: Sequence[str], field: str, violations: Violations
    ) -> str:
        if values and kind != pb.INTEGRATION_KIND_WEBHOOK:
            violations.add(field, "is only for webhooks")
            return ""
        if len(values) > MAX_EVENT_TYPES:
            violations.add(field, f"may name at most {MAX_EVENT_TYPES} event types")
            return ""
        for index, value in enumerate(values):
            if value.removeprefix("EVENT_TYPE_") not in _EVENT_TYPES:
                violations.add(f"{field}[{index}]", "is not an event type, e.g. MESSAGE_CREATED")
        return " ".join(dict.fromkeys(v.removeprefix("EVENT_TYPE_") for v in values))

    def _seal(self, credential: str, name: str) -> bytes:
        return self._secrets.seal(credential, purpose=name)

    # -- CRUD -----------------------------------------------------------------------------

    async def create(
        self, principal: Principal, request: pb.CreateIntegrationRequest
    ) -> pb.Integration:
        workspace_id = _match(_WORKSPACE, request.parent, "parent")[1]
        given = request.integration
        violations = Violations()
        if request.integration_id and not _CLIENT_ID.fullmatch(request.integration_id):
            violations.add("integration_id", "must match [a-z][a-z0-9-]{1,62}")
        kind = int(given.kind)
        if kind not in _KINDS:
            violations.add("integration.kind", "must be GRPC_HANDLER, MCP_SERVER or WEBHOOK")
        integration_id = request.integration_id or uuid.uuid4().hex
        if kind == pb.INTEGRATION_KIND_GRPC_HANDLER and integration_id in self._reserved:
            violations.add(
                "integration_id", "is the id of an operator-level handler; choose another"
            )
        if len(given.display_name) > MAX_DISPLAY_NAME:
            violations.add("integration.display_name", f"is longer than {MAX_DISPLAY_NAME}")
        timeout_ms = self._timeout_ms(given.call_timeout, "integration.call_timeout", violations)
        credential = self._credential(
            kind, given.credential, "integration.credential", violations, required=True
        )
        event_types = self._event_types(
            kind, given.event_types, "integration.event_types", violations
        )
        violations.check()
        config = self._config(given.config, "integration.config")
        endpoint = await self._endpoint(kind, given.endpoint, "integration.endpoint", violations)
        violations.check()
        if endpoint is None:  # _endpoint added the violation
            raise InvalidArgument("integration.endpoint is invalid")
        name = integration_name(workspace_id, integration_id)
        key = idempotency(principal.user_id, "CreateIntegration", request)
        staged = self._staged(
            lambda made: (
                [self._event(principal, events_pb2.CHANGE_KIND_CREATED, made[0])]
                if made[1]
                else None
            ),
            key.key if key else "",
        )
        record, _ = await self._store.create(
            {
                "workspace_id": workspace_id,
                "id": integration_id,
                "kind": kind,
                "display_name": given.display_name.strip() or integration_id,
                "endpoint": endpoint,
                "call_timeout_ms": timeout_ms,
                "config": config,
                "event_types": event_types,
                "credential": self._seal(credential, name) if credential else None,
                "previous_credential": None,
                "previous_until": None,
                "disabled": given.disabled,
                "creator": principal.user_name,
            },
            key,
            self.limits.max_per_workspace,
            staged,
        )
        await self._bus.publish_staged(staged.events)
        return self._proto(record)

    async def _record(self, name: str, field: str) -> IntegrationRecord:
        found = _match(_INTEGRATION, name, field)
        record = await self._store.get(found[1], found[2])
        if record is None:
            raise NotFound(f"{name} not found")
        return record

    async def get(self, name: str) -> pb.Integration:
        return self._proto(await self._record(name, "name"))

    async def list_integrations(
        self, request: pb.ListIntegrationsRequest
    ) -> pb.ListIntegrationsResponse:
        workspace_id = _match(_WORKSPACE, request.parent, "parent")[1]
        size = pagination.page_size(request.page_size, default=20, maximum=100)
        fingerprint = pagination.fingerprint("integrations", workspace_id)
        after = None
        if request.page_token:
            micros, last = self._pages.decode(
                request.page_token, fingerprint, (pagination.MICROS, pagination.ID)
            )
            after = (
                dt.datetime.fromtimestamp(0, dt.UTC) + dt.timedelta(microseconds=int(micros)),
                str(last),
            )
        records = await self._store.page(workspace_id, after, size + 1)
        response = pb.ListIntegrationsResponse(
            integrations=[self._proto(record) for record in records[:size]]
        )
        if len(records) > size:
            last_record = records[size - 1]
            stamp = last_record.created_at - dt.datetime.fromtimestamp(0, dt.UTC)
            response.next_page_token = self._pages.encode(
                [stamp // dt.timedelta(microseconds=1), last_record.id], fingerprint
            )
        return response

    async def update(
        self, principal: Principal, request: pb.UpdateIntegrationRequest
    ) -> pb.Integration:
        given = request.integration
        found = _match(_INTEGRATION, given.name, "integration.name")
        workspace_id, integration_id = found[1], found[2]
        paths = self._mask(request, given)
        current = await self._store.get(workspace_id, integration_id)
        if current is None:
            raise NotFound(f"{given.name} not found")
        if given.etag and names.etag_version(given.etag) is None:
            raise InvalidArgument(
                "integration.etag is malformed",
                [FieldViolation("integration.etag", "is malformed")],
            )
        kind = current.kind
        violations = Violations()
        changes: dict[str, Any] = {}
        if "display_name" in paths:
            if len(given.display_name) > MAX_DISPLAY_NAME:
                violations.add("integration.display_name", f"is longer than {MAX_DISPLAY_NAME}")
            changes["display_name"] = given.display_name.strip() or integration_id
        if "call_timeout" in paths:
            changes["call_timeout_ms"] = self._timeout_ms(
                given.call_timeout, "integration.call_timeout", violations
            )
        if "event_types" in paths:
            changes["event_types"] = self._event_types(
                kind, given.event_types, "integration.event_types", violations
            )
        if "disabled" in paths:
            changes["disabled"] = given.disabled
        credential: str | None = None
        if "credential" in paths:
            credential = self._credential(
                kind, given.credential, "integration.credential", violations, required=True
            )
        violations.check()
        if "config" in paths:
            changes["config"] = self._config(given.config, "integration.config")
        if "endpoint" in paths:
            endpoint = await self._endpoint(
                kind, given.endpoint, "integration.endpoint", violations
            )
            violations.check()
            changes["endpoint"] = endpoint
        name = given.name
        overlap = self.limits.secret_overlap_s

        def apply(record: IntegrationRecord) -> dict[str, Any]:
            values = dict(changes)
            if "credential" in paths:
                values["credential"] = self._seal(credential, name) if credential else None
                if kind == pb.INTEGRATION_KIND_WEBHOOK and record.credential and overlap > 0:
                    # Receivers switch secrets at their own pace: both sign meanwhile.
                    values["previous_credential"] = record.credential
                    values["previous_until"] = dt.datetime.now(dt.UTC) + dt.timedelta(
                        seconds=overlap
                    )
                else:
                    values["previous_credential"] = None
                    values["previous_until"] = None
            return values

        staged = self._staged(
            lambda done: [self._event(principal, events_pb2.CHANGE_KIND_UPDATED, done)]
        )
        record = await self._store.update(workspace_id, integration_id, given.etag, apply, staged)
        await self._bus.publish_staged(staged.events)
        return self._proto(record)

    def _mask(self, request: pb.UpdateIntegrationRequest, given: pb.Integration) -> list[str]:
        paths = list(request.update_mask.paths)
        if not paths:
            return [p for p in _MUTABLE if _is_set(given, p)]
        if paths == ["*"]:
            return list(_MUTABLE)
        violations = Violations()
        known = {f.name for f in given.DESCRIPTOR.fields}
        for path in paths:
            if path not in known:
                violations.add("update_mask.paths", f"{path!r} is not a field")
            elif path not in _MUTABLE:
                violations.add("update_mask.paths", f"{path!r} cannot be changed")
        violations.check()
        return list(dict.fromkeys(paths))

    async def delete(self, principal: Principal, name: str, etag: str) -> None:
        found = _match(_INTEGRATION, name, "name")
        if etag and names.etag_version(etag) is None:
            raise InvalidArgument("etag is malformed", [FieldViolation("etag", "is malformed")])
        staged = self._staged(
            lambda done: [self._event(principal, events_pb2.CHANGE_KIND_DELETED, done)]
        )
        await self._store.delete(found[1], found[2], etag, staged)
        await self._bus.publish_staged(staged.events)
        await self._breakers.forget(name)

    async def disable(self, workspace_id: str, integration_id: str, reason: str) -> None:
        """The server disables an integration itself (a webhook failing for long)."""
        staged = self._staged(
            lambda done: [self._event(None, events_pb2.CHANGE_KIND_UPDATED, done)] if done else []
        )
        await self._store.disable(
            workspace_id, integration_id, _status(code_pb2.UNAVAILABLE, reason), staged
        )
        await self._bus.publish_staged(staged.events)

    # -- watching -------------------------------------------------------------------------

    async def watch(self, parent: str) -> AsyncIterator[pb.WatchIntegrationsResponse]:
        """The workspace's integrations as they stand, then every change (status included)."""
        workspace_id = _match(_WORKSPACE, parent, "parent")[1]
        scope = f"workspaces/{workspace_id}"
        watcher = _Watcher()
        # Listening before the snapshot is read: no change can fall in between.
        self._watchers.setdefault(scope, set()).add(watcher)
        try:
            seen: dict[str, int] = {}
            after = None
            while True:
                records = await self._store.page(workspace_id, after, 100)
                for record in records:
                    seen[name_of(record)] = record.version
                    yield pb.WatchIntegrationsResponse(integration=self._proto(record))
                if len(records) < 100:
                    break
                after = (records[-1].created_at, records[-1].id)
            yield pb.WatchIntegrationsResponse(snapshot_complete=True)
            while True:
                event = await watcher.queue.get()
                if event is None:
                    if watcher.overflowed:
                        raise SubscriberTooSlow(
                            "integration changes arrived faster than this stream read them; "
                            "watch again"
                        )
                    return
                change = event.integration_changed
                integration = change.integration
                version = names.etag_version(integration.etag) or 0
                deleted = change.change == events_pb2.CHANGE_KIND_DELETED
                if not deleted and version < seen.get(integration.name, 0):
                    continue  # older than what the snapshot showed
                seen[integration.name] = version
                yield pb.WatchIntegrationsResponse(integration=integration, deleted=deleted)
        finally:
            watchers = self._watchers.get(scope)
            if watchers is not None:
                watchers.discard(watcher)
                if not watchers:
                    del self._watchers[scope]

    # -- connectors and tools ---------------------------------------------------------------

    def _connector(self, record: IntegrationRecord) -> Connector:
        name = name_of(record)
        live = self._live.get(name)
        if live is not None and live.version == record.version:
            return live.connector
        if live is not None:
            self._spawn(self._close(live.connector), "integration-close")
        credential = None
        if record.credential is not None:
            credential = self._secrets.open(record.credential, purpose=name)
        connector = self._build(record, credential)
        if connector is None:
            raise FailedPrecondition(f"{name} is a webhook; webhooks offer no tools")
        self._live[name] = _Live(record.version, connector)
        return connector

    def tools_changed(self, name: str) -> None:
        """The integration said its tools changed (MCP ``list_changed``)."""
        self._tools.pop(name, None)

    def _timeout_s(self, record: IntegrationRecord) -> float:
        configured = record.call_timeout_ms / 1000 or self.limits.default_call_timeout_s
        return min(configured, self.limits.max_call_timeout_s)

    async def _guarded(
        self, record: IntegrationRecord, call: Callable[[], Awaitable[Any]], timeout_s: float
    ) -> Any:
        """``call`` inside the integration's breaker and timeout, failures mapped."""
        name = name_of(record)
        permit = await self._breakers.acquire(name, label=f"integration {name}")
        try:
            async with asyncio.timeout(timeout_s):
                result = await call()
        except TimeoutError:
            await permit.failed()
            raise DeadlineExceeded(
                f"{name} did not answer within {timeout_s:g} s", metadata={"integration": name}
            ) from None
        except ToolNotFound:
            await permit.succeeded()  # it answered: the tool is not there
            raise
        except (Unreachable, ConnectorError) as exc:
            await permit.failed()
            raise DependencyUnavailable(
                f"{name} is unreachable: {exc}"[:300], metadata={"integration": name}
            ) from None
        except asyncio.CancelledError:
            permit.released()
            raise
        except DestinationBlocked as exc:
            permit.released()
            raise FailedPrecondition(
                f"{name}: {exc.message}", metadata={"integration": name}
            ) from None
        except SwitchboardError:
            permit.released()
            raise
        except BaseException:
            permit.released()
            raise
        await permit.succeeded()
        return result

    async def _tool_list(self, record: IntegrationRecord) -> list[ToolSpec]:
        name = name_of(record)
        cached = self._tools.get(name)
        if (
            cached is not None
            and cached.version == record.version
            and time.monotonic() - cached.fetched < TOOLS_TTL_S
        ):
            return cached.tools
        if record.disabled:
            raise FailedPrecondition(f"{name} is disabled")
        connector = self._connector(record)
        timeout_s = self._timeout_s(record)
        tools: list[ToolSpec] = await self._guarded(
            record, lambda: connector.list_tools(timeout_s), timeout_s
        )
        self._tools[name] = _Tools(record.version, time.monotonic(), tools)
        return tools

    async def list_tools(self, request: pb.ListToolsRequest) -> pb.ListToolsResponse:
        record = await self._record(request.parent, "parent")
        size = pagination.page_size(request.page_size, default=50, maximum=200)
        if record.kind == pb.INTEGRATION_KIND_WEBHOOK:
            return pb.ListToolsResponse()
        tools: list[ToolSpec] = sorted(await self._tool_list(record), key=lambda tool: tool.name)
        fingerprint = pagination.fingerprint("tools", request.parent)
        start = 0
        if request.page_token:
            (position,) = self._pages.decode(request.page_token, fingerprint, (pagination.COUNT,))
            start = int(position)
        page = tools[start : start + size]
        response = pb.ListToolsResponse(
            tools=[self._tool_proto(request.parent, tool) for tool in page]
        )
        if start + size < len(tools):
            response.next_page_token = self._pages.encode([start + size], fingerprint)
        return response

    @staticmethod
    def _tool_proto(parent: str, tool: ToolSpec) -> pb.Tool:
        message = pb.Tool(
            name=f"{parent}/tools/{tool.name}", description=tool.description, title=tool.title
        )
        with contextlib.suppress(json_format.ParseError, TypeError, ValueError):
            json_format.ParseDict(dict(tool.input_schema), message.input_schema)
        if tool.output_schema:
            with contextlib.suppress(json_format.ParseError, TypeError, ValueError):
                json_format.ParseDict(dict(tool.output_schema), message.output_schema)
        return message

    async def invoke_tool(
        self,
        principal: Principal,
        request: pb.InvokeToolRequest,
        *,
        deadline_s: float | None = None,
        run: str = "",
    ) -> pb.InvokeToolResponse:
        found = _match(_TOOL, request.name, "name")
        workspace_id, integration_id, tool_name = found[1], found[2], found[3]
        violations = Violations()
        requested_s = timefields.seconds(request.timeout, "timeout")
        if requested_s < 0:
            violations.add("timeout", "must not be negative")
        violations.check()
        await self._spend(workspace_id)
        record = await self._store.get(workspace_id, integration_id)
        parent = integration_name(workspace_id, integration_id)
        if record is None:
            raise NotFound(f"{parent} not found")
        if record.disabled:
            raise FailedPrecondition(f"{parent} is disabled; enable it to call its tools")
        if record.kind == pb.INTEGRATION_KIND_WEBHOOK:
            raise FailedPrecondition(f"{parent} is a webhook; webhooks offer no tools")
        tools = {tool.name: tool for tool in await self._tool_list(record)}
        tool = tools.get(tool_name)
        if tool is None:
            raise NotFound(f"{request.name} not found")
        arguments = _jsonable(json_format.MessageToDict(request.arguments))
        self._validate(tool, arguments)
        timeout_s = self._timeout_s(record)
        if requested_s > 0:
            timeout_s = min(timeout_s, requested_s)
        if deadline_s is not None:
            timeout_s = min(timeout_s, max(deadline_s, 0.001))
        return await self._call(principal, record, request.name, arguments, timeout_s, run)

    async def _call(
        self,
        principal: Principal,
        record: IntegrationRecord,
        tool: str,
        arguments: Any,
        timeout_s: float,
        run: str,
    ) -> pb.InvokeToolResponse:
        """Call a validated tool through the breaker; audit it whatever the outcome."""
        parent = name_of(record)
        tool_name = tool.rsplit("/", 1)[1]
        connector = self._connector(record)
        limit = self.limits.max_result_bytes
        started = time.monotonic()
        status = status_pb2.Status(code=code_pb2.OK)
        result: ToolResult | None = None
        try:
            result = await self._guarded(
                record,
                lambda: connector.call_tool(
                    tool_name, arguments, timeout_s=timeout_s, max_result_bytes=limit
                ),
                timeout_s,
            )
        except SwitchboardError as exc:
            status = status_pb2.Status(code=int(exc.code), message=exc.message[:300])
            raise
        except ToolNotFound:
            status = status_pb2.Status(code=code_pb2.NOT_FOUND, message="no such tool")
            self._tools.pop(parent, None)
            raise NotFound(f"{tool} not found") from None
        except asyncio.CancelledError:
            status = status_pb2.Status(code=code_pb2.CANCELLED, message="cancelled")
            raise
        finally:
            elapsed = time.monotonic() - started
            self._audit(principal, tool, elapsed, status, result, run)
        if result is None:  # _guarded returns the result or raises
            raise DependencyUnavailable(f"{parent} gave no answer")
        return self._tool_response(result, elapsed, limit)

    def _validate(self, tool: ToolSpec, arguments: Any) -> None:
        schema = dict(tool.input_schema) or {"type": "object"}
        try:
            validator_class = jsonschema.validators.validator_for(schema)
            validator_class.check_schema(schema)
        except jsonschema.SchemaError:
            raise FailedPrecondition(
                f"the tool {tool.name!r} declares an invalid input schema"
            ) from None
        validator = validator_class(schema)
        violations = Violations()
        try:
            errors = sorted(
                validator.iter_errors(arguments), key=lambda e: [str(p) for p in e.path]
            )
        except (jsonschema.SchemaError, Unresolvable, re.error, RecursionError, ValueError):
            # An unresolvable $ref (never fetched: no outbound call on a
            # server's say-so), a bad pattern, a schema nested too deep.
            raise FailedPrecondition(
                f"the tool {tool.name!r} declares an input schema that cannot be checked"
            ) from None
        for error in errors:
            if len(violations.items) >= MAX_VIOLATIONS:
                break
            violations.add(_path(error), error.message[:300])
        violations.check()

    def _tool_response(
        self, result: ToolResult, elapsed: float, limit: int
    ) -> pb.InvokeToolResponse:
        response = pb.InvokeToolResponse(text=result.text, is_error=result.is_error)
        if result.structured is not None:
            try:
                json_format.ParseDict(dict(result.structured), response.result)
            except (json_format.ParseError, TypeError, ValueError):
                raise DependencyUnavailable(
                    "the tool answered with a structured result that is not a JSON object"
                ) from None
        response.latency.FromNanoseconds(int(elapsed * 1e9))
        if response.ByteSize() > limit:
            raise ResultTooLarge(f"the tool's result is larger than {limit} bytes")
        return response

    def _audit(
        self,
        principal: Principal,
        tool: str,
        elapsed: float,
        status: status_pb2.Status,
        result: ToolResult | None,
        run: str,
    ) -> None:
        """One TOOL_INVOKED event per call: who, which tool, how long, the outcome.

        Never the arguments or the result (they may hold anything) and never
        the credential.
        """
        workspace = tool.split("/integrations/", 1)[0]
        event = events_pb2.Event(
            type=events_pb2.EVENT_TYPE_TOOL_INVOKED,
            actor=events_pb2.Actor(
                name=principal.user_name,
                credential=principal.session_name or principal.api_key_name,
            ),
            workspace=workspace,
            tool_invoked=events_pb2.ToolInvoked(
                tool=tool,
                status=status,
                is_error=bool(result and result.is_error),
                run=run,
            ),
        )
        event.tool_invoked.duration.FromNanoseconds(int(elapsed * 1e9))
        self._spawn(self._publish_audit(event), "integration-audit")

    async def _publish_audit(self, event: events_pb2.Event) -> None:
        try:
            async with asyncio.timeout(10):
                await self._bus.publish(event)
        except Exception:  # noqa: BLE001 - the call happened; a lost audit record is logged
            log.warning("tool audit event not published", extra={"tool": event.tool_invoked.tool})

    async def _spend(self, workspace_id: str) -> None:
        limit = self.limits.tool_calls_per_minute
        count, reset_s = await self._counters.hit(f"integration:tools:{workspace_id}", 60)
        if count > limit:
            raise RateLimited(
                f"more than {limit} tool calls in a minute in this workspace; slow down",
                retry_after_s=max(reset_s, 1.0),
            )

    # -- health ---------------------------------------------------------------------------

    async def _probe_loop(self) -> None:
        interval = self.limits.probe_interval_s
        # Replicas started together do not probe in step.
        await asyncio.sleep(random.uniform(0, min(interval, 5.0)))  # noqa: S311 - jitter
        while not self._closed:
            try:
                await self.probe_all()
            except asyncio.CancelledError:
                raise
            except SwitchboardError:
                log.warning("integration probes skipped: the database is unavailable")
            except Exception:
                log.exception("integration probes failed")
            await asyncio.sleep(interval * random.uniform(0.8, 1.2))  # noqa: S311 - jitter

    async def probe_all(self) -> None:
        """Probe every enabled integration once (bounded concurrency)."""
        records = await self._store.active()
        limit = asyncio.Semaphore(PROBE_CONCURRENCY)

        async def one(record: IntegrationRecord) -> None:
            async with limit:
                await self.probe(record)

        await asyncio.gather(*(one(record) for record in records))

    async def probe(self, record: IntegrationRecord) -> None:
        """Probe one integration and store the verdict if it changed."""
        name = name_of(record)
        error = ""
        code = code_pb2.OK
        try:
            if record.kind == pb.INTEGRATION_KIND_WEBHOOK:
                outcome = (
                    await self.webhook_health(record.workspace_id, record.id)
                    if (self.webhook_health is not None)
                    else None
                )
                if outcome is None:
                    return  # nothing delivered yet: nothing known
                code, error = outcome
            else:
                timeout_s = min(self._timeout_s(record), PROBE_TIMEOUT_S)
                connector = self._connector(record)
                async with asyncio.timeout(timeout_s):
                    await connector.probe(timeout_s)
        except asyncio.CancelledError:
            raise
        except TimeoutError:
            code, error = code_pb2.DEADLINE_EXCEEDED, "the probe timed out"
        except (ConnectorError, DestinationBlocked) as exc:
            code, error = code_pb2.UNAVAILABLE, str(exc)[:300] or "unreachable"
        except SwitchboardError as exc:
            code, error = int(exc.code), exc.message[:300]
        except Exception:  # noqa: BLE001 - a broken probe makes the integration unhealthy
            log.warning("integration probe failed unexpectedly", extra={"integration": name})
            code, error = code_pb2.UNKNOWN, "the probe failed"
        failures = 0 if code == code_pb2.OK else record.failures + 1
        if code == code_pb2.OK:
            health = pb.HEALTH_STATE_HEALTHY
            if self._breakers.state(name).state != "closed":
                health = pb.HEALTH_STATE_DEGRADED
        else:
            health = pb.HEALTH_STATE_DEGRADED if failures < 2 else pb.HEALTH_STATE_UNHEALTHY
        verdict = Health(
            health=health,
            last_error=_status(code, error) if code != code_pb2.OK else record.last_error,
            failures=failures,
            probed_at=dt.datetime.now(dt.UTC),
        )
        staged = self._staged(
            lambda done: [self._event(None, events_pb2.CHANGE_KIND_UPDATED, done)] if done else []
        )
        await self._store.record_health(
            record.workspace_id, record.id, record.version, verdict, staged
        )
        await self._bus.publish_staged(staged.events)

    # -- webhooks -------------------------------------------------------------------------

    async def webhook(self, name: str, field: str) -> IntegrationRecord:
        record = await self._record(name, field)
        if record.kind != pb.INTEGRATION_KIND_WEBHOOK:
            raise FailedPrecondition(f"{name_of(record)} is not a webhook")
        return record

    def _deliveries(self) -> WebhookDeliveries:
        if self.webhooks is None:
            raise FailedPrecondition("webhook deliveries are not served by this process")
        return self.webhooks

    async def list_deliveries(
        self, request: pb.ListWebhookDeliveriesRequest
    ) -> pb.ListWebhookDeliveriesResponse:
        record = await self.webhook(request.parent, "parent")
        deliveries, token = await self._deliveries().list_deliveries(
            record.workspace_id,
            record.id,
            page_size=pagination.page_size(request.page_size, default=20, maximum=100),
            page_token=request.page_token,
        )
        return pb.ListWebhookDeliveriesResponse(deliveries=deliveries, next_page_token=token)

    async def redeliver(self, name: str) -> pb.WebhookDelivery:
        found = _match(_DELIVERY, name, "name")
        record = await self.webhook(integration_name(found[1], found[2]), "name")
        return await self._deliveries().redeliver(record.workspace_id, record.id, found[3])


def _is_set(resource: pb.Integration, path: str) -> bool:
    descriptor = resource.DESCRIPTOR.fields_by_name[path]
    if descriptor.message_type is not None and not _repeated(descriptor):
        return resource.HasField(path)  # type: ignore[arg-type]
    return bool(getattr(resource, path))


def _repeated(descriptor: Any) -> bool:
    return bool(getattr(descriptor, "is_repeated", False))
