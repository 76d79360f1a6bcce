"""Webhook deliveries: every event of a workspace, signed, to each subscribed endpoint.

Two loops per process, over the tables of ``store.py``:

* **The feeder** turns events of the log into delivery rows: the engine is the
  consumer of a leased feeder (``platform/events/feeder.py``; one replica at a
  time, the lease in ``webhook_cursor``). It matches each event's workspace
  against that workspace's enabled webhooks and their event types, and the
  deliveries are inserted in the transaction that advances the cursor
  (compare-and-set on the holder and the old cursor). So an event becomes one
  delivery per endpoint, whatever the number of replicas and whoever crashes
  when; the unique (workspace, integration, event) key makes a repeat
  harmless. It wakes on live events and catches up every ``poll_s``. A cursor
  older than the log's horizon (the feeder was away longer than the
  retention) skips to the horizon with a warning: those events are gone. A
  new deployment starts at the log's head when its feeding replica started
  (``LeasedFeeder``). Events from before a webhook was
  created are not delivered to it.
* **The sender** claims due deliveries and POSTs them. Deliveries to one
  endpoint go out **in log order, one at a time**: a delivery is sent only
  when every earlier delivery of its endpoint has succeeded or failed for
  good, so a failing delivery holds back the later ones of its endpoint
  (never those of other endpoints) until it succeeds or runs out of
  attempts. Claims carry an expiry, so a replica that dies mid-send leaves
  its deliveries to the others after ``claim_s``; the attempt may then reach
  the receiver twice (at least once: receivers dedupe by ``webhook-id``). The
  deliveries its own process records wake it; its looks for other processes'
  come every ``poll_s``, stretched up to four times that while none are found.

The request (Standard Webhooks, https://www.standardwebhooks.com): ``POST``
with ``content-type: application/json`` and the body

    {"type": "message.created", "timestamp": "2025-01-01T00:00:00Z", "data": {...}}

``type`` is the event type in lower case with dots (``MESSAGE_CREATED`` ->
``message.created``), ``timestamp`` the event's time, ``data`` the whole
``switchboard.api.events.v1.Event`` in protobuf's JSON mapping (so
``json_format.ParseDict(body["data"], Event())`` reads it back). Headers:
``webhook-id`` (the event id, the same on every retry), ``webhook-timestamp``
(Unix seconds of this attempt) and ``webhook-signature`` (``v1,<base64
HMAC-SHA256>`` from the ``standardwebhooks`` library; during a secret
rotation, until ``previous_until``, one signature per secret, space-separated).

Retries: 2xx is success. Anything else (3xx included: redirects are not
followed), a timeout or a connection failure is a failed attempt; after
attempt *n* the next waits a uniformly random time in
``[0, min(backoff_max_s, backoff_base_s * 2**(n-1))]`` (full jitter; 30 s
base and 4 h cap by default: about 6 h of retries over 12 attempts),
never less than a ``Retry-After`` the receiver sent (capped at the
maximum). After ``max_attempts`` attempts the delivery is FAILED. An open
circuit refuses an attempt without counting it, and retries after the
circuit's cool-down. A webhook that has had no success for
``disable_after_s`` while failing is disabled through ``on_disable``, and its
pending deliveries are FAILED ("endpoint disabled"); they can be redelivered
once it is enabled again. Finished deliveries are kept ``RETENTION``.

**A2A push notification configs** are endpoints of the same engine:
per-task webhooks, whose feature lives with the A2A front door
(``a2a/push/``). A config follows its task (run): it takes the task's
``RUN_UPDATED`` status changes only, and its deliveries are ordered and
deduped by the run's own update sequence (the config's creator records the
task's earlier changes with the same keys, so a change is sent once whether
the feeder or the creator recorded it). What is sent (the body, the config's
own headers, its signing secret), disabling a config and how long one lives
are the injected ``push`` (``shared.PushNotifications``, wired in by the
composition root); the Standard Webhooks ``webhook-id`` and
``webhook-timestamp``, the signature, retries, breaker and egress checks are
the webhooks'.

This module does not import grpc.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import email.utils
import json
import logging
import random
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import httpx
from google.rpc import code_pb2
from opentelemetry import context as otel_context
from standardwebhooks.webhooks import Webhook

from switchboard.api.dispatcher.v1 import dispatcher_pb2
from switchboard.api.events.v1 import events_pb2
from switchboard.api.integration.v1 import integration_pb2
from switchboard.integration.webhooks.store import (
    PENDING,
    SUCCEEDED,
    Claimed,
    NewDelivery,
    Outcome,
    Subscriber,
    WebhookStore,
)
from switchboard.platform.background import cancel_within
from switchboard.platform.errors import (
    CircuitOpen,
    DestinationBlocked,
    FailedPrecondition,
    NotFound,
    SwitchboardError,
)
from switchboard.platform.events.bus import EventBus
from switchboard.platform.events.eventlog import Logged, Position
from switchboard.platform.events.feeder import FeedSettings, LeasedFeeder
from switchboard.platform.events.feedstore import Work
from switchboard.platform.observe import telemetry
from switchboard.platform.resilience.backoff import Backoff, IdlePoll, full_jitter
from switchboard.platform.resilience.breaker import Breakers
from switchboard.platform.security.credentials.secretbox import SecretBox
from switchboard.platform.security.egress import EgressPolicy, ResolutionFailed, http_client
from switchboard.platform.store import pagination
from switchboard.platform.store.db import Database, log_failure
from switchboard.platform.store.models import WebhookCursorRow
from switchboard.platform.values import structs
from switchboard.platform.values.names import new_id, now
from switchboard.platform.values.resources import (
    DeliveryName,
    IntegrationName,
    PushConfigName,
    RunName,
    WorkspaceName,
)
from switchboard.shared import PushNotifications

if TYPE_CHECKING:
    from switchboard.integration.settings import IntegrationSettings
    from switchboard.platform.store.models import WebhookDeliveryRow

log = logging.getLogger("switchboard.integration.webhooks.delivery")

#: Finished (succeeded or failed) deliveries are deleted this long after they were recorded.
RETENTION: Final = dt.timedelta(days=7)
#: Events read from the log per feeder transaction.
FEED_BATCH: Final = 200
#: Rows deleted per pruning transaction, and how often pruning runs.
PRUNE_BATCH: Final = 1000
MAINTAIN_EVERY_S: Final = 60.0
#: Response body bytes kept for ``last_error``.
SNIPPET_BYTES: Final = 200
MAX_ERROR_CHARS: Final = 500
#: Bound on a graceful close's own database calls.
CLOSE_TIMEOUT_S: Final = 5.0
USER_AGENT: Final = "Switchboard-Webhooks/1"
_DISABLED_ERROR: Final = "endpoint disabled"
# A Redis stream entry id is (milliseconds, counter); the embedded log's is (seq, 0).
_MINOR_BITS: Final = 20
_MINOR_MAX: Final = (1 << _MINOR_BITS) - 1
_UNPRINTABLE: Final = re.compile(r"[^\x20-\x7e]+")

#: ``(workspace_id, integration_id, reason)``: disable the webhook and announce it.
OnDisable = Callable[[str, str, str], Awaitable[None]]
_ENDED_RUNS: Final = frozenset(
    {
        dispatcher_pb2.RUN_STATE_SUCCEEDED,
        dispatcher_pb2.RUN_STATE_FAILED,
        dispatcher_pb2.RUN_STATE_CANCELLED,
    }
)


def status_change(event: events_pb2.Event) -> dispatcher_pb2.RunUpdate | None:
    """The run update a ``RUN_UPDATED`` event carries, if it is a status change: what
    an endpoint that follows a task (a push config) is fed."""
    if event.WhichOneof("payload") != "run_updated":
        return None
    update = event.run_updated.update
    return update if update.WhichOneof("update") == "state_change" else None


def _announces_webhook(event: events_pb2.Event) -> bool:
    """An INTEGRATION_CHANGED about a webhook that is (still) enabled."""
    if event.type != events_pb2.EVENT_TYPE_INTEGRATION_CHANGED:
        return False
    change = event.integration_changed
    return (
        change.integration.kind == integration_pb2.INTEGRATION_KIND_WEBHOOK
        and change.change != events_pb2.CHANGE_KIND_DELETED
        and not change.integration.disabled
    )


@dataclass(frozen=True)
class WebhookLimits:
    """How deliveries are timed; ``from_settings`` for the configured ones."""

    #: One attempt (connect, send, answer) ends after this.
    timeout_s: float = 15.0
    max_attempts: int = 12
    #: A webhook failing without a success this long is disabled.
    disable_after_s: float = 86_400.0
    backoff_base_s: float = 30.0
    backoff_max_s: float = 4 * 3600.0
    #: The feeder's lease; another replica takes over this long after a holder died.
    lease_s: float = 15.0
    #: Catch-up period of the feeder and of the sender (deliveries recorded by other replicas).
    poll_s: float = 1.0
    #: Endpoints sent to at once by one process.
    max_in_flight: int = 32
    #: How long a claim holds a delivery; 0: the attempt's timeout plus 30 s.
    claim_s: float = 0.0

    @classmethod
    def from_settings(cls, settings: IntegrationSettings) -> WebhookLimits:
        return cls(
            timeout_s=settings.webhook_timeout_s,
            max_attempts=settings.webhook_max_attempts,
            disable_after_s=settings.webhook_disable_after_s,
        )

    @property
    def claim_for_s(self) -> float:
        return self.claim_s or self.timeout_s + 30.0


@dataclass(frozen=True)
class Attempt:
    """What one POST came back with."""

    status: int
    error: str
    retry_after_s: float | None = None


def type_name(event_type: int) -> str:
    """``MESSAGE_CREATED`` for ``EVENT_TYPE_MESSAGE_CREATED`` (the subscription's spelling)."""
    try:
        name = events_pb2.EventType.Name(event_type)  # type: ignore[arg-type]
    except ValueError:
        return str(event_type)
    return name.removeprefix("EVENT_TYPE_")


def payload(event: events_pb2.Event) -> str:
    """The JSON body delivered for ``event`` (see the module doc). A number that is
    not finite in one of its JSON values (stored before such numbers were refused)
    is ``null``: JSON has none, and protobuf's JSON mapping raises on them."""
    body = {
        "type": type_name(event.type).lower().replace("_", "."),
        "timestamp": event.time.ToJsonString(),
        "data": structs.message_dict(event),
    }
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def signature(secrets: Sequence[str], msg_id: str, timestamp: dt.datetime, body: str) -> str:
    """The ``webhook-signature`` header: one ``v1,...`` per secret, space-separated."""
    return " ".join(Webhook(secret).sign(msg_id, timestamp, body) for secret in secrets)


def signed_headers(secrets: Sequence[str], msg_id: str, body: str) -> dict[str, str]:
    """The Standard Webhooks headers of a request sent now: ``webhook-id``,
    ``webhook-timestamp`` and, with secrets, ``webhook-signature``."""
    sent_at = now()
    headers = {"webhook-id": msg_id, "webhook-timestamp": str(int(sent_at.timestamp()))}
    if secrets:
        headers["webhook-signature"] = signature(secrets, msg_id, sent_at, body)
    return headers


def webhook_client(egress: EgressPolicy, *, timeout_s: float, in_flight: int) -> httpx.AsyncClient:
    """The client webhook requests go out by (deliveries and webhook tools): the egress
    policy checks every connection, redirects are returned and not followed, each phase
    ends after ``timeout_s``, and ``in_flight`` requests are kept alive at most."""
    return http_client(
        egress,
        timeout_s=timeout_s,
        headers={"user-agent": USER_AGENT, "content-type": "application/json"},
        limits=httpx.Limits(max_connections=in_flight * 2, max_keepalive_connections=in_flight),
    )


def retry_delay(
    failures: int,
    *,
    base_s: float,
    max_s: float,
    retry_after_s: float | None,
    rng: random.Random,
) -> float:
    """Seconds before the next attempt after ``failures`` failed ones (full jitter)."""
    return full_jitter(failures - 1, base_s=base_s, max_s=max_s, rng=rng, at_least_s=retry_after_s)


def parse_retry_after(value: str | None, current: dt.datetime) -> float | None:
    """``Retry-After`` as seconds (delta-seconds or an HTTP date); None if absent or malformed."""
    if not value:
        return None
    text = value.strip()
    if text.isascii() and text.isdigit() and len(text) <= 10:
        return float(text)
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return max(0.0, (when - current).total_seconds())


def sequence_of(position: Position) -> int:
    """A delivery's ``seq``: the log position as one 63-bit integer, in log order."""
    major, minor = position
    return (major << _MINOR_BITS) | min(minor, _MINOR_MAX)


def safe_text(raw: bytes | str, limit: int = SNIPPET_BYTES) -> str:
    """Printable ASCII only, at most ``limit`` characters (for ``last_error``)."""
    text = raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else raw
    return _UNPRINTABLE.sub(" ", text).strip()[:limit]


def delivery_message(row: WebhookDeliveryRow) -> integration_pb2.WebhookDelivery:
    message = integration_pb2.WebhookDelivery(
        name=str(DeliveryName(row.workspace_id, row.integration_id, row.id)),
        event_id=row.event_id,
        event_type=row.event_type,
        state=row.state,  # type: ignore[arg-type]
        attempts=row.attempts,
        last_http_status=row.last_http_status,
        last_error=row.last_error,
    )
    message.create_time.FromDatetime(row.created_at)
    if row.last_attempt_at is not None:
        message.last_attempt_time.FromDatetime(row.last_attempt_at)
    if row.state == PENDING and row.next_attempt_at is not None:
        message.next_attempt_time.FromDatetime(row.next_attempt_at)
    return message


def _workspace_of(item: Logged) -> str | None:
    """The id of the workspace an event belongs to; None if it belongs to none."""
    name = WorkspaceName.parse_or_none(item.workspace)
    return name.workspace if name is not None else None


def _matches(subscriber: Subscriber, item: Logged, created: dt.datetime) -> bool:
    if subscriber.task is not None:
        # A push config takes its task's changes whenever they are read: the
        # ones before it was stored are recorded by its creator, keyed alike.
        update = status_change(item.event)
        return update is not None and update.state_change.run.name == str(
            RunName(subscriber.workspace_id, *subscriber.task)
        )
    if created < subscriber.created_at:
        return False
    return not subscriber.event_types or type_name(item.type) in subscriber.event_types


def _delivery(subscriber: Subscriber, item: Logged) -> NewDelivery:
    if subscriber.task is not None:
        update = status_change(item.event)
        if update is None:  # pragma: no cover - _matches took only status changes
            raise ValueError("not a status change")
        return NewDelivery(
            id=new_id(),
            workspace_id=subscriber.workspace_id,
            integration_id=subscriber.integration_id,
            seq=update.sequence,
            event_id=str(update.sequence),
            event_type=type_name(item.type),
            data=item.data,
            ends_task=update.state_change.run.state in _ENDED_RUNS,
        )
    return NewDelivery(
        id=new_id(),
        workspace_id=subscriber.workspace_id,
        integration_id=subscriber.integration_id,
        seq=sequence_of(item.position),
        event_id=item.event.id,
        event_type=type_name(item.type),
        data=item.data,
    )


def describe(exc: BaseException, timeout_s: float) -> str:
    """A failed attempt's cause, without addresses or exception text from the network."""
    if isinstance(exc, TimeoutError | httpx.TimeoutException):
        return f"timed out after {timeout_s:g} s"
    if isinstance(exc, DestinationBlocked):
        return "the destination address is not allowed by the egress policy"
    if isinstance(exc, ResolutionFailed):
        return "the host name could not be resolved"
    if isinstance(exc, httpx.ConnectError):
        return "the connection failed"
    if isinstance(exc, httpx.RemoteProtocolError | httpx.LocalProtocolError):
        return "the receiver broke the HTTP protocol"
    if isinstance(exc, httpx.HTTPError | OSError):
        return "the request failed"
    return "the request failed"


@dataclass(frozen=True)
class _Request:
    """One attempt's request: the breaker's name, the ``webhook-id``, the body, the
    signing secrets (none: unsigned) and the endpoint's own headers."""

    name: str
    msg_id: str
    body: str
    secrets: Sequence[str]
    headers: dict[str, str]


class WebhookEngine:
    """The feeder, the sender and the queries of webhook deliveries in one process.

    ``start()`` runs the loops; ``close()`` stops them, hands this process's
    claims and lease back (so another replica continues at once) within a
    bounded time.
    """

    def __init__(
        self,
        database: Database,
        bus: EventBus,
        secrets: SecretBox,
        egress: EgressPolicy,
        breakers: Breakers,
        limits: WebhookLimits,
        *,
        instance_id: str,
        on_disable: OnDisable,
        page_tokens: pagination.PageTokens,
        push: PushNotifications | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.store = WebhookStore(database)
        self._push = push
        self._secrets = secrets
        self._egress = egress
        self._breakers = breakers
        self.limits = limits
        self._me = instance_id
        self._on_disable = on_disable
        self._pages = page_tokens
        self._rng = rng or random.SystemRandom()
        #: Each attempt is a trace of its own (docs/observability.md); None when off.
        self._tracer = telemetry.tracer("switchboard.integration.webhooks.delivery")
        self._send_wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._workers: set[asyncio.Task[None]] = set()
        self._client: httpx.AsyncClient | None = None
        self._feeder = LeasedFeeder(
            database,
            bus,
            WebhookCursorRow,
            self,
            FeedSettings(
                name="webhook feeder",
                lease_s=limits.lease_s,
                poll_s=limits.poll_s,
                batch=FEED_BATCH,
                gap_warning="webhook feeder cursor is outside the retained event log; events "
                "in between are not delivered",
            ),
            instance_id=instance_id,
            log=log,
        )
        #: Workspaces with an enabled webhook, as of the feed position (None: read them).
        self._subscribed: set[str] | None = None

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        self._client = webhook_client(
            self._egress, timeout_s=self.limits.timeout_s, in_flight=self.limits.max_in_flight
        )
        await self._feeder.start()
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._send_loop(), name="webhook-sender"),
            loop.create_task(self._maintain_loop(), name="webhook-maintenance"),
        ]

    async def close(self, *, release: bool = True) -> None:
        """Stop; ``release=False`` leaves claims and lease to expire (as a crash would)."""
        await self._feeder.close(release=release)
        tasks = [*self._tasks, *self._workers]
        self._tasks = []
        if stuck := await cancel_within(tasks, CLOSE_TIMEOUT_S):
            log.warning(
                "webhook tasks did not stop at close",
                extra={"tasks": sorted(task.get_name() for task in stuck)},
            )
        if release:
            try:
                async with asyncio.timeout(CLOSE_TIMEOUT_S):
                    await self.store.release(self._me)
            except Exception as exc:  # noqa: BLE001 - the claims expire by themselves
                log_failure(log, "webhook claims not released at close", exc)
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    # -- the feeder's consumer (``LogConsumer``) -------------------------------------------

    def wakes(self, event: events_pb2.Event) -> bool:
        """Only events a webhook may want wake the feeder; the others are passed over in
        its next round (memory only), whenever that comes."""
        subscribed = self._subscribed
        return bool(event.workspace) and (
            subscribed is None
            or event.workspace.removeprefix("workspaces/") in subscribed
            or _announces_webhook(event)
            # A push config may have been made since the set was read (no event says so).
            # A token is not in the log the feeder reads: it wakes nothing.
            or (
                self._push is not None
                and event.type == events_pb2.EVENT_TYPE_RUN_UPDATED
                and event.run_updated.update.WhichOneof("update") not in ("delta", "speech")
            )
        )

    async def taken(self) -> None:
        """Nothing to repair: a webhook gets what follows its creation only."""

    async def renewed(self) -> None:
        self._subscribed = None  # read again with each lease renewal

    def gap(self) -> Work | None:
        return None  # the events are gone: not delivered

    def written(self, count: int) -> None:
        self._send_wake.set()

    async def _pushed(self, items: Sequence[Logged]) -> bool:
        """Whether a status change in ``items`` is in a workspace that gained a push config
        since the cached set was read (configs are made without an event in the log)."""
        if self._push is None:
            return False
        workspaces = {
            workspace
            for item in items
            if (workspace := _workspace_of(item)) and status_change(item.event) is not None
        }
        if not workspaces:
            return False
        found = await self.store.pushed_workspaces(sorted(workspaces))
        if self._subscribed is not None:
            self._subscribed |= found
        return bool(found)

    @staticmethod
    def _concern_webhooks(items: Sequence[Logged], subscribed: set[str]) -> bool:
        """Whether any of ``items`` belongs to a workspace that has (or gains) a webhook.

        In log order: a webhook's own INTEGRATION_CHANGED adds its workspace
        before the events after it are looked at, so a webhook created just
        now gets what follows its creation even before the set is read again.
        """
        found = False
        for item in items:
            workspace = _workspace_of(item)
            if workspace is None:
                continue
            if _announces_webhook(item.event):
                subscribed.add(workspace)
            if workspace in subscribed:
                found = True
        return found

    async def taking(self, items: Sequence[Logged]) -> Work | None:
        """The deliveries ``items`` make; None if they concern no webhook."""
        if self._subscribed is None:
            self._subscribed = await self.store.subscribed_workspaces()
        if not self._concern_webhooks(items, self._subscribed) and not await self._pushed(items):
            return None
        # In log order, each once.
        workspaces = list(dict.fromkeys(w for item in items if (w := _workspace_of(item))))

        def deliveries(subscribers: list[Subscriber]) -> list[NewDelivery]:
            by_workspace: dict[str, list[Subscriber]] = {}
            for subscriber in subscribers:
                by_workspace.setdefault(subscriber.workspace_id, []).append(subscriber)
            rows: list[NewDelivery] = []
            for item in items:
                mine = by_workspace.get(_workspace_of(item) or "")
                if not mine:
                    continue
                created = item.event.time.ToDatetime(tzinfo=dt.UTC)
                for subscriber in mine:
                    if _matches(subscriber, item, created):
                        rows.append(_delivery(subscriber, item))
            return rows

        return self.store.recording(deliveries, workspaces)

    # -- the sender ------------------------------------------------------------------

    async def _send_loop(self) -> None:
        backoff = Backoff(0.1, self.limits.poll_s * 5)
        # Deliveries recorded here, and a worker done, wake the sender; the looks
        # between are for other processes' deliveries, less often while none come.
        idle = IdlePoll(self.limits.poll_s)
        while True:
            wait_s = self.limits.poll_s
            free = self.limits.max_in_flight - len(self._workers)
            self._send_wake.clear()
            if free > 0:
                until = now() + dt.timedelta(seconds=self.limits.claim_for_s)
                try:
                    claimed, due = await self.store.claim(self._me, until, free)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # noqa: BLE001 - retried after a pause
                    log_failure(log, "webhook claim failed", exc)
                    await backoff.wait()
                    continue
                backoff.reset()
                for delivery in claimed:
                    self._spawn(delivery)
                wait_s = idle.after(found=bool(claimed))
                if due is not None:
                    wait_s = min(wait_s, max(0.0, (due - now()).total_seconds()))
                if len(claimed) == free:
                    wait_s = 0.0  # there may be more due
            if wait_s > 0:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait_s):
                        await self._send_wake.wait()
                        idle.reset()

    def _spawn(self, claimed: Claimed) -> None:
        task = asyncio.get_running_loop().create_task(
            self._work(claimed), name=f"webhook-{claimed.id}"
        )
        self._workers.add(task)

        def done(finished: asyncio.Task[None]) -> None:
            self._workers.discard(finished)
            self._send_wake.set()

        task.add_done_callback(done)

    async def _work(self, claimed: Claimed) -> None:
        """Send ``claimed``, then each following delivery of its endpoint that is due."""
        current: Claimed | None = claimed
        while current is not None:
            try:
                current = await self._deliver(current)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - its claim expires; another round retries
                log_failure(log, "webhook delivery not recorded", exc)
                return

    async def _deliver(self, claimed: Claimed) -> Claimed | None:
        outcome = await self._attempt(claimed)
        until = now() + dt.timedelta(seconds=self.limits.claim_for_s)
        recorded, following = await self.store.record(claimed, self._me, outcome, until)
        if recorded and not outcome.succeeded:
            await self._maybe_disable(claimed, outcome)
        return following

    def _signing_secrets(self, claimed: Claimed, name: str) -> list[str]:
        if claimed.credential is None:
            return []
        secrets = [self._secrets.open(claimed.credential, purpose=name)]
        if (
            claimed.previous_credential is not None
            and claimed.previous_until is not None
            and claimed.previous_until > now()
        ):
            secrets.append(self._secrets.open(claimed.previous_credential, purpose=name))
        return secrets

    def _failed(
        self, claimed: Claimed, status: int, error: str, retry_after_s: float | None
    ) -> Outcome:
        failures = claimed.attempts + 1
        if failures >= self.limits.max_attempts:
            return Outcome(False, status, error, None)
        delay = retry_delay(
            failures,
            base_s=self.limits.backoff_base_s,
            max_s=self.limits.backoff_max_s,
            retry_after_s=retry_after_s,
            rng=self._rng,
        )
        return Outcome(False, status, error, now() + dt.timedelta(seconds=delay))

    def _shape(self, claimed: Claimed) -> _Request | Outcome:
        """What one attempt sends: a webhook's Standard Webhooks event, signed with its
        secrets, or a push config's A2A body with its own headers; else why it cannot."""
        event = events_pb2.Event.FromString(claimed.data)
        if claimed.push is None:
            name = str(IntegrationName(claimed.workspace_id, claimed.integration_id))
            try:
                secrets = self._signing_secrets(claimed, name)
            except Exception:  # noqa: BLE001 - a sealed secret this server cannot open
                log.warning("webhook signing secret cannot be opened", extra={"integration": name})
                return self._failed(claimed, 0, "the signing secret cannot be read", None)
            if not secrets:
                return self._failed(claimed, 0, "the webhook has no signing secret", None)
            return _Request(name, claimed.event_id, payload(event), secrets, {})
        name = str(PushConfigName(claimed.workspace_id, claimed.integration_id))
        if self._push is None:
            raise RuntimeError("push configs are delivered without their feature")
        target = claimed.push
        try:
            extra, secret = self._push.headers(
                claimed.workspace_id,
                claimed.integration_id,
                target.token,
                target.auth_scheme,
                target.credentials,
            )
        except Exception:  # noqa: BLE001 - a sealed secret this server cannot open
            log.warning("push config secret cannot be opened", extra={"endpoint": name})
            return self._failed(claimed, 0, "the config's secrets cannot be read", None)
        # Unique per config and status change, the same on every retry.
        msg_id = f"{claimed.integration_id}.{claimed.event_id}"
        secrets = [secret] if secret else []
        return _Request(name, msg_id, self._push.body(event), secrets, extra)

    async def _attempt(self, claimed: Claimed) -> Outcome:
        try:
            request = self._shape(claimed)
        except Exception:
            # An event that cannot be made into a request (a bug, or what was stored):
            # a failed attempt like any other, so it fails for good after
            # max_attempts instead of holding its endpoint's queue forever.
            log.error(
                "webhook delivery cannot be shaped into a request",
                exc_info=True,
                extra={"workspace": claimed.workspace_id, "endpoint": claimed.integration_id},
            )
            return self._failed(claimed, 0, "the event could not be made into a request", None)
        if isinstance(request, Outcome):
            return request
        name = request.name
        try:
            permit = await self._breakers.acquire(name, label=f"integration {name}")
        except CircuitOpen as exc:
            retry_s = max(0.1, exc.retry_after_s)
            return Outcome(
                False,
                0,
                "the circuit is open after repeated failures",
                now() + dt.timedelta(seconds=retry_s),
                counted=False,
            )
        try:
            with self._traced(claimed, request):
                answer = await self._post(claimed.endpoint, request)
        except asyncio.CancelledError:
            permit.released()
            raise
        except DestinationBlocked as exc:
            # The receiver was never contacted: says nothing about its health.
            permit.released()
            return self._failed(claimed, 0, describe(exc, self.limits.timeout_s), None)
        except (TimeoutError, httpx.HTTPError, OSError, SwitchboardError) as exc:
            await permit.failed()
            return self._failed(claimed, 0, describe(exc, self.limits.timeout_s), None)
        except Exception:
            # Unforeseen (a bug, or what the receiver's answer did to the client): a
            # failed attempt like any other, counted, and retried on the schedule;
            # its traceback is the log's, never the delivery's error.
            await permit.failed()
            log.error("webhook attempt failed unexpectedly", exc_info=True, extra={"webhook": name})
            return self._failed(claimed, 0, "the request failed unexpectedly", None)
        except BaseException:
            permit.released()
            raise
        if 200 <= answer.status < 300:
            await permit.succeeded()
            return Outcome(True, answer.status, "", None)
        await permit.failed()
        return self._failed(claimed, answer.status, answer.error, answer.retry_after_s)

    def _traced(
        self, claimed: Claimed, request: _Request
    ) -> contextlib.AbstractContextManager[object]:
        """A root span for one attempt, so its POST is sampled as a new trace is: the
        send loop has no request behind it, and a client span without a parent
        starts no trace (``telemetry.NoBackgroundRoots``)."""
        if self._tracer is None:
            return contextlib.nullcontext()
        return self._tracer.start_as_current_span(
            "webhook delivery",
            context=otel_context.Context(),
            attributes={
                "switchboard.webhook": request.name,
                "switchboard.event": claimed.event_id,
                "switchboard.webhook.attempt": claimed.attempts + 1,
            },
        )

    async def _post(self, endpoint: str, request: _Request) -> Attempt:
        client = self._client
        if client is None:
            raise RuntimeError("the webhook engine is not started")
        headers = {
            **request.headers,
            **signed_headers(request.secrets, request.msg_id, request.body),
        }
        body = request.body.encode()
        # The client's timeout bounds each phase; this bounds the whole attempt.
        async with (
            asyncio.timeout(self.limits.timeout_s),
            client.stream("POST", endpoint, content=body, headers=headers) as r,
        ):
            if 200 <= r.status_code < 300:
                return Attempt(r.status_code, "")
            snippet = b""
            async for chunk in r.aiter_raw():
                snippet += chunk
                if len(snippet) >= SNIPPET_BYTES:
                    break
            error = f"HTTP {r.status_code}"
            if text := safe_text(snippet):
                error = f"{error}: {text}"
            return Attempt(
                r.status_code,
                error[:MAX_ERROR_CHARS],
                parse_retry_after(r.headers.get("retry-after"), now()),
            )

    async def _maybe_disable(self, claimed: Claimed, outcome: Outcome) -> None:
        since = await self.store.failing_since(claimed)
        failing_s = (now() - since).total_seconds()
        if failing_s < self.limits.disable_after_s:
            return
        reason = (
            f"webhook disabled: no successful delivery for {failing_s:.0f} s; "
            f"last error: {outcome.error or 'none'}"
        )[:MAX_ERROR_CHARS]
        if claimed.push is not None:
            # Nobody watches a push config's status: it stops, and its client
            # finds it gone from its task's list once pruned.
            log.warning(
                "disabling a failing push config",
                extra={"workspace": claimed.workspace_id, "endpoint": claimed.integration_id},
            )
            if self._push is not None:  # it is: a push config was attempted (``_shape``)
                await self._push.disable(claimed.workspace_id, claimed.integration_id)
        else:
            name = str(IntegrationName(claimed.workspace_id, claimed.integration_id))
            log.warning("disabling a failing webhook", extra={"integration": name})
            await self._on_disable(claimed.workspace_id, claimed.integration_id, reason)
        await self.store.fail_disabled(_DISABLED_ERROR)

    # -- maintenance -----------------------------------------------------------------

    async def _maintain_loop(self) -> None:
        while True:
            try:
                if self._feeder.feeding:
                    await self.maintain()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - tried again next period
                log_failure(log, "webhook maintenance failed", exc)
            await asyncio.sleep(MAINTAIN_EVERY_S)  # a period, not synchronization

    async def maintain(self) -> None:
        """Fail what waits for disabled endpoints; delete finished deliveries past ``RETENTION``."""
        await self.store.fail_disabled(_DISABLED_ERROR)
        current = now()
        before = current - RETENTION
        while await self.store.prune(before, PRUNE_BATCH) == PRUNE_BATCH:
            pass
        while await self.store.prune_orphans(PRUNE_BATCH) == PRUNE_BATCH:
            pass
        while self._push is not None and await self._push.prune(current) > 0:
            pass

    # -- queries and commands ----------------------------------------------------------

    async def list_deliveries(
        self, workspace_id: str, integration_id: str, *, page_size: int, page_token: str
    ) -> tuple[list[integration_pb2.WebhookDelivery], str]:
        """The webhook's deliveries, newest first, and the next page's token ("" at the end)."""
        fingerprint = pagination.fingerprint("webhook-deliveries", workspace_id, integration_id)
        before: tuple[int, str] | None = None
        if page_token:
            seq, last = self._pages.decode(
                page_token, fingerprint, (pagination.COUNT, pagination.ID)
            )
            before = (int(seq), str(last))
        rows = await self.store.page(workspace_id, integration_id, page_size + 1, before)
        token = ""
        if len(rows) > page_size:
            rows = rows[:page_size]
            token = self._pages.encode([rows[-1].seq, rows[-1].id], fingerprint)
        return [delivery_message(row) for row in rows], token

    async def redeliver(
        self, workspace_id: str, integration_id: str, delivery_id: str
    ) -> integration_pb2.WebhookDelivery:
        """Send the delivery again as a new attempt series (attempts start from 0).

        It goes out before the endpoint's later pending deliveries (it keeps its
        place in log order). A pending one is left as it is.
        """
        webhook = await self.store.webhook(workspace_id, integration_id)
        name = str(DeliveryName(workspace_id, integration_id, delivery_id))
        if webhook is None:
            raise NotFound(f"{name} not found")
        if webhook[1]:
            raise FailedPrecondition(
                f"{IntegrationName(workspace_id, integration_id)} is disabled; enable it to "
                "redeliver"
            )
        row = await self.store.redeliver(workspace_id, integration_id, delivery_id)
        if row is None:
            raise NotFound(f"{name} not found")
        self._send_wake.set()
        return delivery_message(row)

    async def health(self, workspace_id: str, integration_id: str) -> tuple[int, str] | None:
        """The webhook's health from its latest attempted delivery: (google.rpc code, error).

        None if nothing was attempted yet. OK after a success; UNAVAILABLE with
        the delivery's error after a failed attempt (retrying or given up).
        """
        row = await self.store.last_attempted(workspace_id, integration_id)
        if row is None:
            return None
        if row.state == SUCCEEDED:
            return code_pb2.OK, ""
        return code_pb2.UNAVAILABLE, row.last_error or f"HTTP {row.last_http_status}"
