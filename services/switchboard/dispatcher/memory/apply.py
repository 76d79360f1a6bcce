"""Applying a stored plan, decision by decision, exactly once each, and announcing it.

Each decision is applied through the context port as the run's creator, then its
MEMORY_DECIDED event is published, then the plan's ``done`` moves past it (a write
guarded by the job's claim). A worker that dies anywhere leaves the job to be
retaken with its plan: decisions before ``done`` are passed over; the one in
flight is applied again and is idempotent:

* ADD creates the item with its derived ``memory_item_id`` (ALREADY_EXISTS: it was);
* UPDATE creates it the same way with ``supersedes`` (the context service retires
  the old item in the same transaction); FAILED_PRECONDITION (the old one was
  retired meanwhile): the item is created without it, unless it exists already;
* INVALIDATE sets the item's ``invalid_time`` and ``invalid_reason``; an item
  retired already, or gone, is left as it is (NONE, "already retired").

Events are partitioned as the items are: a decision of a user's scope goes to that
user only (``user``), a workspace's to the workspace (``workspace``); an
exchange's outcome (FAILED, PAUSED) to its workspace and conversation, and it says
nothing of what the model answered.
"""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import Sequence
from typing import Final

from google.protobuf import field_mask_pb2

from switchboard.api.context.v1 import context_pb2 as cpb
from switchboard.api.events.v1 import events_pb2
from switchboard.dispatcher.memory.plans.plan import Decision, Exchange, Plan
from switchboard.dispatcher.memory.store import Job, JobStore
from switchboard.dispatcher.ports.context import ContextPort
from switchboard.platform.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
)
from switchboard.platform.events.bus import EventBus
from switchboard.platform.security.policy import Principal
from switchboard.platform.values import memorypolicy
from switchboard.platform.values.memorypolicy import CATEGORY_KINDS
from switchboard.platform.values.names import now

_ACTIONS: Final = {
    "add": events_pb2.MEMORY_DECISION_ACTION_ADD,
    "update": events_pb2.MEMORY_DECISION_ACTION_UPDATE,
    "invalidate": events_pb2.MEMORY_DECISION_ACTION_INVALIDATE,
    "none": events_pb2.MEMORY_DECISION_ACTION_NONE,
    "merge": events_pb2.MEMORY_DECISION_ACTION_MERGE,
    "expire": events_pb2.MEMORY_DECISION_ACTION_EXPIRE,
}
SYSTEM: Final = events_pb2.Actor(name="system")
#: Messages one item may cite (the context service's limit).
MAX_SOURCES: Final = 50


def sources_of(exchange: Exchange) -> list[str]:
    """The messages a formed item came from: its exchange's (the latest, at most
    ``MAX_SOURCES``)."""
    names = [
        name
        for turn in exchange.turns
        for name in (turn.input_message, turn.output_message)
        if name
    ]
    return names[-MAX_SOURCES:]


class ClaimLost(Exception):
    """Another worker holds the job now: this one stops writing."""


def decided_event(
    scope: str,
    action: str,
    *,
    item: str = "",
    replaces: str = "",
    candidate: str = "",
    reason: str = "",
    run: str = "",
    assistant: str = "",
    outcome: events_pb2.MemoryFormingOutcome.ValueType = (
        events_pb2.MEMORY_FORMING_OUTCOME_UNSPECIFIED
    ),
    actor: events_pb2.Actor = SYSTEM,
) -> events_pb2.Event:
    """A MEMORY_DECIDED on ``scope``'s partition (a user's, or a workspace's)."""
    event = events_pb2.Event(type=events_pb2.EVENT_TYPE_MEMORY_DECIDED, actor=actor)
    if scope.startswith("users/"):
        event.user = scope
    else:
        event.workspace = scope
    event.memory_decided.CopyFrom(
        events_pb2.MemoryDecided(
            action=_ACTIONS[action],
            memory_item=item,
            replaces=replaces,
            candidate=candidate,
            reason=reason,
            outcome=outcome,
            run=run,
            assistant=assistant,
        )
    )
    return event


def outcome_event(
    job: Job,
    exchange: Exchange,
    outcome: events_pb2.MemoryFormingOutcome.ValueType,
    reason: str,
) -> events_pb2.Event:
    """An exchange's FAILED or PAUSED, on its workspace and conversation."""
    event = events_pb2.Event(
        type=events_pb2.EVENT_TYPE_MEMORY_DECIDED,
        actor=SYSTEM,
        workspace=f"workspaces/{job.workspace_id}",
        conversation=job.conversation,
    )
    event.memory_decided.CopyFrom(
        events_pb2.MemoryDecided(
            outcome=outcome,
            reason=reason,
            run=exchange.turns[-1].run if exchange.turns else "",
            assistant=exchange.assistant,
        )
    )
    return event


