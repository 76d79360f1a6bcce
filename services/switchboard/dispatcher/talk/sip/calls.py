"""This process's phone calls: each INVITE screened, admitted and bridged into Talk.

On the engine's thread, before anything is looked up (``screen``): within the INVITE
rate for its address (503), from a trunk's address or to a trunk that takes calls from
anywhere (403), with that trunk's digest credentials if it has them (a 401 challenge, 403
for a wrong answer: ``digest.py``), and to a number a dispatch rule has on that trunk
(404). On the loop (``_admit``): this
process's and the workspace's limits (486 Busy Here), then the call is made a Talk
session of the rule's assistant, acting as the user the caller maps to (or the rule's
user for an anonymous caller): that user must still be able to write in the workspace
(403), a conversation is made for the call (its title and metadata name the caller and
the number dialed), and Talk's own checks run (the assistant's voice, the sessions'
limits: 503 or 486), all before the call is answered. So a refused call leaves no Talk
session, and an answered one starts its session as soon as its media is up.

Out (``place``, the ``Phone`` of ``talk/phone/book.py``): the trunk must place calls for
the workspace to that number (``rules.Outbound``), within the same limits, acting as the
user who placed it; its conversation and Talk's checks come first, then the call is
recorded DIALING and the INVITE goes out. It rings until ``ring_timeout``; once answered
and its media up, its session starts with the opening message as its first turn.

Every call admitted, in or out, is a ``Call`` record (``talk/phone/``) kept as it rings,
is answered and ends, each change with its CALL_CHANGED event.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Final

from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.dispatcher.ports.context import ContextPort
from switchboard.dispatcher.ports.peers import Via
from switchboard.dispatcher.talk.phone import book
from switchboard.dispatcher.talk.phone.book import CallBook, Opened, Order
from switchboard.dispatcher.talk.session import Talks
from switchboard.dispatcher.talk.sip import digest, tools
from switchboard.dispatcher.talk.sip.bridge import CallBridge
from switchboard.dispatcher.talk.sip.engine import Invite, Refusal, SipEngine
from switchboard.dispatcher.talk.sip.rules import (
    Dialplan,
    DispatchRule,
    InviteRate,
    Outbound,
    Trunk,
)
from switchboard.dispatcher.talk.sip.tools import CallActions
from switchboard.dispatcher.tools.runner import BuiltinTool
from switchboard.platform import background
from switchboard.platform.errors import (
    FieldViolation,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    QuotaExceeded,
    ServerUnavailable,
    SwitchboardError,
    Unauthenticated,
)
from switchboard.platform.observe.metrics import Metrics
from switchboard.platform.security.policy import Permission, Policy, Principal
from switchboard.platform.values.names import now

log = logging.getLogger("switchboard.dispatcher.talk.sip")

#: How long admitting a call may take (the conversation made, Talk's checks).
ADMIT_TIMEOUT_S: Final = 10.0
#: How long closing every call may take when the process stops.
CLOSE_TIMEOUT_S: Final = 5.0


@dataclass(frozen=True)
class CallLimits:
    max_calls: int = 4
    max_calls_per_workspace: int = 4
    invites_per_s: float = 5.0
    invite_burst: int = 10
    dtmf_pause_s: float = 2.0
    max_call_s: float = 3600.0


@dataclass
class _Call:
    number: int
    workspace_id: str
    trunk: str = ""
    invite: Invite | None = None  # a call in
    rule: DispatchRule | None = None
    order: Order | None = None  # a call out
    bridge: CallBridge | None = None
    media_rate: int = 0
    hung_up: str = ""
    conversation: str = ""
    #: Its ``Call`` record, once made.
    name: str = ""
    answered: bool = False
    #: Why it ended, when this side ended it (else read from the SIP status).
    end_reason: str = ""
    #: Until it is answered, its ring timeout; then, the longest it may last.
    ring_timer: asyncio.TimerHandle | None = None
    tools: dict[str, BuiltinTool] = field(default_factory=dict)

    @property
    def outbound(self) -> bool:
        return self.order is not None

    @property
    def label(self) -> str:
        """The number it concerns, for the log."""
        if self.order is not None:
            return self.order.to_number
        return self.invite.dialed if self.invite is not None else ""

    def ends(self, why: str) -> None:
        """This side ends it, for ``why`` (the first reason given stays)."""
        self.end_reason = self.end_reason or why


class Calls:
    """The calls of this process (see the module doc); the engine's ``CallEvents``."""

    def __init__(
        self,
        *,
        plan: Dialplan,
        talks: Talks,
        context: ContextPort,
        policy: Policy,
        limits: CallLimits,
        book: CallBook,
    ) -> None:
        self._plan = plan
        self._book = book
        self._talks = talks
        self._context = context
        self._policy = policy
        self._limits = limits
        self._rate = InviteRate(limits.invites_per_s, limits.invite_burst)
        self._digest = digest.Digest()
        #: The trunk each INVITE the screen let through came by, until ``incoming``.
        self._passed: dict[int, str] = {}
        self._calls: dict[int, _Call] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.engine: SipEngine | None = None
        self._closing = False
        #: INVITEs refused, by the SIP status answered (PJSIP's own 486s and 488s are not
        #: seen here).
        self.refused: dict[int, int] = {}

    @property
    def open_calls(self) -> int:
        return len(self._calls)

    def observe(self, metrics: Metrics) -> None:
        """Read the calls at every scrape (docs/metrics.md)."""

        def calls() -> list[tuple[tuple[str, ...], float]]:
            answered = sum(1 for c in self._calls.values() if c.answered)
            return [(("ringing",), len(self._calls) - answered), (("answered",), answered)]

        def refused() -> list[tuple[tuple[str, ...], float]]:
            return [((str(code),), count) for code, count in sorted(self.refused.items())]

        metrics.observe("switchboard_sip_calls", calls)
        metrics.observe("switchboard_sip_refused_total", refused)

    def bridges(self) -> list[CallBridge]:
        return [c.bridge for c in self._calls.values() if c.bridge is not None]

    # -- the assistant's tools (tools.runner.ConversationTools) ------------------------------

    def tools(self, conversation: str) -> dict[str, BuiltinTool]:
        call = self._carrying(conversation)
        return {} if call is None else call.tools

    def _carrying(self, conversation: str) -> _Call | None:
        return next(
            (
                c
                for c in self._calls.values()
                if c.conversation == conversation and c.bridge is not None and c.bridge.live
            ),
            None,
        )

    def _actions(self, call: _Call, bridge: CallBridge, engine: SipEngine) -> CallActions:
        number = call.number

        def hang_up(why: str) -> None:
            log.info("the assistant ends a call: %s", why, extra={"session": bridge.session})

            def act() -> None:
                call.ends(f"the assistant ended it: {why}")
                engine.hang_up(number)

            bridge.after_speech(act)

        def transfer(name: str, target: str) -> None:
            log.info(
                "the assistant transfers a call to %s", name, extra={"session": bridge.session}
            )

            def act() -> None:
                call.ends(f"transferred to {name}")
                engine.transfer(number, target)

            bridge.after_speech(act)

        return CallActions(
            live=lambda: bridge.live,
            hang_up_after_speech=hang_up,
            transfer_after_speech=transfer,
            send_keys=lambda keys: engine.send_dtmf(number, keys),
            destinations=call.rule.transfer if call.rule is not None else {},
        )

    # -- the engine's thread -----------------------------------------------------------------

    def screen(self, invite: Invite) -> Refusal | None:
        refusal = self._screened(invite)
        if refusal is not None:
            # On the engine's thread: one dict update, read by the scrape on the loop.
            self.refused[refusal.code] = self.refused.get(refusal.code, 0) + 1
        return refusal

    def _screened(self, invite: Invite) -> Refusal | None:
        if not self._rate.take(invite.source):
            return Refusal(503, "Too many calls from this address")
        trunk = self._trunk(invite)
        if isinstance(trunk, Refusal):
            return trunk
        if trunk.srtp and not invite.srtp_offered:
            return Refusal(488, "SRTP required")
        if self._plan.rule_for(trunk.name, invite.dialed) is None:
            return Refusal(404, "No such number")
        # For ``incoming``, on the loop: reported after this, so it is set before it.
        self._passed[invite.call] = trunk.name
        return None

    def _trunk(self, invite: Invite) -> Trunk | Refusal:
        """The trunk the INVITE comes from, its credentials checked if it has any."""
        answer = digest.parse(invite.authorization) if invite.authorization else None
        trunk = self._plan.trunk_of(invite.source)
        # Before any challenge: a digest answer is not asked for in the clear.
        if not invite.tls and (trunk.tls if trunk else self._plan.open_trunks_need_tls):
            return Refusal(403, "TLS required")
        if trunk is None and answer is not None:
            trunk = self._plan.trunk_named(answer.username)
            if trunk is not None and trunk.tls and not invite.tls:
                return Refusal(403, "TLS required")
        if trunk is None and not (self._plan.open_trunks and answer is None):
            return Refusal(403, "Forbidden")
        if trunk is not None and not trunk.authenticates:
            return trunk
        if answer is None:
            return self._challenge()
        if trunk is None:
            return Refusal(403, "Forbidden")
        verdict = self._digest.check(
            answer,
            method="INVITE",
            request_uri=invite.request_uri,
            username=trunk.username,
            password=trunk.password,
        )
        if verdict == "stale":
            return self._challenge(stale=True)
        if verdict != "ok":
            return Refusal(403, "Forbidden")
        return trunk

    def _challenge(self, *, stale: bool = False) -> Refusal:
        return Refusal(
            401, "Unauthorized", (("WWW-Authenticate", self._digest.challenge(stale=stale)),)
        )

    # -- the loop (CallEvents) ---------------------------------------------------------------

    def incoming(self, invite: Invite) -> None:
        trunk = self._passed.pop(invite.call, None)  # the screen's trunk
        rule = None if trunk is None else self._plan.rule_for(trunk, invite.dialed)
        if rule is None:
            self._refuse(invite.call, 404, "No such number")
            return
        call = _Call(
            number=invite.call,
            workspace_id=rule.workspace_id,
            trunk=trunk or "",
            invite=invite,
            rule=rule,
        )
        refusal = self._room(rule.workspace_id)
        if refusal is not None:
            self._refuse(invite.call, refusal.code, refusal.reason)
            return
        self._calls[call.number] = call
        self._spawn(self._admit(call))

    def media(self, call: int, codec: str, rate: int, srtp: bool) -> None:
        held = self._calls.get(call)
        engine = self.engine
        if held is None or engine is None:
            return
        held.media_rate = rate
        log.info("a call's media is up (%s at %d Hz%s)", codec, rate, ", SRTP" if srtp else "")
        if srtp and held.name:
            self._record(held, book.secured)
        elif not srtp and held.invite is not None and held.invite.srtp_offered:
            # Offered keys PJSIP could not use (no suite in common) fall back to plain RTP:
            # a trunk that requires SRTP is not carried so.
            trunk = self._plan.named(held.trunk)
            if trunk is not None and trunk.srtp:
                held.ends("its audio was not SRTP, as its trunk requires")
                engine.hang_up(held.number)
                return
        # A call placed may have media before it is answered (183): its session waits.
        if not held.outbound or held.answered:
            self._begin(held)

    def _begin(self, held: _Call) -> None:
        engine = self.engine
        playout = None if engine is None else engine.playout(held.number)
        if held.bridge is not None and playout is not None:
            held.bridge.begin(playout)

    def progress(self, call: int, code: int) -> None:
        held = self._calls.get(call)
        if held is not None and held.outbound and held.name and not held.answered:
            self._record(held, book.ringing)

    def confirmed(self, call: int) -> None:
        held = self._calls.get(call)
        if held is None or held.answered:
            return
        held.answered = True
        stamp = now()
        if held.ring_timer is not None:
            held.ring_timer.cancel()
        # Every call has an end: the longest one may last (its timer is this one's now).
        held.ring_timer = asyncio.get_running_loop().call_later(
            self._limits.max_call_s, self._too_long, held
        )
        if held.name:
            self._record(held, book.answered_at(stamp))
        if held.outbound and held.media_rate:
            self._begin(held)

    def audio(self, call: int, pcm: bytes) -> None:
        held = self._calls.get(call)
        if held is not None and held.bridge is not None:
            held.bridge.audio(pcm)

    def dtmf(self, call: int, digit: str) -> None:
        held = self._calls.get(call)
        if held is not None and held.bridge is not None:
            held.bridge.key(digit)

    def ended(self, call: int, code: int, reason: str) -> None:
        held = self._calls.get(call)
        if held is None:
            return
        held.hung_up = f"the call ended ({code} {reason})"
        if held.ring_timer is not None:
            held.ring_timer.cancel()
        if held.name:
            self._record(held, book.ended(code, _why_ended(held, code, reason)))
        if held.bridge is None:
            self._calls.pop(call, None)  # still being admitted: _admit lets it go
        else:
            held.bridge.hung_up(held.hung_up)

    def _record(self, held: _Call, edit: Callable[[pb.Call], None]) -> None:
        """Write a change of the call's record (in order: ``CallBook.update``)."""
        self._spawn(self._write(held.name, edit))

    async def _write(self, name: str, edit: Callable[[pb.Call], None]) -> None:
        try:
            async with asyncio.timeout(ADMIT_TIMEOUT_S):
                await self._book.update(name, edit)
        except (TimeoutError, SwitchboardError) as exc:
            # The record lags; the call itself goes on (its end is recorded by the next
            # process's take-over if this one never manages to).
            log.warning("a call's record could not be written: %s", book.said(exc))

    # -- EndCall and PlaceCall (book.Phone) --------------------------------------------------

    def end(self, call_id: str, why: str) -> bool:
        engine = self.engine
        held = next((c for c in self._calls.values() if c.name.endswith(f"/{call_id}")), None)
        if held is None or engine is None:
            return False
        held.ends(why)
        engine.hang_up(held.number)
        return True

    async def place(self, order: Order) -> pb.Call:
        engine = self.engine
        trunk = self._plan.outbound(order.trunk)
        if trunk is None:
            raise InvalidArgument(
                "no such outbound trunk",
                [FieldViolation("trunk", "no trunk of this server places calls by that name")],
            )
        _, outbound = trunk
        if order.workspace_id not in outbound.workspaces:
            raise InvalidArgument(
                "this trunk places no calls for this workspace",
                [FieldViolation("trunk", "does not place calls for this workspace")],
            )
        if not outbound.allows(order.workspace_id, order.to_number):
            raise InvalidArgument(
                "this trunk may not call that number",
                [FieldViolation("to_number", "is outside the numbers this trunk may call")],
            )
        refusal = self._room(order.workspace_id)
        if engine is None or (refusal is not None and refusal.code == 503):
            raise ServerUnavailable("this server is stopping; place the call again")
        if refusal is not None:
            raise QuotaExceeded(
                "too many calls at once", subject="concurrent calls", retry_after_s=30.0
            )
        call = _Call(number=engine.reserve(), workspace_id=order.workspace_id, order=order)
        self._calls[call.number] = call
        try:
            async with asyncio.timeout(ADMIT_TIMEOUT_S):
                placed = await self._placed(call, order, outbound)
        except TimeoutError:
            self._calls.pop(call.number, None)
            raise ServerUnavailable("placing the call took too long; try again") from None
        except BaseException:
            self._calls.pop(call.number, None)
            raise
        if not placed.fresh:
            self._calls.pop(call.number, None)  # a retry: the first request's call
            return placed.call
        engine.dial(call.number, order.trunk, outbound.uri(order.to_number))
        call.ring_timer = asyncio.get_running_loop().call_later(
            order.ring_timeout_s, self._unanswered, call
        )
        log.info("a call to %s is placed", order.to_number)
        return placed.call

    async def _placed(self, call: _Call, order: Order, outbound: Outbound) -> Opened:
        """The call's conversation, Talk's checks and its record, before it is dialed."""
        principal = Principal.acting_for(order.user_id)
        workspace = f"workspaces/{order.workspace_id}"
        await self._policy.authorize(principal, workspace, Permission.WRITE, "parent")
        conversation = await book.call_conversation(
            self._context,
            principal,
            workspace,
            f"Call to {order.to_number}",
            {"channel": "sip", "direction": "outbound", "to": order.to_number},
            timeout_s=ADMIT_TIMEOUT_S,
        )
        call.conversation = conversation
        first = pb.TalkRequest(
            start=pb.TalkStart(
                conversation=conversation, assistant=str(order.assistant), barge_in=True
            )
        )
        await self._talks.check(principal, first)
        placed = await self._book.opened(
            book.new_call(
                direction=pb.CALL_DIRECTION_OUTBOUND,
                state=pb.CALL_STATE_DIALING,
                trunk=order.trunk,
                from_number=outbound.caller_id,
                to_number=order.to_number,
                assistant=str(order.assistant),
                conversation=conversation,
                user_id=order.user_id,
                opening=order.opening,
                schedule=order.schedule,
                tls=outbound.tls,
            ),
            workspace_id=order.workspace_id,
            user_id=order.user_id,
            key=order.key,
        )
        if placed.fresh:
            call.name = placed.call.name
            self._bridge(call, principal, first, order.opening)
        return placed

    def _too_long(self, call: _Call) -> None:
        engine = self.engine
        if engine is None or self._calls.get(call.number) is not call:
            return
        call.ends(f"it reached the longest a call may last ({self._limits.max_call_s:.0f} s)")
        engine.hang_up(call.number)

    def _unanswered(self, call: _Call) -> None:
        engine = self.engine
        if call.answered or engine is None or self._calls.get(call.number) is not call:
            return
        timeout = call.order.ring_timeout_s if call.order is not None else 0
        call.ends(f"nobody answered within {timeout:.0f} s")
        engine.hang_up(call.number)

    async def close(self) -> None:
        self._closing = True
        for task in list(self._tasks):
            task.cancel()
        # The engine hangs every call up next: their records say so now, while the
        # database is there (the take-over would say it a minute or more later).
        names = [c.name for c in self._calls.values() if c.name]
        if names:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(CLOSE_TIMEOUT_S):
                    await asyncio.gather(
                        *(self._book.update(n, book.ended(0, "the server stopped")) for n in names),
                        return_exceptions=True,
                    )
        bridges = self.bridges()
        if bridges:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(CLOSE_TIMEOUT_S):
                    await asyncio.gather(*(b.close() for b in bridges), return_exceptions=True)

    # -- admission ---------------------------------------------------------------------------

    def _room(self, workspace_id: str) -> Refusal | None:
        if self._closing:
            return Refusal(503, "Server stopping")
        if len(self._calls) >= self._limits.max_calls:
            return Refusal(486, "Busy Here")
        in_workspace = sum(1 for c in self._calls.values() if c.workspace_id == workspace_id)
        if in_workspace >= self._limits.max_calls_per_workspace:
            return Refusal(486, "Busy Here")
        return None

    async def _admit(self, call: _Call) -> None:
        engine, invite, rule = self.engine, call.invite, call.rule
        if engine is None or invite is None or rule is None:
            return
        engine.ring(call.number)
        try:
            async with asyncio.timeout(ADMIT_TIMEOUT_S):
                principal, first, known = await self._session_for(call, invite, rule)
                await self._talks.check(principal, first)
                user = principal.user_id
                opened = await self._book.opened(
                    book.new_call(
                        direction=pb.CALL_DIRECTION_INBOUND,
                        state=pb.CALL_STATE_RINGING,
                        trunk=call.trunk,
                        from_number=invite.caller,
                        to_number=invite.dialed,
                        assistant=str(rule.assistant),
                        conversation=call.conversation,
                        user_id=user,
                        caller_known=known,
                        tls=invite.tls,
                    ),
                    workspace_id=rule.workspace_id,
                    user_id=user,
                )
        except (TimeoutError, SwitchboardError) as exc:
            code, reason = _refusal(exc)
            self._calls.pop(call.number, None)
            self._refuse(call.number, code, reason)
            log.info("a call to %s was refused: %s", invite.dialed, book.said(exc))
            return
        except Exception:
            # Never a phone left ringing: a fault of ours ends the call, said as such.
            self._calls.pop(call.number, None)
            self._refuse(call.number, 500, "Server Internal Error")
            log.exception("admitting a call to %s failed", invite.dialed)
            return
        call.name = opened.call.name
        if call.hung_up or self._calls.get(call.number) is not call:
            self._calls.pop(call.number, None)
            # The caller gave up while it rang.
            self._record(call, book.ended(487, "the caller hung up while it rang"))
            return
        self._bridge(call, principal, first)
        engine.answer(call.number)
        if call.media_rate:
            self._begin(call)

    def _bridge(
        self, call: _Call, principal: Principal, first: pb.TalkRequest, opening: str = ""
    ) -> None:
        """The call's bridge into Talk (started once its media is up), its tools, and the
        task that lets it go when it ends."""
        engine = self.engine
        assert engine is not None  # noqa: S101 - a call is only admitted with an engine

        def talk(requests: AsyncIterator[pb.TalkRequest]) -> AsyncGenerator[pb.TalkResponse]:
            return self._talks.talk(principal, requests, Via())

        def session_ended() -> None:
            call.ends("the session ended")
            engine.hang_up(call.number)

        def session(name: str) -> None:
            if call.name:
                self._record(call, lambda c: setattr(c, "voice_session", name))

        bridge = CallBridge(
            talk,
            first,
            hang_up=session_ended,
            dtmf_pause_s=self._limits.dtmf_pause_s,
            opening=opening,
            on_session=session,
        )
        call.bridge = bridge
        call.tools = dict(tools.bound(self._actions(call, bridge, engine)))
        self._spawn(self._until_ended(call, bridge))

    async def _session_for(
        self, call: _Call, invite: Invite, rule: DispatchRule
    ) -> tuple[Principal, pb.TalkRequest, bool]:
        user, known = rule.acts_as(invite.caller)
        principal = Principal.acting_for(user.user)
        workspace = f"workspaces/{rule.workspace_id}"
        await self._policy.authorize(principal, workspace, Permission.WRITE, "user")
        caller = invite.caller or "an unknown number"
        call.conversation = await book.call_conversation(
            self._context,
            principal,
            workspace,
            f"Call from {caller} to {invite.dialed}",
            {
                "channel": "sip",
                "caller": invite.caller,
                "caller_name": invite.display,
                "dialed": invite.dialed,
                "caller_known": known,
            },
            timeout_s=ADMIT_TIMEOUT_S,
        )
        first = pb.TalkRequest(
            start=pb.TalkStart(
                conversation=call.conversation, assistant=str(rule.assistant), barge_in=True
            )
        )
        return principal, first, known

    async def _until_ended(self, call: _Call, bridge: CallBridge) -> None:
        try:
            await bridge.ended.wait()
        finally:
            self._calls.pop(call.number, None)
        log.info(
            "a call ended (%s); %d audio frames dropped",
            bridge.outcome or "the session ended",
            bridge.dropped_frames,
            extra={"session": bridge.session},
        )

    def _refuse(self, call: int, code: int, reason: str) -> None:
        self.refused[code] = self.refused.get(code, 0) + 1
        if self.engine is not None:
            self.engine.hang_up(call, code, reason)

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        background.spawn(work, name="sip-call", logger=log, keep=self._tasks)


def _refusal(exc: BaseException) -> tuple[int, str]:
    """The SIP status a refused call gets, saying no more than a caller may know."""
    if isinstance(exc, QuotaExceeded):
        return 486, "Busy Here"
    if isinstance(exc, (PermissionDenied, NotFound, Unauthenticated)):
        return 403, "Forbidden"
    # FailedPrecondition (the assistant has no voice), a timeout, the rest: not the caller's.
    return 503, "Service Unavailable"


def _why_ended(call: _Call, code: int, reason: str) -> str:
    """Why a call ended, in words: this side's reason, else what its SIP status says."""
    if call.end_reason:
        return call.end_reason
    if call.answered:
        return "the called party hung up" if call.outbound else "the caller hung up"
    if not call.outbound:
        return "the caller hung up while it rang"
    if code in (486, 600):
        return "the line was busy"
    if code in (408, 480):
        return "nobody answered"
    if code == 603:
        return "the call was declined"
    return f"the call failed ({code} {reason[:100]})"
