"""Schedules as resources: validation, etags, the per-workspace limit, SCHEDULE_CHANGED.

Owners create, update, pause, resume and delete them, as they define
assistants (the access table checks the role before any of this runs); members
read them and their firings. Every refusal happens before anything is stored:
the fields first (each bad one a field violation), then the assistant and the
handler, then the limit and the id, and only then a SHARED schedule's
conversation is made (through the context service's contract) and the
schedule stored with its SCHEDULE_CHANGED event (the outbox).

When it fires is ``times.py``'s; firing is ``firing.py``'s. A change that moves
the next tick wakes this process's firing loop (``on_change``).

This module does not import grpc; the servicer is transport only.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final

from google.protobuf import field_mask_pb2

from switchboard.api.context.v1 import context_pb2 as cpb
from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.api.events.v1 import events_pb2
from switchboard.dispatcher import mapping
from switchboard.dispatcher.ports.context import ContextPort
from switchboard.dispatcher.schedules import mapping as schedule_mapping
from switchboard.dispatcher.schedules import times
from switchboard.dispatcher.schedules.store import Edit, ScheduleRecord, ScheduleStore
from switchboard.platform.errors import (
    AlreadyExists,
    FieldViolation,
    InvalidArgument,
    NotFound,
    QuotaExceeded,
    Violations,
)
from switchboard.platform.events.bus import EventBus
from switchboard.platform.security.policy import Principal
from switchboard.platform.store import pagination
from switchboard.platform.store.keyed import Catalog
from switchboard.platform.store.pagination import PageTokens
from switchboard.platform.store.storage import check_etag, idempotency
from switchboard.platform.values import names, timefields
from switchboard.platform.values.fieldmask import update_paths
from switchboard.platform.values.idempotency import derived_request_id
from switchboard.platform.values.resources import (
    AssistantName,
    HandlerName,
    ScheduleName,
    WorkspaceName,
)
from switchboard.platform.values.wording import noun

log = logging.getLogger("switchboard.dispatcher.schedules.catalog")

#: What UpdateSchedule may change, in the contract's order.
MUTABLE: Final = (
    "display_name",
    "assistant",
    "handler",
    "message_template",
    "cron",
    "time_zone",
    "interval",
    "concurrency_policy",
    "missed_tick_policy",
    "timeout",
    "assistant_revision",
    "call",
)
#: Fields a create takes (``conversation_mode`` cannot change: its conversation is made once).
_CREATED: Final = (*MUTABLE, "conversation_mode")
MAX_DISPLAY_NAME: Final = 200
#: Where a schedule that calls may call: E.164.
_E164: Final = re.compile(r"^\+[1-9][0-9]{7,14}$")
MAX_TEMPLATE: Final = 16_000
#: The longest interval between ticks.
MAX_INTERVAL: Final = dt.timedelta(days=366)
MAX_TIMEOUT: Final = dt.timedelta(days=1)
_POLICIES: Final = frozenset(
    {
        pb.CONCURRENCY_POLICY_UNSPECIFIED,
        pb.CONCURRENCY_POLICY_REJECT,
        pb.CONCURRENCY_POLICY_ENQUEUE,
        pb.CONCURRENCY_POLICY_INTERRUPT,
        pb.CONCURRENCY_POLICY_STEER,
    }
)
_MISSED: Final = frozenset(pb.MissedTickPolicy.values())
_MODES: Final = frozenset(pb.ScheduleConversationMode.values())
#: What a template may name: ``{{fire_time}}``, ``{{date}}``, ``{{schedule}}`` (``render``).
PLACEHOLDERS: Final = ("fire_time", "date", "schedule")
_PLACEHOLDER: Final = re.compile(r"\{\{\s*(" + "|".join(PLACEHOLDERS) + r")\s*\}\}")
#: Anything in double braces: a placeholder, known or not (``{{dat}}`` is refused at
#: create and update rather than sent as it is).
_BRACED: Final = re.compile(r"\{\{\s*([^{}]*?)\s*\}\}")
#: A sample tick for checking that a template renders to something.
_SAMPLE: Final = dt.datetime(2000, 1, 1, tzinfo=dt.UTC)


@dataclass(frozen=True)
class ScheduleLimits:
    max_per_workspace: int
    #: The shortest interval (``SWITCHBOARD_SCHEDULES_MIN_INTERVAL_S``).
    min_interval: dt.timedelta


def render(template: str, fire_time: dt.datetime, display_name: str) -> str:
    """The message a tick sends: the placeholders filled in (``fire_time`` in the
    schedule's zone)."""
    values = {
        "fire_time": fire_time.isoformat(),
        "date": fire_time.date().isoformat(),
        "schedule": display_name,
    }
    return _PLACEHOLDER.sub(lambda found: values[found[1]], template)


def derived_id(*parts: object) -> str:
    """A request id (``names.REQUEST_ID``) that the same parts always give."""
    return derived_request_id("schedule", *parts)


def _nothing() -> None:
    """The default ``on_change``: no firing loop to wake."""


class Schedules:
    def __init__(
        self,
        store: ScheduleStore,
        bus: EventBus,
        page_tokens: PageTokens,
        context: ContextPort,
        limits: ScheduleLimits,
        *,
        assistant: Callable[[str, str, int], Awaitable[pb.Assistant | None]],
        handler_exists: Callable[[str, str], Awaitable[bool]],
        clock: Callable[[], float] = time.time,
        on_change: Callable[[], None] = _nothing,
    ) -> None:
        self._store = store
        self._catalog = Catalog(store, bus, page_tokens)
        self._pages = page_tokens
        self._context = context
        self.limits = limits
        #: The assistant a name names in a workspace at a revision (0: the current
        #: one; NotFound if none or not kept; None for "").
        self._assistant = assistant
        self._handler_exists = handler_exists
        #: Seconds since the epoch: what "now" is for next fire times (tests move it).
        self.clock = clock
        #: Called after a change that may move the next tick (wakes the firing loop).
        self.on_change = on_change

    def _now(self) -> dt.datetime:
        return dt.datetime.fromtimestamp(self.clock(), dt.UTC)

    # -- validation -----------------------------------------------------------------------

    def _check(self, given: pb.Schedule, fallback_name: str, violations: Violations) -> pb.Schedule:
        """The stored settings of a whole schedule, each bad field a violation."""
        clean = pb.Schedule()
        display_name = given.display_name.strip()
        if len(display_name) > MAX_DISPLAY_NAME:
            violations.add("schedule.display_name", f"is longer than {MAX_DISPLAY_NAME} characters")
        clean.display_name = display_name or fallback_name
        self._template(given.message_template, clean.display_name, violations)
        clean.message_template = given.message_template
        self._cadence(given, violations)
        clean.cron = " ".join(given.cron.split())
        clean.time_zone = given.time_zone
        if given.HasField("interval"):
            clean.interval.CopyFrom(given.interval)
        if given.conversation_mode not in _MODES:
            violations.add("schedule.conversation_mode", "is not a known mode: SHARED or PER_RUN")
        calls = given.HasField("call")
        clean.conversation_mode = given.conversation_mode or (
            pb.SCHEDULE_CONVERSATION_MODE_PER_RUN if calls else pb.SCHEDULE_CONVERSATION_MODE_SHARED
        )
        if calls:
            self._call(given, clean, violations)
        if given.concurrency_policy not in _POLICIES:
            violations.add(
                "schedule.concurrency_policy",
                "is not a known policy: ENQUEUE, REJECT, INTERRUPT or STEER",
            )
        clean.concurrency_policy = given.concurrency_policy or pb.CONCURRENCY_POLICY_ENQUEUE
        if given.missed_tick_policy not in _MISSED:
            violations.add("schedule.missed_tick_policy", "is not a known policy: SKIP or RUN_ONCE")
        clean.missed_tick_policy = given.missed_tick_policy or pb.MISSED_TICK_POLICY_SKIP
        if given.HasField("timeout"):
            seconds = timefields.seconds(given.timeout, "schedule.timeout")
            if not 0 < seconds <= MAX_TIMEOUT.total_seconds():
                violations.add("schedule.timeout", "must be positive and at most a day")
            clean.timeout.CopyFrom(given.timeout)
        clean.assistant = given.assistant
        clean.handler = given.handler
        if given.assistant_revision:
            if not names.is_revision(given.assistant_revision):
                violations.add("schedule.assistant_revision", "must be 0 or a revision number")
            elif not given.assistant:
                violations.add(
                    "schedule.assistant_revision",
                    "pins schedule.assistant, which must then be set",
                )
            clean.assistant_revision = given.assistant_revision
        return clean

    @staticmethod
    def _call(given: pb.Schedule, clean: pb.Schedule, violations: Violations) -> None:
        """A schedule that calls: each call makes its own conversation, and is answered by
        the schedule's assistant (the trunk and the number are PlaceCall's to check)."""
        target = given.call
        if not target.trunk or len(target.trunk) > 63:
            violations.add("schedule.call.trunk", "must name one of the server's SIP trunks")
        if not _E164.match(target.to_number):
            violations.add("schedule.call.to_number", "must be E.164: '+' and 8 to 15 digits")
        if clean.conversation_mode != pb.SCHEDULE_CONVERSATION_MODE_PER_RUN:
            violations.add(
                "schedule.conversation_mode",
                "must be PER_RUN (or unset) for a schedule that calls: each call has its own",
            )
        if not given.assistant or given.handler:
            violations.add(
                "schedule.assistant", "must name the assistant that answers the calls, no handler"
            )
        if given.assistant_revision:
            violations.add(
                "schedule.assistant_revision",
                "must be 0 for a schedule that calls: calls answer with the current revision",
            )
        clean.call.CopyFrom(target)

    @staticmethod
    def _template(template: str, display_name: str, violations: Violations) -> None:
        field = "schedule.message_template"
        if len(template) > MAX_TEMPLATE:
            violations.add(field, f"is longer than {MAX_TEMPLATE:,} characters")
            return
        unknown = sorted({found[1] for found in _BRACED.finditer(template)} - set(PLACEHOLDERS))
        if unknown:
            named = ", ".join("{{" + name + "}}" for name in unknown)
            allowed = ", ".join("{{" + name + "}}" for name in PLACEHOLDERS)
            violations.add(
                field,
                f"names {noun(len(unknown), 'an unknown placeholder', 'unknown placeholders')}"
                f" {named}: a template may name {allowed}",
            )
        elif not render(template, _SAMPLE, display_name).strip():
            violations.add(field, "renders empty: a tick would send no text")

    def _cadence(self, given: pb.Schedule, violations: Violations) -> None:
        has_interval = given.HasField("interval")
        if bool(given.cron.strip()) == has_interval:
            violations.add("schedule", "must set exactly one of cron and interval")
        if given.cron.strip():
            problem = times.cron_problem(given.cron)
            if problem:
                violations.add("schedule.cron", problem)
        if given.time_zone and timefields.zone(given.time_zone) is None:
            violations.add(
                "schedule.time_zone",
                "is not a known IANA time zone (for example Europe/Berlin); empty for UTC",
            )
        if has_interval:
            if given.time_zone:
                violations.add(
                    "schedule.time_zone", "must be empty with interval (it applies to cron only)"
                )
            seconds = timefields.seconds(given.interval, "schedule.interval")
            minimum = self.limits.min_interval.total_seconds()
            if seconds < minimum:
                violations.add("schedule.interval", f"must be at least {minimum:g} seconds")
            elif seconds > MAX_INTERVAL.total_seconds():
                violations.add("schedule.interval", "must be at most 366 days")

    async def _routing(self, workspace_id: str, clean: pb.Schedule) -> None:
        """The assistant exists (NOT_FOUND) and the handler is the assistant's or one of the
        workspace's (INVALID_ARGUMENT); checked after the fields."""
        violations = Violations()
        assistant_id = ""
        if clean.assistant:
            assistant_name = AssistantName.parse_or_none(clean.assistant)
            workspace = WorkspaceName(workspace_id)
            if assistant_name is None:
                violations.add("schedule.assistant", "must be workspaces/{w}/assistants/{a}")
            elif assistant_name.parent != workspace:
                violations.add("schedule.assistant", f"must be an assistant of {workspace}")
            else:
                assistant_id = assistant_name.assistant
        handler_id = ""
        if clean.handler:
            handler = HandlerName.parse_or_none(clean.handler)
            if handler is None:
                violations.add("schedule.handler", "must be handlers/{handler}, or empty")
            else:
                handler_id = handler.handler
        violations.check()
        if assistant_id:
            assistant = await self._assistant(
                workspace_id, clean.assistant, clean.assistant_revision
            )
            if assistant is None:
                raise NotFound(
                    f"{clean.assistant} not found", metadata={"assistant": clean.assistant}
                )
            if handler_id:
                own = assistant.handler or "handlers/llm"
                if clean.handler != own:
                    raise InvalidArgument(
                        "schedule.handler is not the assistant's",
                        [
                            FieldViolation(
                                "schedule.handler", f"must be empty or {own} (the assistant's)"
                            )
                        ],
                    )
        elif handler_id and not await self._handler_exists(workspace_id, handler_id):
            raise InvalidArgument(
                f"schedule.handler names no handler of this workspace ({clean.handler})",
                [
                    FieldViolation(
                        "schedule.handler",
                        f"names no handler of this workspace ({clean.handler}); see ListHandlers",
                    )
                ],
            )

    def _first_tick(self, settings: pb.Schedule) -> int | None:
        after = schedule_mapping.cadence(settings).after(self._now())
        return times.to_us(after) if after is not None else None

    # -- CRUD -----------------------------------------------------------------------------

    async def create(self, principal: Principal, request: pb.CreateScheduleRequest) -> pb.Schedule:
        workspace_id = WorkspaceName.parse(request.parent, "parent").workspace
        if request.schedule_id and not names.CLIENT_ID.fullmatch(request.schedule_id):
            raise InvalidArgument(
                f"schedule_id {names.CLIENT_ID_RULE.must}",
                [FieldViolation("schedule_id", names.CLIENT_ID_RULE.must)],
            )
        key = idempotency(principal.user_id, "CreateSchedule", request)
        schedule_id = request.schedule_id or names.new_id()
        violations = Violations()
        settings = self._check(request.schedule, schedule_id, violations)
        violations.check()
        await self._routing(workspace_id, settings)
        if key is not None:
            # A retry answers with the first schedule before any check that the first
            # one's existence would now fail (the limit, the id).
            first = await self._store.replayed(key)
            if first is not None:
                return schedule_mapping.message(first)
        # What the store checks again under its lock, read first so that a refusal
        # makes no conversation.
        await self._room(workspace_id, schedule_id)
        conversation_id = ""
        if settings.conversation_mode == pb.SCHEDULE_CONVERSATION_MODE_SHARED:
            conversation_id = await self._conversation(principal, workspace_id, settings, request)
        stamp = names.now()
        record = ScheduleRecord(
            workspace_id=workspace_id,
            id=schedule_id,
            uid=names.new_id(),
            data=settings.SerializeToString(deterministic=True),
            state=pb.SCHEDULE_STATE_ACTIVE,
            next_fire_us=self._first_tick(settings),
            last_fire_us=None,
            last_run="",
            conversation_id=conversation_id,
            creator=principal.user_id,
            created_at=stamp,
            updated_at=stamp,
            version=1,
        )
        actor = mapping.actor(principal)
        written = await self._catalog.created(
            str(ScheduleName(workspace_id, schedule_id)),
            key,
            lambda done: [
                schedule_mapping.changed_event(actor, events_pb2.CHANGE_KIND_CREATED, done.record)
            ],
            lambda staged: self._store.create(
                record,
                idempotency=key,
                max_per_workspace=self.limits.max_per_workspace,
                staged=staged,
            ),
        )
        self.on_change()
        return schedule_mapping.message(written.record)

    async def _room(self, workspace_id: str, schedule_id: str) -> None:
        """The limit and the id, before a conversation is made for nothing."""
        if await self._store.get(workspace_id, schedule_id) is not None:
            raise AlreadyExists(f"{ScheduleName(workspace_id, schedule_id)} already exists")
        held = await self._store.page(workspace_id, None, self.limits.max_per_workspace)
        if len(held) >= self.limits.max_per_workspace:
            raise QuotaExceeded(
                f"a workspace may hold at most {self.limits.max_per_workspace} schedules",
                subject="schedules per workspace",
            )

    async def _conversation(
        self,
        principal: Principal,
        workspace_id: str,
        settings: pb.Schedule,
        request: pb.CreateScheduleRequest,
    ) -> str:
        """A SHARED schedule's conversation, made as its creator (a retried create with
        the same request id gets the same one)."""
        made = await self._context.create_conversation(
            principal,
            cpb.CreateConversationRequest(
                parent=mapping.workspace_name(workspace_id),
                conversation=cpb.Conversation(title=settings.display_name[:200]),
                request_id=(
                    derived_id("conversation", request.request_id) if request.request_id else ""
                ),
            ),
            timeout_s=10.0,
        )
        return made.name.rsplit("/", 1)[-1]

    async def get(self, name: str) -> pb.Schedule:
        record = await self._record(name, "name")
        return schedule_mapping.message(record)

    async def _record(self, name: str, field: str) -> ScheduleRecord:
        schedule = ScheduleName.parse(name, field)
        return await self._catalog.found(name, schedule.workspace, schedule.schedule)

    async def list_schedules(self, request: pb.ListSchedulesRequest) -> pb.ListSchedulesResponse:
        records, token = await self._catalog.listed(
            request.parent, request.page_size, request.page_token, default=50
        )
        return pb.ListSchedulesResponse(
            schedules=[schedule_mapping.message(r) for r in records], next_page_token=token
        )

    async def update(self, principal: Principal, request: pb.UpdateScheduleRequest) -> pb.Schedule:
        given = request.schedule
        schedule = ScheduleName.parse(given.name, "schedule.name")
        workspace_id, schedule_id = schedule.workspace, schedule.schedule
        paths = update_paths(request.update_mask, given, MUTABLE)
        names.checked_etag(given.etag, "schedule.etag")
        current = await self._record(given.name, "schedule.name")
        merged = pb.Schedule.FromString(current.data)
        field_mask_pb2.FieldMask(paths=paths).MergeMessage(
            given, merged, replace_message_field=True, replace_repeated_field=True
        )
        violations = Violations()
        settings = self._check(merged, schedule_id, violations)
        violations.check()
        await self._routing(workspace_id, settings)
        data = settings.SerializeToString(deterministic=True)
        next_tick = self._first_tick(settings)

        def edit(record: ScheduleRecord) -> Edit:
            # A tick claimed meanwhile does not matter: the next one is computed again.
            active = record.state == pb.SCHEDULE_STATE_ACTIVE
            return Edit(data, record.state, next_tick if active else None)

        return await self._changed(principal, schedule, given.etag, edit)

    async def pause(self, principal: Principal, request: pb.PauseScheduleRequest) -> pb.Schedule:
        schedule = ScheduleName.parse(request.name, "name")
        names.checked_etag(request.etag, "etag")

        def edit(record: ScheduleRecord) -> Edit:
            return Edit(None, pb.SCHEDULE_STATE_PAUSED, None)

        return await self._changed(principal, schedule, request.etag, edit)

    async def resume(self, principal: Principal, request: pb.ResumeScheduleRequest) -> pb.Schedule:
        schedule = ScheduleName.parse(request.name, "name")
        names.checked_etag(request.etag, "etag")
        record = await self._record(request.name, "name")
        if record.state == pb.SCHEDULE_STATE_ACTIVE:
            check_etag(request.etag, record.version, "schedule")
            return schedule_mapping.message(record)
        # From the next tick after now: ticks that fell while it was paused never fire.
        next_tick = self._first_tick(pb.Schedule.FromString(record.data))

        def edit(current: ScheduleRecord) -> Edit:
            return Edit(None, pb.SCHEDULE_STATE_ACTIVE, next_tick)

        return await self._changed(principal, schedule, request.etag, edit)

    async def _changed(
        self,
        principal: Principal,
        schedule: ScheduleName,
        etag: str,
        edit: Callable[[ScheduleRecord], Edit],
    ) -> pb.Schedule:
        actor = mapping.actor(principal)
        record = await self._catalog.changed(
            str(schedule),
            lambda done: [
                schedule_mapping.changed_event(actor, events_pb2.CHANGE_KIND_UPDATED, done)
            ],
            lambda staged: self._store.update(
                schedule.workspace, schedule.schedule, etag, edit, staged
            ),
        )
        self.on_change()
        return schedule_mapping.message(record)

    async def delete(self, principal: Principal, name: str, etag: str) -> None:
        schedule = ScheduleName.parse(name, "name")
        names.checked_etag(etag, "etag")
        actor = mapping.actor(principal)
        await self._catalog.changed(
            name,
            lambda done: [
                schedule_mapping.changed_event(actor, events_pb2.CHANGE_KIND_DELETED, done)
            ],
            lambda staged: self._store.delete(schedule.workspace, schedule.schedule, etag, staged),
        )

    async def list_firings(
        self, request: pb.ListScheduleFiringsRequest
    ) -> pb.ListScheduleFiringsResponse:
        schedule = ScheduleName.parse(request.parent, "parent")
        workspace_id, schedule_id = schedule.workspace, schedule.schedule
        size = pagination.page_size(request.page_size, default=20, maximum=100)
        fingerprint = pagination.fingerprint("schedule-firings", workspace_id, schedule_id)
        before = None
        if request.page_token:
            (last,) = self._pages.decode(request.page_token, fingerprint, (pagination.MICROS,))
            before = int(last)
        elif await self._store.get(workspace_id, schedule_id) is None:
            raise NotFound(f"{request.parent} not found")
        records = await self._store.firings(workspace_id, schedule_id, before, size + 1)
        response = pb.ListScheduleFiringsResponse(
            firings=[schedule_mapping.firing(r) for r in records[:size]]
        )
        if len(records) > size:
            response.next_page_token = self._pages.encode([records[size - 1].fire_us], fingerprint)
        return response