class Applier:
    def __init__(
        self, context: ContextPort, bus: EventBus, store: JobStore, *, timeout_s: float
    ) -> None:
        self._context = context
        self._bus = bus
        self._store = store
        self._timeout_s = timeout_s

    async def apply(self, job: Job, exchange: Exchange, plan: Plan) -> None:
        """Apply ``plan``'s decisions from ``plan.done`` on (``ClaimLost`` if the job
        was taken over meanwhile)."""
        principal = Principal.acting_for(exchange.user_id)
        policy = memorypolicy.effective(cpb.MemoryPolicy.FromString(exchange.policy))
        run = exchange.turns[-1].run if exchange.turns else ""
        formation = cpb.MemoryFormation(
            assistant=exchange.assistant, policy=exchange.source, model=plan.model, run=run
        )
        learned = exchange.turns[-1].time if exchange.turns else now()
        sources = sources_of(exchange)
        actor = events_pb2.Actor(name=f"users/{exchange.user_id}")
        for index in range(plan.done, len(plan.decisions)):
            decision = plan.decisions[index]
            action, reason = decision.action, decision.reason
            if action in ("add", "update"):
                item = _item(decision, job, formation, sources, learned, policy)
                action = await self._create(principal, decision, item)
                if action == "refused":
                    action, reason = "none", "refused by the memory store"
            elif action == "invalidate" and not await self._retire(principal, decision):
                action, reason = "none", "already retired"
            await self._bus.publish(
                decided_event(
                    decision.scope,
                    action,
                    item=f"{decision.scope}/memories/{decision.item}" if decision.item else "",
                    replaces=decision.target if action in ("update", "invalidate") else "",
                    candidate=decision.content,
                    reason=reason,
                    run=run,
                    assistant=exchange.assistant,
                    outcome=events_pb2.MEMORY_FORMING_OUTCOME_APPLIED,
                    actor=actor,
                )
            )
            plan.done = index + 1
            if not await self._store.store_plan(job, plan.dumps()):
                raise ClaimLost(job.id)

    async def _create(self, principal: Principal, decision: Decision, item: cpb.MemoryItem) -> str:
        """Create the decision's item; the action it came to."""
        request = cpb.CreateMemoryItemRequest(
            parent=decision.scope, memory_item=item, memory_item_id=decision.item
        )
        try:
            await self._context.create_memory(principal, request, timeout_s=self._timeout_s)
        except AlreadyExists:
            pass  # applied before a crash
        except InvalidArgument:
            # What the model said does not fit the item's limits: passed over, the rest
            # of the plan still applied (trying again could only fail the same way).
            return "refused"
        except (FailedPrecondition, NotFound):
            if not decision.target:
                raise
            # The item it replaces was retired or forgotten meanwhile: it is added alone
            # (unless this very item was made before a crash, which retired that one).
            try:
                await self._context.get_memory(
                    principal,
                    f"{decision.scope}/memories/{decision.item}",
                    timeout_s=self._timeout_s,
                )
            except NotFound:
                request.memory_item.ClearField("supersedes")
                with contextlib.suppress(AlreadyExists):
                    await self._context.create_memory(principal, request, timeout_s=self._timeout_s)
                return "add"
        return decision.action

    async def _retire(self, principal: Principal, decision: Decision) -> bool:
        """Retire the decision's target; False if it was retired or gone already."""
        item = cpb.MemoryItem(
            name=decision.target, invalid_reason=decision.reason[:200] or "retracted"
        )
        item.invalid_time.FromDatetime(min(decision.valid_from or now(), now()))
        request = cpb.UpdateMemoryItemRequest(
            memory_item=item,
            update_mask=field_mask_pb2.FieldMask(paths=["invalid_time", "invalid_reason"]),
        )
        try:
            await self._context.update_memory(principal, request, timeout_s=self._timeout_s)
        except (FailedPrecondition, NotFound, InvalidArgument):
            return False
        return True


def _item(
    decision: Decision,
    job: Job,
    formation: cpb.MemoryFormation,
    sources: Sequence[str],
    learned: dt.datetime,
    policy: memorypolicy.Effective,
) -> cpb.MemoryItem:
    item = cpb.MemoryItem(
        kind=CATEGORY_KINDS[decision.category],  # type: ignore[arg-type]
        content=decision.content,
        source_messages=list(sources),
        confidence=decision.confidence,
        formation=formation,
        supersedes=decision.target,
    )
    if decision.scope.startswith("users/"):
        item.workspace = f"workspaces/{job.workspace_id}"
    # A time to come is not a fact yet: the context service takes no future
    # ``valid_time`` (a plan stays a plan, learned now).
    item.valid_time.FromDatetime(min(decision.valid_from or learned, now()))
    expires = memorypolicy.expiry(now(), policy.categories.get(decision.category))
    if expires is not None:
        item.expire_time.FromDatetime(expires)
    return item


__all__ = ["Applier", "ClaimLost", "decided_event", "outcome_event", "sources_of"]
