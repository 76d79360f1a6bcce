"""Steering a live run: a message handed to a run that is going, at its next step
boundary, without cancelling it (docs/dispatcher.md, "Steering a live run").

A steer is a run of its own. Its message is stored at once and a QUEUED run is
admitted for it on the replica that owns the target (``SteerRun`` is forwarded
there like ``CancelRun``), through SendMessage's admission (``Admission``: the
same filters, quotas and budgets), with the target's assistant and handler. It
waits in the conversation's queue behind the target. Then one of two things:

* the target takes it before its next model call (``SteerBook.take``, called by
  the ``llm`` handler through ``HandleCall.steers``): its ticket is withdrawn
  and, in ONE transaction fenced by the owner, the target's job journals it
  (``consumed_steers``) and the steer's run is stored SUCCEEDED (``steer.state``
  CONSUMED). Never answered twice: once it is in the journal it is the
  target's; a resumed target gives it to its model again before the same step.
* the target ends first (or never has a step boundary: built-in and remote
  handlers, or its final answer was being written): the steer's run runs as
  any queued run when its turn comes (``steer.state`` REQUEUED, and the
  target's watchers are told before its end). Never lost.

``SteerBook`` (``core/steers.py``) is the replica's bookkeeping (which steers wait
for which live run) and the consumption; ``Steering`` is the call (SteerRun, and SendMessage
with CONCURRENCY_POLICY_STEER).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Final

from switchboard.api.context.v1 import context_pb2 as cpb
from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.dispatcher.handlers.handed import Handed
from switchboard.dispatcher.ports.peers import Via
from switchboard.dispatcher.runs.control import IN_PROCESS, Control
from switchboard.dispatcher.runs.core.active.live import Common
from switchboard.dispatcher.runs.core.steers import SteerBook
from switchboard.dispatcher.runs.core.store import TERMINAL
from switchboard.dispatcher.runs.intake.admission import Admission
from switchboard.dispatcher.runs.intake.screening import Steered, steer_mode_violations
from switchboard.platform.errors import (
    InvalidArgument,
    QuotaExceeded,
    RunEnded,
    Violations,
)
from switchboard.platform.security.policy import Principal
from switchboard.platform.store.storage import Idempotency, idempotency
from switchboard.platform.values import names
from switchboard.platform.values.resources import ConversationName, RunName

#: Steers one run may take (consumed or waiting): its journal keeps each message.
MAX_STEERS: Final = 64


def _append_id(request_id: str) -> str:
    """The stored message's request id for a SteerRun's: its own space, so a
    SendMessage with the same id is not taken for it (within the 64 characters)."""
    if not request_id:
        return ""
    if len(request_id) <= 58:
        return f"steer-{request_id}"
    return "steer-" + hashlib.sha256(request_id.encode()).hexdigest()[:40]


class Steering:
    """SteerRun, and SendMessage with CONCURRENCY_POLICY_STEER."""

    def __init__(
        self, *, common: Common, book: SteerBook, admission: Admission, control: Control
    ) -> None:
        self._live = common.live
        self._store = common.store
        self._book = book
        self._admission = admission
        self._control = control

    async def steer_run(
        self,
        principal: Principal,
        request: pb.SteerRunRequest,
        via: Via = IN_PROCESS,
        *,
        handed: Handed | None = None,
        key: Idempotency | None = None,
        append_id: str | None = None,
        schedule: str = "",
    ) -> pb.SteerRunResponse:
        """Steer ``request.run``; forwarded to its owner if another replica runs it.
        ``key``/``append_id``: a SendMessage (policy STEER) that became this steer;
        ``schedule``: the schedule whose tick sent it (kept on this replica only: a
        forwarded SteerRun has no field for it)."""
        found = _checked(request)
        if key is None:
            key = idempotency(principal.user_id, "SteerRun", request)
        sent = _as_message(
            request, found, _append_id(request.request_id) if append_id is None else append_id
        )
        if key is not None:
            earlier = await self._store.replayed(key)
            if earlier is not None:
                return _response(await self._admission.replay(principal, sent, earlier))
        target = self._live.runs.get(request.run)
        if target is None:
            _, owner = await self._control.owner_of(found, via)
            if owner is None:
                raise RunEnded(f"{request.run} has ended; send the message as a new one")
            # The owner holds the target: it admits the steer behind it, in its queue.
            return await owner.peers.steer_run(owner.address, via, request)
        if target.run.state in TERMINAL:
            raise RunEnded(f"{request.run} has ended; send the message as a new one")
        if len(target.job.consumed_steers) + self._book.waiting(target.run.name) >= MAX_STEERS:
            # Each consumed steer is kept in the target's journal (and read again on a resume).
            raise QuotaExceeded(
                f"a run takes at most {MAX_STEERS} steers; send the message as a new one",
                subject="steers_per_run",
            )
        steered = Steered(
            target=target, key=key, accepted=lambda steer: self._book.accepted(target, steer)
        )
        return _response(
            await self._admission.send_message(
                principal, sent, handed, schedule=schedule, steer=steered
            )
        )

    async def send_message(
        self,
        principal: Principal,
        request: pb.SendMessageRequest,
        handed: Handed | None,
        via: Via,
        active_in: Sequence[str],
        *,
        schedule: str = "",
    ) -> pb.SendMessageResponse:
        """SendMessage with CONCURRENCY_POLICY_STEER: a steer of the conversation's
        oldest active run (``active_in``: this replica's, oldest first; else the
        store's), as ENQUEUE when it has none (or it ended meanwhile)."""
        conversation = ConversationName.parse(request.conversation, "conversation")
        violations = steer_mode_violations(request.steer_mode)
        if violations:
            raise InvalidArgument("the request is invalid", violations)
        key = idempotency(principal.user_id, "SendMessage", request)
        if key is not None and await self._store.replayed(key) is not None:
            return await self._admission.send_message(principal, request, handed, schedule=schedule)
        target = active_in[0] if active_in else ""
        if not target:
            oldest = await self._store.oldest_active(
                conversation.workspace, conversation.conversation
            )
            target = oldest.run.name if oldest is not None else ""
        if target:
            steer = pb.SteerRunRequest(
                run=target, message=request.message, request_id=request.request_id
            )
            try:
                steered = await self.steer_run(
                    principal,
                    steer,
                    via,
                    handed=handed,
                    key=key if target in self._live.runs else None,
                    append_id=request.request_id,
                    schedule=schedule,
                )
            except RunEnded:
                pass  # ended meanwhile: the message is an ordinary one
            else:
                return pb.SendMessageResponse(run=steered.run, message=steered.message)
        return await self._admission.send_message(principal, request, handed, schedule=schedule)


def _checked(request: pb.SteerRunRequest) -> RunName:
    """SteerRunRequest's fields; the run's name."""
    violations = Violations()
    found = RunName.parse_or_none(request.run)
    if found is None:
        violations.add("run", RunName.refusal(request.run))
    message = request.message
    if message.role not in (cpb.MESSAGE_ROLE_UNSPECIFIED, cpb.MESSAGE_ROLE_USER):
        violations.add("message.role", "must be USER or unset")
    if not message.parts:
        violations.add("message.parts", "needs at least one part")
    if request.request_id and not names.REQUEST_ID.fullmatch(request.request_id):
        violations.add("request_id", "must be 1-64 of [A-Za-z0-9_-]")
    violations.check()
    # Reported above, with the other fields; parsing again says the same.
    return found if found is not None else RunName.parse(request.run, "run")


def _as_message(
    request: pb.SteerRunRequest, found: RunName, append_id: str
) -> pb.SendMessageRequest:
    """The steer as the message admission takes: the target's conversation."""
    return pb.SendMessageRequest(
        conversation=str(found.parent),
        message=request.message,
        request_id=append_id,
    )


def _response(sent: pb.SendMessageResponse) -> pb.SteerRunResponse:
    return pb.SteerRunResponse(run=sent.run, message=sent.message)
