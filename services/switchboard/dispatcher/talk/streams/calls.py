"""This process's media-stream calls: each webhook screened, each stream admitted and
bridged into Talk, as ``sip/calls.py`` does for SIP's.

At the webhook (its signature already checked by the server): a dispatch rule for the
number dialed on that carrier, this process's and the workspace's limits, and the user
the call would act as still able to write in the workspace; a refusal known then is the
webhook's ``<Reject/>``, and no stream is ever opened. Else the answer carries a ticket
(``signing.py``). At the stream's ``start`` (``admit``): the ticket redeemed, the limits
again (the slot is held from here), then the call is made a Talk session of the rule's
assistant exactly as a SIP call is (``Principal.acting_for`` the caller's mapped user or
the rule's; ``policy.authorize(WRITE)``; a conversation with the call's metadata; Talk's
own checks), all before any of the caller's audio reaches the session. A refused stream
is closed, and nothing of it reaches a Talk session. An admitted one is a ``Call`` record
(``talk/phone/``: ANSWERED from the start, the carrier having answered it) until it ends,
and a ``Line`` EndCall hangs up through.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Final

from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.dispatcher.ports.context import ContextPort
from switchboard.dispatcher.ports.peers import Via
from switchboard.dispatcher.talk.phone import book
from switchboard.dispatcher.talk.phone.book import CallBook
from switchboard.dispatcher.talk.session import Talks
from switchboard.dispatcher.talk.sip import tools
from switchboard.dispatcher.talk.sip.bridge import CallBridge
from switchboard.dispatcher.talk.sip.rules import Dialplan, DispatchRule
from switchboard.dispatcher.talk.sip.tools import CallActions
from switchboard.dispatcher.talk.streams.settings import CARRIERS
from switchboard.dispatcher.talk.streams.signing import Ticket, Tickets
from switchboard.dispatcher.tools.runner import BuiltinTool
from switchboard.platform import background
from switchboard.platform.errors import SwitchboardError
from switchboard.platform.observe.metrics import Metrics
from switchboard.platform.security.policy import Permission, Policy, Principal

log = logging.getLogger("switchboard.dispatcher.talk.streams")

#: How long admitting a call may take (the conversation made, Talk's checks).
ADMIT_TIMEOUT_S: Final = 10.0
#: How long closing every call may take when the process stops.
CLOSE_TIMEOUT_S: Final = 5.0
#: How long keys pressed wait for more before they are sent as one message.
DTMF_PAUSE_S: Final = 2.0

#: Why a webhook or a stream was refused: said to no one but the log and the carrier's
#: ``<Reject>`` (``busy`` or ``rejected``).
BUSY: Final = "busy"
REJECTED: Final = "rejected"


@dataclass(frozen=True)
class StreamLimits:
    max_calls: int = 16
    max_calls_per_workspace: int = 16
    dtmf_pause_s: float = DTMF_PAUSE_S


@dataclass(frozen=True)
class Screened:
    """A webhook's verdict: a ticket for the stream, or why there is none."""

    ticket: str = ""
    refusal: str = ""


@dataclass
class StreamCall:
    """One admitted stream: the server feeds its bridge."""

    number: int
    ticket: Ticket
    rule: DispatchRule
    #: Ends the stream (the server closes its socket; the carrier then ends the call).
    hang_up: Callable[[], None]
    bridge: CallBridge | None = None
    conversation: str = ""
    tools: dict[str, BuiltinTool] = field(default_factory=dict)
    #: Its ``Call`` record, once made; why this side ended it, if it did.
    name: str = ""
    end_reason: str = ""

    def ends(self, why: str) -> None:
        """This side ends it, for ``why`` (the first reason given stays)."""
        self.end_reason = self.end_reason or why
        self.hang_up()


