"""``DispatcherService.ConnectTalk``: this process's WebRTC peers, each one Talk session.

The page's offer comes with Talk's first frame (a ``start`` or a ``resume``). Before any
peer is made, the call is refused with the status the session would end with
(``Talks.check``: the fields, whose session a resume names, access, the conversation, the
assistant's voice, the sessions' limits), so a browser learns of a mistake from the call,
not from a data channel that never opens; this registry's own refusals come after those,
so someone else's session is NOT_FOUND whatever state it is in. Then ``TalkPeer`` answers
and bridges (``peer.py``); this registry holds it until it ends, within limits of its own:
peers per process and per user (a peer that has not connected yet holds no session, so
Talk's limits alone would not bound them), and one peer per session, so a resumed session
is never fed by two microphones.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Final

from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.dispatcher.ports.peers import Via
from switchboard.dispatcher.talk.session import Talks
from switchboard.dispatcher.talk.webrtc.ice import IceServers
from switchboard.dispatcher.talk.webrtc.peer import PeerOptions, TalkPeer, offer_problems
from switchboard.platform.errors import (
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    QuotaExceeded,
)
from switchboard.platform.imports import imported
from switchboard.platform.security.policy import Principal
from switchboard.platform.values.resources import VoiceSessionName

log = logging.getLogger("switchboard.dispatcher.talk.webrtc")

#: How long closing every peer may take when the process stops.
CLOSE_TIMEOUT_S: Final = 5.0
#: The media bridge, which imports aiortc and PyAV.
_MEDIA: Final = "switchboard.dispatcher.talk.webrtc.media"


@dataclass(frozen=True)
class PeerLimits:
    """How many peers this process carries (``SWITCHBOARD_WEBRTC_MAX_PEERS*``)."""

    max_peers: int = 12
    max_peers_per_user: int = 4


class Peers:
    """The peers of this process, by session and by user (see the module doc)."""

    def __init__(
        self,
        talks: Talks,
        settings: PeerOptions,
        limits: PeerLimits,
        ice: IceServers | None = None,
    ) -> None:
        self._talks = talks
        self._settings = settings
        self.ice = ice or IceServers(())
        self._limits = limits
        self._peers: dict[TalkPeer, str] = {}  # each peer: its user's id
        self._by_user: dict[str, int] = {}
        self._closing = False

    @property
    def open_peers(self) -> int:
        return len(self._peers)

    def __iter__(self) -> Iterator[TalkPeer]:
        return iter(list(self._peers))

    def carrying(self, session: str) -> bool:
        """Whether a peer of this process carries ``session`` now."""
        return any(peer.session == session for peer in self._peers)

    async def connect(
        self, principal: Principal, request: pb.ConnectTalkRequest, via: Via
    ) -> pb.ConnectTalkResponse:
        first = _first_frame(request)
        resumed = first.resume.session if first.WhichOneof("frame") == "resume" else ""
        # The process's first peer imports aiortc and PyAV (``peer.py`` says why so
        # late) in a worker thread, not on the loop every other call shares.
        await imported(_MEDIA)
        # Talk's checks come first: they refuse someone else's session as absent
        # (NOT_FOUND) before anything is looked at, and every refusal below depends on
        # state (this process's peers, the session's formats) that a stranger must not
        # learn. From here to ``_hold`` nothing awaits, so no other call comes between.
        stored = await self._talks.check(principal, first)
        self._check_room(principal)
        if stored is not None:
            self._check_formats(stored)
        if resumed and self.carrying(resumed):
            raise FailedPrecondition(
                f"{resumed} is carried by another peer; close that peer (or let its "
                "connection fail) before resuming the session on a new one",
                metadata={"session": resumed},
            )

        def talk(requests: AsyncIterator[pb.TalkRequest]) -> AsyncGenerator[pb.TalkResponse]:
            return self._talks.talk(principal, requests, via)

        # Each peer's TURN credential is minted when it is made: it outlives no peer long.
        settings = dataclasses.replace(self._settings, ice_servers=self.ice.for_server())
        peer = TalkPeer(talk, first, settings)
        self._hold(peer, principal)
        try:
            answer = await peer.answer(request.offer)
        except BaseException:
            self._let_go(peer)
            with contextlib.suppress(Exception):
                await peer.close("refused")
            raise
        asyncio.get_running_loop().create_task(
            self._until_ended(peer), name="talk-webrtc-peer"
        ).add_done_callback(_heard)
        return pb.ConnectTalkResponse(answer=answer, session=resumed)

    def ice_servers(self, principal: Principal) -> pb.GetIceServersResponse:
        """GetIceServers: what the caller's page gathers with before its offer."""
        return self.ice.for_page(principal.user_id)

    async def close(self) -> None:
        """Close every peer (the process stops): their sessions end as a dropped
        stream does, so each can be resumed on another replica."""
        self._closing = True
        peers = list(self._peers)
        if peers:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(CLOSE_TIMEOUT_S):
                    await asyncio.gather(
                        *(p.close("the server is stopping") for p in peers),
                        return_exceptions=True,
                    )

    # -- limits ---------------------------------------------------------------------------

    def _check_room(self, principal: Principal) -> None:
        if self._closing:
            raise FailedPrecondition("this server is stopping; connect again to another")
        if len(self._peers) >= self._limits.max_peers:
            raise QuotaExceeded(
                f"this server carries at most {self._limits.max_peers} WebRTC peers at once",
                subject="webrtc/peers",
            )
        if self._by_user.get(principal.user_id, 0) >= self._limits.max_peers_per_user:
            raise QuotaExceeded(
                f"a user may hold at most {self._limits.max_peers_per_user} WebRTC peers at once",
                subject=f"webrtc/peers/{principal.user_name}",
            )

    def _check_formats(self, stored: pb.VoiceSession) -> None:
        """A resumed session must speak what the bridge converts to: PCM16 at its rates."""
        wanted = (self._settings.input_rate, self._settings.output_rate)
        has = (stored.input_format.sample_rate_hz, stored.output_format.sample_rate_hz)
        if has != wanted:
            raise FailedPrecondition(
                f"{stored.name} was started with audio at {has[0]} / {has[1]} Hz; a WebRTC "
                f"peer carries sessions at {wanted[0]} / {wanted[1]} Hz: resume it with Talk",
                metadata={"session": stored.name},
            )

    def _hold(self, peer: TalkPeer, principal: Principal) -> None:
        self._peers[peer] = principal.user_id
        self._by_user[principal.user_id] = self._by_user.get(principal.user_id, 0) + 1

    def _let_go(self, peer: TalkPeer) -> None:
        user = self._peers.pop(peer, None)
        if user is None:
            return
        left = self._by_user.get(user, 1) - 1
        if left > 0:
            self._by_user[user] = left
        else:
            self._by_user.pop(user, None)

    async def _until_ended(self, peer: TalkPeer) -> None:
        try:
            await peer.ended.wait()
            await peer.close(peer.outcome)
        finally:
            self._let_go(peer)
        # Frames dropped because the session did not keep up, or sent too late for the
        # page, say the process is overloaded (BENCHMARKS.md, "Voice over WebRTC"): worth
        # a warning when there were any.
        late = peer.speech.late_frames
        level = logging.WARNING if peer.dropped_frames or late else logging.INFO
        log.log(
            level,
            "a WebRTC peer ended (%s); %d audio frames dropped, %d answer frames too late",
            peer.outcome or "the session ended",
            peer.dropped_frames,
            late,
            extra={"session": peer.session},
        )


def _first_frame(request: pb.ConnectTalkRequest) -> pb.TalkRequest:
    """Talk's first frame from the call, or INVALID_ARGUMENT naming each bad field."""
    violations = [
        FieldViolation(field="offer", description=p) for p in offer_problems(request.offer)
    ]
    kind = request.WhichOneof("session")
    if kind is None:
        violations.append(
            FieldViolation(field="session", description="start or resume is required")
        )
    elif kind == "resume":
        try:
            VoiceSessionName.parse(request.resume.session, "resume.session")
        except InvalidArgument as exc:
            violations.extend(exc.violations)
    if violations:
        raise InvalidArgument(f"{violations[0].field}: {violations[0].description}", violations)
    if kind == "start":
        return pb.TalkRequest(start=request.start)
    return pb.TalkRequest(resume=request.resume)


def _heard(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("a WebRTC peer's watch failed", exc_info=task.exception())
