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
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Coroutine
from dataclasses import dataclass, field
from typing import Any, Final

from google.protobuf import struct_pb2

from switchboard.api.context.v1 import context_pb2 as cpb
from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.dispatcher.ports.context import ContextPort
from switchboard.dispatcher.ports.peers import Via
from switchboard.dispatcher.talk.session import Talks
from switchboard.dispatcher.talk.sip import digest, tools
from switchboard.dispatcher.talk.sip.bridge import CallBridge
from switchboard.dispatcher.talk.sip.engine import Invite, Refusal, SipEngine
from switchboard.dispatcher.talk.sip.rules import Dialplan, DispatchRule, InviteRate, Trunk
from switchboard.dispatcher.talk.sip.tools import CallActions
from switchboard.dispatcher.tools.runner import BuiltinTool
from switchboard.platform.errors import (
    NotFound,
    PermissionDenied,
    QuotaExceeded,
    SwitchboardError,
    Unauthenticated,
)
from switchboard.platform.observe.metrics import Metrics
from switchboard.platform.security.policy import Permission, Policy, Principal

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


@dataclass
class _Call:
    number: int
    invite: Invite
    rule: DispatchRule
    bridge: CallBridge | None = None
    media_rate: int = 0
    hung_up: str = ""
    conversation: str = ""
    tools: dict[str, BuiltinTool] = field(default_factory=dict)


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
    ) -> None:
        self._plan = plan
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
            answered = sum(1 for c in self._calls.values() if c.bridge is not None)
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
            bridge.after_speech(lambda: engine.hang_up(number))

        def transfer(name: str, target: str) -> None:
            log.info(
                "the assistant transfers a call to %s", name, extra={"session": bridge.session}
            )
            bridge.after_speech(lambda: engine.transfer(number, target))

        return CallActions(
            live=lambda: bridge.live,
            hang_up_after_speech=hang_up,
            transfer_after_speech=transfer,
            send_keys=lambda keys: engine.send_dtmf(number, keys),
            destinations=call.rule.transfer,
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
        if self._plan.rule_for(trunk.name, invite.dialed) is None:
            return Refusal(404, "No such number")
        # For ``incoming``, on the loop: reported after this, so it is set before it.
        self._passed[invite.call] = trunk.name
        return None

    def _trunk(self, invite: Invite) -> Trunk | Refusal:
        """The trunk the INVITE comes from, its credentials checked if it has any."""
        answer = digest.parse(invite.authorization) if invite.authorization else None
        trunk = self._plan.trunk_of(invite.source)
        if trunk is None and answer is not None:
            trunk = self._plan.trunk_named(answer.username)
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
        call = _Call(number=invite.call, invite=invite, rule=rule)
        refusal = self._room(rule)
        if refusal is not None:
            self._refuse(invite.call, refusal.code, refusal.reason)
            return
        self._calls[call.number] = call
        self._spawn(self._admit(call))

    def media(self, call: int, codec: str, rate: int) -> None:
        held = self._calls.get(call)
        engine = self.engine
        if held is None or engine is None:
            return
        held.media_rate = rate
        playout = engine.playout(call)
        if held.bridge is not None and playout is not None:
            log.info("a call's media is up (%s at %d Hz)", codec, rate)
            held.bridge.begin(playout)

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
        if held.bridge is None:
            self._calls.pop(call, None)  # still being admitted: _admit lets it go
        else:
            held.bridge.hung_up(held.hung_up)

    async def close(self) -> None:
        self._closing = True
        for task in list(self._tasks):
            task.cancel()
        bridges = self.bridges()
        if bridges:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(CLOSE_TIMEOUT_S):
                    await asyncio.gather(*(b.close() for b in bridges), return_exceptions=True)

    # -- admission ---------------------------------------------------------------------------

    def _room(self, rule: DispatchRule) -> Refusal | None:
        if self._closing:
            return Refusal(503, "Server stopping")
        if len(self._calls) >= self._limits.max_calls:
            return Refusal(486, "Busy Here")
        in_workspace = sum(
            1 for c in self._calls.values() if c.rule.workspace_id == rule.workspace_id
        )
        if in_workspace >= self._limits.max_calls_per_workspace:
            return Refusal(486, "Busy Here")
        return None

    async def _admit(self, call: _Call) -> None:
        engine = self.engine
        if engine is None:
            return
        engine.ring(call.number)
        try:
            async with asyncio.timeout(ADMIT_TIMEOUT_S):
                principal, first = await self._session_for(call)
                await self._talks.check(principal, first)
        except (TimeoutError, SwitchboardError) as exc:
            code, reason = _refusal(exc)
            self._calls.pop(call.number, None)
            self._refuse(call.number, code, reason)
            log.info("a call to %s was refused: %s", call.invite.dialed, _said(exc))
            return
        except Exception:
            # Never a phone left ringing: a fault of ours ends the call, said as such.
            self._calls.pop(call.number, None)
            self._refuse(call.number, 500, "Server Internal Error")
            log.exception("admitting a call to %s failed", call.invite.dialed)
            return
        if call.hung_up or self._calls.get(call.number) is not call:
            self._calls.pop(call.number, None)
            return  # the caller gave up while it rang

        def talk(requests: AsyncIterator[pb.TalkRequest]) -> AsyncGenerator[pb.TalkResponse]:
            return self._talks.talk(principal, requests, Via())

        bridge = CallBridge(
            talk,
            first,
            hang_up=lambda: engine.hang_up(call.number),
            dtmf_pause_s=self._limits.dtmf_pause_s,
        )
        call.bridge = bridge
        call.tools = dict(tools.bound(self._actions(call, bridge, engine)))
        engine.answer(call.number)
        playout = engine.playout(call.number)
        if call.media_rate and playout is not None:
            bridge.begin(playout)
        self._spawn(self._until_ended(call, bridge))

    async def _session_for(self, call: _Call) -> tuple[Principal, pb.TalkRequest]:
        rule, invite = call.rule, call.invite
        user, known = rule.acts_as(invite.caller)
        principal = Principal.acting_for(user.user)
        workspace = f"workspaces/{rule.workspace_id}"
        await self._policy.authorize(principal, workspace, Permission.WRITE, "user")
        metadata = struct_pb2.Struct()
        metadata.update(
            {
                "channel": "sip",
                "caller": invite.caller,
                "caller_name": invite.display,
                "dialed": invite.dialed,
                "caller_known": known,
            }
        )
        caller = invite.caller or "an unknown number"
        made = await self._context.create_conversation(
            principal,
            cpb.CreateConversationRequest(
                parent=workspace,
                conversation=cpb.Conversation(
                    title=f"Call from {caller} to {invite.dialed}"[:200], metadata=metadata
                ),
                # Made once per call, never sent again: any fresh id.
                request_id=f"sip-{uuid.uuid4().hex}",
            ),
            timeout_s=ADMIT_TIMEOUT_S,
        )
        call.conversation = made.name
        first = pb.TalkRequest(
            start=pb.TalkStart(conversation=made.name, assistant=str(rule.assistant), barge_in=True)
        )
        return principal, first

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
        task = asyncio.get_running_loop().create_task(work, name="sip-admit")
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("a SIP call's task failed", exc_info=task.exception())


def _refusal(exc: BaseException) -> tuple[int, str]:
    """The SIP status a refused call gets, saying no more than a caller may know."""
    if isinstance(exc, QuotaExceeded):
        return 486, "Busy Here"
    if isinstance(exc, (PermissionDenied, NotFound, Unauthenticated)):
        return 403, "Forbidden"
    # FailedPrecondition (the assistant has no voice), a timeout, the rest: not the caller's.
    return 503, "Service Unavailable"


def _said(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "admitting it timed out"
    message = getattr(exc, "message", "")
    return str(message)[:300] if message else type(exc).__name__