class MediaStreams:
    """The media-stream calls of this process (see the module doc)."""

    def __init__(
        self,
        *,
        plan: Dialplan,
        talks: Talks,
        context: ContextPort,
        policy: Policy,
        limits: StreamLimits,
        tickets: Tickets | None = None,
        calls: CallBook | None = None,
    ) -> None:
        self._book = calls
        self._plan = plan
        self._talks = talks
        self._context = context
        self._policy = policy
        self._limits = limits
        self.tickets = tickets or Tickets()
        self._calls: dict[int, StreamCall] = {}
        self._numbers = itertools.count(1)
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing = False
        #: The port the server bound (``build.py`` sets it).
        self.port = 0

    @property
    def open_calls(self) -> int:
        return len(self._calls)

    def observe(self, metrics: Metrics) -> None:
        """Read the calls at every scrape (docs/metrics.md)."""

        def calls() -> list[tuple[tuple[str, ...], float]]:
            return [
                ((carrier,), sum(1 for c in self._calls.values() if c.ticket.carrier == carrier))
                for carrier in CARRIERS
            ]

        metrics.observe("switchboard_media_streams_calls", calls)

    # -- the assistant's tools (tools.runner.ConversationTools) ------------------------------

    def tools(self, conversation: str) -> dict[str, BuiltinTool]:
        call = next(
            (
                c
                for c in self._calls.values()
                if c.conversation == conversation and c.bridge is not None and c.bridge.live
            ),
            None,
        )
        return {} if call is None else call.tools

    # -- the webhook -------------------------------------------------------------------------

    async def screen(self, carrier: str, *, caller: str, dialed: str, call_id: str) -> Screened:
        """The webhook's answer for a call (its signature checked)."""
        found = next(
            ((i, r) for i, r in enumerate(self._plan.rules) if r.matches(carrier, dialed)), None
        )
        if found is None:
            log.info("a %s call to a number no rule has was rejected", carrier)
            return Screened(refusal=REJECTED)
        index, rule = found
        if not self._room(rule):
            log.info("a %s call to %s was rejected: busy", carrier, dialed)
            return Screened(refusal=BUSY)
        user, _ = rule.acts_as(caller)
        try:
            async with asyncio.timeout(ADMIT_TIMEOUT_S):
                await self._policy.authorize(
                    Principal.acting_for(user.user),
                    f"workspaces/{rule.workspace_id}",
                    Permission.WRITE,
                    "user",
                )
        except (TimeoutError, SwitchboardError) as exc:
            log.info("a %s call to %s was rejected: %s", carrier, dialed, book.said(exc))
            return Screened(refusal=REJECTED)
        token = self.tickets.issue(
            carrier=carrier, rule=index, caller=caller, dialed=dialed, call_id=call_id
        )
        return Screened(ticket=token)

    # -- the stream --------------------------------------------------------------------------

    async def admit(self, ticket: Ticket, hang_up: Callable[[], None]) -> StreamCall | None:
        """The stream's call made a Talk session, its bridge not yet begun; None when it
        is refused (logged; the server closes the stream)."""
        if not 0 <= ticket.rule < len(self._plan.rules):
            return None
        rule = self._plan.rules[ticket.rule]
        if not self._room(rule):
            log.info("a %s stream to %s was refused: busy", ticket.carrier, ticket.dialed)
            return None
        call = StreamCall(next(self._numbers), ticket, rule, hang_up)
        self._calls[call.number] = call
        try:
            async with asyncio.timeout(ADMIT_TIMEOUT_S):
                principal, first = await self._session_for(call)
                await self._talks.check(principal, first)
                await self._record(call, principal)
        except (TimeoutError, SwitchboardError) as exc:
            self._calls.pop(call.number, None)
            log.info(
                "a %s stream to %s was refused: %s", ticket.carrier, ticket.dialed, book.said(exc)
            )
            return None
        except Exception:
            self._calls.pop(call.number, None)
            log.exception("admitting a %s stream to %s failed", ticket.carrier, ticket.dialed)
            return None
        if self._closing or self._calls.get(call.number) is not call:
            self._calls.pop(call.number, None)
            return None

        def talk(requests: AsyncIterator[pb.TalkRequest]) -> AsyncGenerator[pb.TalkResponse]:
            return self._talks.talk(principal, requests, Via())

        def session_ended() -> None:
            call.ends("the session ended")

        def session(name: str) -> None:
            self._spawn(self._write(call, lambda c: setattr(c, "voice_session", name)))

        bridge = CallBridge(
            talk,
            first,
            hang_up=session_ended,
            dtmf_pause_s=self._limits.dtmf_pause_s,
            on_session=session,
        )
        call.bridge = bridge
        call.tools = dict(tools.bound(self._actions(call, bridge)))
        self._spawn(self._until_ended(call, bridge))
        return call

    async def _record(self, call: StreamCall, principal: Principal) -> None:
        if self._book is None:
            return
        ticket, rule = call.ticket, call.rule
        _, known = rule.acts_as(ticket.caller)
        opened = await self._book.opened(
            book.new_call(
                direction=pb.CALL_DIRECTION_INBOUND,
                state=pb.CALL_STATE_ANSWERED,
                channel=ticket.carrier,
                trunk=ticket.carrier,
                from_number=ticket.caller,
                to_number=ticket.dialed,
                assistant=str(rule.assistant),
                conversation=call.conversation,
                user_id=principal.user_id,
                caller_known=known,
            ),
            workspace_id=rule.workspace_id,
            user_id=principal.user_id,
        )
        call.name = opened.call.name

    async def _write(self, call: StreamCall, edit: Callable[[pb.Call], None]) -> None:
        if self._book is None or not call.name:
            return
        try:
            async with asyncio.timeout(ADMIT_TIMEOUT_S):
                await self._book.update(call.name, edit)
        except (TimeoutError, SwitchboardError) as exc:
            # The record lags; the take-over ends it if this process never does.
            log.warning("a stream call's record could not be written: %s", book.said(exc))

    def end(self, call_id: str, why: str) -> bool:
        """EndCall (``book.Line``): hang up a stream this process carries."""
        call = next((c for c in self._calls.values() if c.name.endswith(f"/{call_id}")), None)
        if call is None:
            return False
        call.ends(why)
        return True

    async def close(self) -> None:
        self._closing = True
        for task in list(self._tasks):
            task.cancel()
        # Their streams close next: the records say so now, while the database is there.
        calls = [c for c in self._calls.values() if c.name]
        if calls:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(CLOSE_TIMEOUT_S):
                    await asyncio.gather(
                        *(self._write(c, book.ended(0, "the server stopped")) for c in calls),
                        return_exceptions=True,
                    )
        bridges = [c.bridge for c in self._calls.values() if c.bridge is not None]
        for call in list(self._calls.values()):
            call.hang_up()
        if bridges:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(CLOSE_TIMEOUT_S):
                    await asyncio.gather(*(b.close() for b in bridges), return_exceptions=True)
        self._calls.clear()

    # -- admission ---------------------------------------------------------------------------

    def _room(self, rule: DispatchRule) -> bool:
        if self._closing or len(self._calls) >= self._limits.max_calls:
            return False
        in_workspace = sum(
            1 for c in self._calls.values() if c.rule.workspace_id == rule.workspace_id
        )
        return in_workspace < self._limits.max_calls_per_workspace

    async def _session_for(self, call: StreamCall) -> tuple[Principal, pb.TalkRequest]:
        rule, ticket = call.rule, call.ticket
        user, known = rule.acts_as(ticket.caller)
        principal = Principal.acting_for(user.user)
        workspace = f"workspaces/{rule.workspace_id}"
        await self._policy.authorize(principal, workspace, Permission.WRITE, "user")
        caller = ticket.caller or "an unknown number"
        call.conversation = await book.call_conversation(
            self._context,
            principal,
            workspace,
            f"Call from {caller} to {ticket.dialed}",
            {
                "channel": ticket.carrier,
                "caller": ticket.caller,
                "dialed": ticket.dialed,
                "caller_known": known,
                "call_sid": ticket.call_id,
            },
            timeout_s=ADMIT_TIMEOUT_S,
        )
        first = pb.TalkRequest(
            start=pb.TalkStart(
                conversation=call.conversation, assistant=str(rule.assistant), barge_in=True
            )
        )
        return principal, first

    def _actions(self, call: StreamCall, bridge: CallBridge) -> CallActions:
        def hang_up(why: str) -> None:
            log.info("the assistant ends a call: %s", why, extra={"session": bridge.session})
            bridge.after_speech(lambda: call.ends(f"the assistant ended it: {why}"))

        def unsupported(*_: str) -> None:
            # Never offered (no destinations, no keys): a stream carries neither.
            raise RuntimeError("a media stream cannot transfer or press keys")

        return CallActions(
            live=lambda: bridge.live,
            hang_up_after_speech=hang_up,
            transfer_after_speech=unsupported,
            send_keys=unsupported,
            destinations={},
            keys=False,
        )

    async def _until_ended(self, call: StreamCall, bridge: CallBridge) -> None:
        try:
            await bridge.ended.wait()
        finally:
            self._calls.pop(call.number, None)
        why = call.end_reason or bridge.outcome or "the session ended"
        await self._write(call, book.ended(0, why))
        log.info(
            "a %s call ended (%s); %d audio frames dropped",
            call.ticket.carrier,
            bridge.outcome or "the session ended",
            bridge.dropped_frames,
            extra={"session": bridge.session},
        )

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        background.spawn(work, name="stream-call", logger=log, keep=self._tasks)
