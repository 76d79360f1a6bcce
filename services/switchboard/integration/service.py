"""The integration hub's domain: registration, events, watching; tools and health delegated.

Registration validates each field for its kind, checks endpoints against the
egress policy (``platform/security/egress.py``; again on every connection), seals
credentials (``platform/security/credentials/secretbox.py``; they leave the hub only towards the
integration itself) and writes each change with its INTEGRATION_CHANGED
event. Calls to integrations go through this process's connectors and their
breakers (``connect/connections.py``); ``tools.py`` lists and invokes tools,
``connect/health.py`` probes.

This module does not import grpc; the servicer is transport only.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import datetime as dt
import logging
import re
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping, Sequence
from typing import Any, Final, Protocol

from google.protobuf import duration_pb2, struct_pb2
from google.rpc import code_pb2

from switchboard.api.events.v1 import events_pb2
from switchboard.api.integration.v1 import integration_pb2 as pb
from switchboard.integration.connect.connections import (
    Connections,
    ConnectorFactory,
    Limits,
    find,
)
from switchboard.integration.connect.health import Prober, WebhookHealth, status_bytes
from switchboard.integration.kinds.webhooktools import check_tools
from switchboard.integration.mapping import integration_proto, name_of
from switchboard.integration.store import IntegrationRecord, IntegrationStore
from switchboard.integration.tools import Tools
from switchboard.platform.cache import Cache
from switchboard.platform.errors import (
    DestinationBlocked,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    RequestTooLarge,
    SubscriberTooSlow,
    Violations,
)
from switchboard.platform.events.bus import EventBus
from switchboard.platform.observe.metrics import Metrics
from switchboard.platform.resilience.breaker import Breakers, BreakerState
from switchboard.platform.security.accesswatch import AccessWatch
from switchboard.platform.security.credentials.secretbox import SecretBox
from switchboard.platform.security.egress import (
    PLAIN_HTTP_REFUSED,
    EgressPolicy,
    ResolutionFailed,
    check_host,
    parse_grpc_endpoint,
    parse_http_endpoint,
)
from switchboard.platform.security.policy import Permission, Principal
from switchboard.platform.store import pagination
from switchboard.platform.store.keyed import Catalog
from switchboard.platform.store.outbox import Staged
from switchboard.platform.store.storage import idempotency
from switchboard.platform.values import names, timefields
from switchboard.platform.values.fieldmask import update_paths
from switchboard.platform.values.names import checked_etag
from switchboard.platform.values.resources import DeliveryName, IntegrationName, WorkspaceName

log = logging.getLogger("switchboard.integration")

_CLIENT_ID: Final = names.CLIENT_ID
_WEBHOOK_SECRET: Final = re.compile(r"whsec_([A-Za-z0-9+/=]{16,200})")
_EVENT_TYPES: Final = frozenset(
    name.removeprefix("EVENT_TYPE_")
    for name, number in events_pb2.EventType.items()
    if number != events_pb2.EVENT_TYPE_UNSPECIFIED
)
_KINDS: Final = frozenset(
    {
        pb.INTEGRATION_KIND_GRPC_HANDLER,
        pb.INTEGRATION_KIND_MCP_SERVER,
        pb.INTEGRATION_KIND_WEBHOOK,
        pb.INTEGRATION_KIND_A2A_AGENT,
    }
)
# Kinds the dispatcher routes to by the integration's id, which is the handler id.
_HANDLER_KINDS: Final = frozenset({pb.INTEGRATION_KIND_GRPC_HANDLER, pb.INTEGRATION_KIND_A2A_AGENT})
_MUTABLE: Final = (
    "display_name",
    "endpoint",
    "call_timeout",
    "config",
    "credential",
    "disabled",
    "event_types",
    "call_price_micros",
    "tool_call_price_micros",
    "retry_safe",
    "retry_safe_tools",
)
MAX_DISPLAY_NAME: Final = 200
#: The most one tool call may cost: 1,000 units of the price table's currency. A
#: price is reserved whole before each call, so a typo of a few digits would
#: otherwise pause every run at its first call of the tool.
MAX_CALL_PRICE_MICROS: Final = 1_000_000_000
#: Per-tool prices one integration holds (the contract's bound).
MAX_TOOL_PRICES: Final = 200
#: Retry-safe tools one integration names (the contract's bound).
MAX_RETRY_SAFE_TOOLS: Final = 200
#: A tool's segment as ListTools writes it, in words (a price key, a retry-safe tool).
_SEGMENT_RULE: Final = (
    "must be a tool's segment as ListTools names it: 1-128 letters, digits, "
    "'_', '.', '-' or ~XX escapes (upper-case hex) for any other byte"
)
#: Characters of a refused price key quoted in its field violation's path.
_SHOWN_KEY: Final = 160
MAX_CREDENTIAL: Final = 4096
MAX_EVENT_TYPES: Final = 32
#: Changes a watcher may have queued before it is ended as too slow.
WATCH_BUFFER: Final = 256
#: Time to resolve an endpoint's host when it is registered.
RESOLVE_TIMEOUT_S: Final = 5.0


class WebhookDeliveries(Protocol):
    """The webhook engine's queries and commands (``webhooks/delivery.py``)."""

    async def list_deliveries(
        self, workspace_id: str, integration_id: str, *, page_size: int, page_token: str
    ) -> tuple[list[pb.WebhookDelivery], str]: ...

    async def redeliver(
        self, workspace_id: str, integration_id: str, delivery_id: str
    ) -> pb.WebhookDelivery: ...


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
        metrics: Metrics | None = None,
    ) -> None:
        self._store = store
        self._bus = bus
        self._breakers = breakers
        #: Shared with the dispatcher: an expert's circuit is one for runs and tools.
        self.breakers = breakers
        self._secrets = secrets
        self._egress = egress
        self._catalog = Catalog(store, bus, page_tokens)
        self.limits = limits
        self._stdio = stdio_servers
        self._reserved = reserved_handler_ids
        #: Set by the composition root where webhook deliveries run.
        self.webhooks: WebhookDeliveries | None = None
        self._connections = Connections(connectors, secrets, breakers, limits)
        self._tools = Tools(
            store, self._connections, bus, counters, page_tokens, limits, metrics=metrics
        )
        self.prober = Prober(
            store,
            self._connections,
            breakers,
            bus,
            limits,
            lambda record: self._event(None, events_pb2.CHANGE_KIND_UPDATED, record),
        )
        self._watchers: dict[str, set[_Watcher]] = {}
        self._probing = False
        self._unlisten: Callable[[], None] | None = None
        self._closed = False

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self, *, probe: bool) -> None:
        """Follow integration events; probe health only where the service is served."""
        self._unlisten = self._bus.listen(self._on_event)
        self._breakers.on_change(self._circuit_changed)
        if probe:
            self.prober.start()

    async def close(self) -> None:
        self._closed = True
        if self._unlisten is not None:
            self._unlisten()
        await self.prober.close()
        for watchers in self._watchers.values():
            for watcher in watchers:
                with contextlib.suppress(asyncio.QueueFull):
                    watcher.queue.put_nowait(None)
        await self._connections.close()

    @property
    def webhook_health(self) -> WebhookHealth | None:
        return self.prober.webhook_health

    @webhook_health.setter
    def webhook_health(self, health: WebhookHealth | None) -> None:
        self.prober.webhook_health = health

    # -- tools and health (tools.py, health.py) -----------------------------------------------

    def tools_changed(self, name: str) -> None:
        """The integration said its tools changed (MCP ``list_changed``)."""
        self._tools.forget(name)

    async def list_tools(self, request: pb.ListToolsRequest) -> pb.ListToolsResponse:
        return await self._tools.list_tools(request)

    async def invoke_tool(
        self,
        principal: Principal,
        request: pb.InvokeToolRequest,
        *,
        deadline_s: float | None = None,
        run: str = "",
    ) -> pb.InvokeToolResponse:
        return await self._tools.invoke_tool(principal, request, deadline_s=deadline_s, run=run)

    async def probe_all(self) -> None:
        await self.prober.probe_all()

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
            workspace=str(WorkspaceName(record.workspace_id)),
            integration_changed=events_pb2.IntegrationChanged(
                change=change, integration=self._proto(record)
            ),
        )

    def _on_event(self, event: events_pb2.Event) -> None:
        """Every process: drop what a change made stale; wake the workspace's watchers."""
        if event.type != events_pb2.EVENT_TYPE_INTEGRATION_CHANGED:
            return
        integration = event.integration_changed.integration
        deleted = event.integration_changed.change == events_pb2.CHANGE_KIND_DELETED
        version = None if deleted else names.etag_version(integration.etag) or 0
        self._connections.forget(integration.name, version)
        # Every change, status ones included: a call reads the record again.
        self._tools.forget(integration.name)
        for watcher in self._watchers.get(event.workspace, ()):
            watcher.offer(event)

    def _circuit_changed(self, key: str, state: BreakerState) -> None:
        """A circuit opened or closed: announce the integration's new status."""
        integration = IntegrationName.parse_or_none(key)
        if integration is None or self._closed:
            return
        self._connections.spawn(
            self._announce_status(integration.workspace, integration.integration),
            "integration-circuit",
        )

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
                await check_host(
                    target.host, target.port, self._egress, timeout_s=RESOLVE_TIMEOUT_S
                )
                return endpoint
            url = parse_http_endpoint(endpoint, field)
            # The address first: http://127.0.0.1 is refused for being loopback, which
            # is what the operator would change (and then plain http is accepted too).
            await check_host(url.host, url.port, self._egress, timeout_s=RESOLVE_TIMEOUT_S)
            if url.scheme != "https" and not self.limits.allow_plain_http:
                violations.add(field, PLAIN_HTTP_REFUSED)
                return None
        except DestinationBlocked as exc:
            # The policy's own message, on the field that named the address.
            raise DestinationBlocked(
                exc.message, [FieldViolation(field, exc.message)], metadata=exc.metadata
            ) from None
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

    async def _checked_config(self, kind: int, value: struct_pb2.Struct, field: str) -> bytes:
        """``_config``, and a webhook's declared tools checked (webhooktools.py)."""
        data = self._config(value, field)
        if kind == pb.INTEGRATION_KIND_WEBHOOK:
            violations = Violations()
            await check_tools(value, field, violations)
            violations.check()
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

    @staticmethod
    def _price(kind: int, value: int, field: str, violations: Violations) -> int:
        if value < 0:
            violations.add(field, "must not be negative")
        elif value > MAX_CALL_PRICE_MICROS:
            violations.add(
                field, f"must be at most {MAX_CALL_PRICE_MICROS:,} micro-units (1,000 units a call)"
            )
        elif value and kind == pb.INTEGRATION_KIND_WEBHOOK:
            violations.add(field, "is not for webhooks: their tools are not priced")
        return value

    @classmethod
    def _tool_prices(
        cls, kind: int, values: Mapping[str, int], field: str, violations: Violations
    ) -> dict[str, int]:
        """The per-tool prices, keyed by the tool's segment as ListTools names it."""
        if len(values) > MAX_TOOL_PRICES:
            violations.add(field, f"may price at most {MAX_TOOL_PRICES} tools")
            return {}
        if values and kind == pb.INTEGRATION_KIND_WEBHOOK:
            violations.add(field, "is not for webhooks: their tools are not priced")
            return {}
        prices: dict[str, int] = {}
        for key in sorted(values):
            shown = key if len(key) <= _SHOWN_KEY else key[:_SHOWN_KEY] + "..."
            where = f"{field}[{shown}]"
            if names.tool_from_segment(key) is None:
                violations.add(where, _SEGMENT_RULE)
                continue
            prices[key] = cls._price(kind, values[key], where, violations)
        return prices

    @staticmethod
    def _retry_safe_tools(values: Sequence[str], field: str, violations: Violations) -> list[str]:
        """The retry-safe tools by segment, as ListTools names them, in the order given.

        Any kind may name them: a webhook's tools are its config's, which the
        segments need not match now (tools come and go), as for prices."""
        if len(values) > MAX_RETRY_SAFE_TOOLS:
            violations.add(field, f"may name at most {MAX_RETRY_SAFE_TOOLS} tools")
            return []
        seen: set[str] = set()
        for index, value in enumerate(values):
            if names.tool_from_segment(value) is None:
                violations.add(f"{field}[{index}]", _SEGMENT_RULE)
            elif value in seen:
                violations.add(f"{field}[{index}]", "names a tool an earlier entry names")
            seen.add(value)
        return list(values)

    @classmethod
    def _call_changes(
        cls, kind: int, given: pb.Integration, paths: Sequence[str], violations: Violations
    ) -> dict[str, Any]:
        """An update's changes to how the tools are called: prices and retry safety."""
        changes: dict[str, Any] = {}
        if "call_price_micros" in paths:
            changes["call_price_micros"] = cls._price(
                kind, given.call_price_micros, "integration.call_price_micros", violations
            )
        if "tool_call_price_micros" in paths:
            changes["tool_call_prices"] = cls._tool_prices(
                kind,
                given.tool_call_price_micros,
                "integration.tool_call_price_micros",
                violations,
            )
        if "retry_safe" in paths:
            changes["retry_safe"] = given.retry_safe
        if "retry_safe_tools" in paths:
            changes["retry_safe_tools"] = cls._retry_safe_tools(
                given.retry_safe_tools, "integration.retry_safe_tools", violations
            )
        return changes

    def _seal(self, credential: str, name: str) -> bytes:
        return self._secrets.seal(credential, purpose=name)

    # -- CRUD -----------------------------------------------------------------------------

    async def create(
        self, principal: Principal, request: pb.CreateIntegrationRequest
    ) -> pb.Integration:
        workspace_id = WorkspaceName.parse(request.parent, "parent").workspace
        given = request.integration
        violations = Violations()
        if request.integration_id and not _CLIENT_ID.fullmatch(request.integration_id):
            violations.add("integration_id", names.CLIENT_ID_RULE.must)
        kind = int(given.kind)
        if kind not in _KINDS:
            violations.add(
                "integration.kind", "must be GRPC_HANDLER, MCP_SERVER, WEBHOOK or A2A_AGENT"
            )
        integration_id = request.integration_id or names.new_id()
        if kind in _HANDLER_KINDS and integration_id in self._reserved:
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
        call_price = self._price(
            kind, given.call_price_micros, "integration.call_price_micros", violations
        )
        tool_prices = self._tool_prices(
            kind, given.tool_call_price_micros, "integration.tool_call_price_micros", violations
        )
        retry_safe_tools = self._retry_safe_tools(
            given.retry_safe_tools, "integration.retry_safe_tools", violations
        )
        violations.check()
        config = await self._checked_config(kind, given.config, "integration.config")
        endpoint = await self._endpoint(kind, given.endpoint, "integration.endpoint", violations)
        violations.check()
        if endpoint is None:  # _endpoint added the violation
            raise InvalidArgument("integration.endpoint is invalid")
        name = str(IntegrationName(workspace_id, integration_id))
        key = idempotency(principal.user_id, "CreateIntegration", request)
        values = {
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
            "call_price_micros": call_price,
            "tool_call_prices": tool_prices,
            "retry_safe": given.retry_safe,
            "retry_safe_tools": retry_safe_tools,
        }

        created = await self._catalog.created(
            name,
            key,
            lambda made: [self._event(principal, events_pb2.CHANGE_KIND_CREATED, made.record)],
            lambda staged: self._store.create(values, key, self.limits.max_per_workspace, staged),
        )
        return self._proto(created.record)

    async def _record(self, name: str, field: str) -> IntegrationRecord:
        return await find(self._store, name, field)

    async def get(self, name: str) -> pb.Integration:
        return self._proto(await self._record(name, "name"))

    async def list_integrations(
        self, request: pb.ListIntegrationsRequest
    ) -> pb.ListIntegrationsResponse:
        records, token = await self._catalog.listed(
            request.parent, request.page_size, request.page_token, default=20
        )
        return pb.ListIntegrationsResponse(
            integrations=[self._proto(record) for record in records], next_page_token=token
        )

    async def update(
        self, principal: Principal, request: pb.UpdateIntegrationRequest
    ) -> pb.Integration:
        given = request.integration
        integration = IntegrationName.parse(given.name, "integration.name")
        workspace_id, integration_id = integration.workspace, integration.integration
        paths = update_paths(request.update_mask, given, _MUTABLE)
        current = await self._store.get(workspace_id, integration_id)
        if current is None:
            raise NotFound(f"{given.name} not found")
        checked_etag(given.etag, "integration.etag")
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
        changes.update(self._call_changes(kind, given, paths, violations))
        credential: str | None = None
        if "credential" in paths:
            credential = self._credential(
                kind, given.credential, "integration.credential", violations, required=True
            )
        violations.check()
        if "config" in paths:
            changes["config"] = await self._checked_config(kind, given.config, "integration.config")
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
                    values["previous_until"] = names.now() + dt.timedelta(seconds=overlap)
                else:
                    values["previous_credential"] = None
                    values["previous_until"] = None
            return values

        record = await self._catalog.changed(
            given.name,
            lambda done: [self._event(principal, events_pb2.CHANGE_KIND_UPDATED, done)],
            lambda staged: self._store.update(
                workspace_id, integration_id, given.etag, apply, staged
            ),
        )
        return self._proto(record)

    async def delete(self, principal: Principal, name: str, etag: str) -> None:
        integration = IntegrationName.parse(name, "name")
        checked_etag(etag, "etag")
        await self._catalog.changed(
            name,
            lambda done: [self._event(principal, events_pb2.CHANGE_KIND_DELETED, done)],
            lambda staged: self._store.delete(
                integration.workspace, integration.integration, etag, staged
            ),
        )
        await self._breakers.forget(name)

    async def disable(self, workspace_id: str, integration_id: str, reason: str) -> None:
        """The server disables an integration itself (a webhook failing for long)."""
        staged: Staged[IntegrationRecord | None] = Staged(
            self._bus.outbox,
            lambda done: [self._event(None, events_pb2.CHANGE_KIND_UPDATED, done)] if done else [],
        )
        await self._store.disable(
            workspace_id, integration_id, status_bytes(code_pb2.UNAVAILABLE, reason), staged
        )
        await self._bus.publish_staged(staged.events)

    # -- watching -------------------------------------------------------------------------

    async def watch_held(
        self, access: AccessWatch, principal: Principal, parent: str
    ) -> AsyncGenerator[pb.WatchIntegrationsResponse, None]:
        """``watch`` for as long as ``principal`` may read the workspace: a caller
        removed from it, or whose credential is revoked or expires, sees the stream
        end with the status a unary call would get, even while nothing changes."""
        grant = access.open(principal)
        try:
            hold = await grant.hold(((parent, "parent"),), Permission.READ)
            async for frame in hold.guard(self.watch(parent)):
                yield frame
        finally:
            grant.close()

    async def watch(self, parent: str) -> AsyncIterator[pb.WatchIntegrationsResponse]:
        """The workspace's integrations as they stand, then every change (status included)."""
        workspace = WorkspaceName.parse(parent, "parent")
        workspace_id, scope = workspace.workspace, str(workspace)
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
        delivery = DeliveryName.parse(name, "name")
        record = await self.webhook(str(delivery.parent), "name")
        return await self._deliveries().redeliver(record.workspace_id, record.id, delivery.delivery)
