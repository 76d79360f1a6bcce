"""PJSIP's user agent in this process: SIP signalling, RTP and the telephone codecs, in C.

PJSIP (through ``pjsua2``, its SWIG binding) keeps one library per process, and its calls
must come from a thread it knows. So one thread of ours, ``sip-engine``, owns it whole:
it creates the library, runs its events (``libHandleEvents``) and carries out every
command the loop queues (``_do``); nothing else touches a PJSIP object. What PJSIP
reports (an INVITE, a call's media, a key pressed, a hang-up) goes to the loop with
``call_soon_threadsafe``, as ``CallEvents`` calls.

Audio takes the shortest way. Each call's audio stream is bridged, in PJSIP's conference
bridge, to a port of ours at the call's own rate (8 kHz for PCMU and PCMA, 16 kHz for
G.722): PJSIP's media clock hands it each 20 ms the caller sent (``onFrameReceived``,
passed to the loop as it comes) and asks it for the next 20 ms to send
(``onFrameRequested``, taken from the call's ``Playout`` under a lock, silence when it is
empty). So the codecs, RTP, jitter and the clock are PJSIP's; Python sees one PCM frame
each way every 20 ms per call.

An INVITE is screened on this thread before anything else sees it (``Screen``: the trunk
by source address, the INVITE rate per source, the number dialed), so an unknown trunk or
a flood is answered here and never reaches the loop. PJSIP itself answers malformed SIP
(400) and an offer with no codec in common (488).

A call out (``dial``) goes from the account of its trunk (``OutboundAccount``: the caller
ID it presents, the credentials it answers the carrier's challenge with), made at start;
its progress comes back as any call's, with ``progress`` (180, 183) and ``confirmed``
(answered) besides.

With ``tls_host``, SIP over TLS listens beside UDP (and carries calls out to a ``tls``
trunk). A call's audio is SRTP when its offer carries keys (SDES), and always on an
outbound account with ``srtp``; an INVITE says how it came (``Invite.tls``,
``srtp_offered``), so the screen holds a trunk to what it requires.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import gc
import itertools
import logging
import queue
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

from switchboard.dispatcher.talk.sip.pjsip import (
    Playout,
    Ports,
    display_of,
    header_of,
    new_account,
    new_call,
    new_log_writer,
    stdout_to_stderr,
    uri_of,
    user_of,
)

log = logging.getLogger("switchboard.dispatcher.talk.sip")

#: What this user agent takes, best first; every other codec PJSIP has is disabled.
CODECS: Final = ("G722/16000/1", "PCMU/8000/1", "PCMA/8000/1")
#: How long one pass of PJSIP's events waits at most (ms): the commands' latency.
POLL_MS: Final = 10
#: The call slots the ``pjsua2-python`` wheel's PJSIP is built with (its PJSUA_MAX_CALLS:
#: a larger ``maxCalls`` is lowered to it), ringing and refused calls included.
PJSIP_MAX_CALLS: Final = 4
#: The wheel's I/O queue holds 64 sockets, and a closed one's slot comes back after half
#: a second (PJ_IOQUEUE_KEY_FREE_DELAY): calls ended within that time, at most, before
#: refusals wait (each call has two sockets; the transport and the live calls the rest).
SOCKET_LINGER_S: Final = 0.6
MAX_RECENT_ENDS: Final = 16
#: How long the engine may take to start or stop.
START_TIMEOUT_S: Final = 10.0
_SOURCE: Final = re.compile(r"^\[?([0-9A-Fa-f:.]+)\]?:(\d+)$")


class EngineFailed(Exception):
    """PJSIP could not start (its port taken, its address not this host's)."""


@dataclass(frozen=True)
class Invite:
    """An INVITE PJSIP received, as the screen and the loop see it."""

    call: int  # this engine's number for the call
    source: str  # the sending address (IP)
    dialed: str  # the Request-URI's user part: the number called
    caller: str  # the From URI's user part: the caller ID
    display: str  # the From header's display name
    request_uri: str = ""  # the Request-URI whole (a digest answer names it)
    authorization: str = ""  # the Authorization header's value, if any
    tls: bool = False  # it came over SIP over TLS
    srtp_offered: bool = False  # its offer carries SRTP keys (SDES ``a=crypto``)


@dataclass(frozen=True)
class Refusal:
    code: int
    reason: str
    #: Headers the refusal carries (a 401's WWW-Authenticate).
    headers: tuple[tuple[str, str], ...] = ()


class Screen(Protocol):
    """Decides on the engine's thread, with no I/O, whether an INVITE may go on."""

    def __call__(self, invite: Invite) -> Refusal | None: ...


class CallEvents(Protocol):
    """What the engine reports, each on the loop."""

    def incoming(self, invite: Invite) -> None: ...

    def media(self, call: int, codec: str, rate: int, srtp: bool) -> None: ...

    def audio(self, call: int, pcm: bytes) -> None: ...

    def dtmf(self, call: int, digit: str) -> None: ...

    def ended(self, call: int, code: int, reason: str) -> None: ...

    def progress(self, call: int, code: int) -> None:
        """A call placed rings (180) or has early media (183)."""
        ...

    def confirmed(self, call: int) -> None:
        """The call is up: answered, and the answer acknowledged."""
        ...


@dataclass(frozen=True)
class OutboundAccount:
    """How calls out on a trunk present themselves (``rules.Outbound``)."""

    trunk: str
    caller_id: str
    username: str = ""
    password: str = field(default="", repr=False)
    srtp: bool = False  # its calls' audio must be SRTP (their INVITEs go over TLS)


@dataclass(frozen=True)
class EngineOptions:
    host: str = "127.0.0.1"  # the address SIP binds
    port: int = 0  # 0: any the system picks
    public_host: str = ""  # what Contact and SDP name (NAT); the bound host if empty
    rtp_low: int = 0  # RTP ports low..low+count-1 (0: any)
    rtp_count: int = 0
    max_calls: int = PJSIP_MAX_CALLS
    user_agent: str = "Switchboard"
    outbound: tuple[OutboundAccount, ...] = ()
    #: SIP over TLS, on ``tls_host:tls_port`` with this certificate and key (PEM files);
    #: no TLS when ``tls_host`` is empty. Calls over it may have SRTP (SDES).
    tls_host: str = ""
    tls_port: int = 0
    tls_cert: str = ""
    tls_key: str = field(default="", repr=False)
    #: What a carrier's certificate must chain to on a call out (a PEM file).
    tls_ca: str = ""


@dataclass
class _Leg:
    """One call as the engine thread holds it (PJSIP's objects stay referenced until the
    call is over and its callback has returned: SWIG's directors must outlive it)."""

    number: int
    call: Any
    port: Any = None
    playout: Playout | None = None
    ended: bool = False
    extra: list[Any] = field(default_factory=list)


class SipEngine:
    """The user agent (see the module doc). ``start`` on the loop, then commands from the
    loop; ``stop`` hangs up every call and ends the library."""

    def __init__(self, options: EngineOptions, screen: Screen, events: CallEvents) -> None:
        self._options = options
        self._screen = screen
        self._events = events
        self._commands: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._legs: dict[int, _Leg] = {}
        #: Callers' frames waiting for the loop, and whether it was woken for them.
        self._inbox: collections.deque[tuple[int, bytes]] = collections.deque()
        self._inbox_lock = threading.Lock()
        self._inbox_woken = False
        #: When calls ended lately, and refusals waiting for that to slow (``_churning``).
        self._ended_at: collections.deque[float] = collections.deque()
        self._held: collections.deque[tuple[_Leg, Refusal]] = collections.deque()
        #: Numbers for calls, taken on either thread (``next`` on a count is atomic).
        self._numbers = itertools.count(1)
        #: Each outbound trunk's PJSIP account.
        self._trunks: dict[str, Any] = {}
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._ready: asyncio.Future[int] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ep: Any = None
        self._account: Any = None
        self._writer: Any = None
        self._ports = Ports(self)
        #: The SIP port bound (after ``start``), and the TLS one (0: none).
        self.port = 0
        self.tls_port = 0

    # -- the loop's side -------------------------------------------------------------------

    async def start(self) -> int:
        """Start the library on its thread; the SIP port it bound."""
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._ready = loop.create_future()
        self._thread = threading.Thread(target=self._run, name="sip-engine", daemon=True)
        self._thread.start()
        try:
            async with asyncio.timeout(START_TIMEOUT_S):
                self.port = await self._ready
        except TimeoutError:
            raise EngineFailed("PJSIP did not start in time") from None
        except Exception as exc:  # noqa: BLE001 - PJSIP's Error, said in its words
            raise EngineFailed(_said(exc)) from None
        return self.port

    async def stop(self) -> None:
        thread = self._thread
        if thread is None:
            return
        self._stopping.set()
        await asyncio.to_thread(thread.join, START_TIMEOUT_S)
        self._thread = None

    def playout(self, call: int) -> Playout | None:
        leg = self._legs.get(call)
        return None if leg is None else leg.playout

    def ring(self, call: int) -> None:
        self._do(call, lambda leg: self._answer(leg, 180))

    def answer(self, call: int) -> None:
        self._do(call, lambda leg: self._answer(leg, 200))

    def hang_up(self, call: int, code: int = 0, reason: str = "") -> None:
        """End a call: an unanswered one is refused with ``code`` (603 if 0)."""
        if code:
            self._do(call, lambda leg: self._refuse(leg, Refusal(code, reason)))
        else:
            self._do(call, lambda leg: self._hang_up(leg, code, reason))

    def reserve(self) -> int:
        """A number for a call to place (``dial``)."""
        return next(self._numbers)

    def dial(self, number: int, trunk: str, uri: str) -> None:
        """Call ``uri`` from ``trunk``'s account as call ``number`` (``reserve``); its
        progress is reported as any call's (``ended`` with 500 if PJSIP refuses it)."""

        def dial() -> None:
            import pjsua2 as pj

            account = self._trunks.get(trunk)
            if account is None:
                self._report(self._events.ended, number, 404, "no such outbound trunk")
                return
            leg = self._leg(new_call(self, pj.PJSUA_INVALID_ID, account), number)
            try:
                leg.call.makeCall(uri, pj.CallOpParam(True))
            except Exception as exc:  # noqa: BLE001 - PJSIP's Error: reported as the end
                self._legs.pop(number, None)
                self._unplug(leg)
                self._report(self._events.ended, number, 500, _said(exc))

        self._commands.put(dial)

    def send_dtmf(self, call: int, digits: str) -> None:
        self._do(call, lambda leg: leg.call.dialDtmf(digits))

    def transfer(self, call: int, target: str) -> None:
        """A blind transfer: REFER the caller to ``target`` (a SIP URI)."""

        def refer(leg: _Leg) -> None:
            import pjsua2 as pj

            leg.call.xfer(target, pj.CallOpParam(True))

        self._do(call, refer)

    # -- the engine's thread ---------------------------------------------------------------

    def _do(self, call: int, action: Callable[[_Leg], None]) -> None:
        def run() -> None:
            leg = self._legs.get(call)
            if leg is None or leg.ended:
                return
            try:
                action(leg)
            except Exception as exc:  # noqa: BLE001 - PJSIP's Error: the call is ending
                log.info("a SIP command on call %d failed: %s", call, _said(exc))

        self._commands.put(run)

    def _report(self, callback: Callable[..., None], *args: Any) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            # RuntimeError: the loop closed meanwhile (the process is stopping).
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(callback, *args)

    def _run(self) -> None:
        try:
            port = self._open()
        except BaseException as exc:  # noqa: BLE001 - told to ``start``'s caller
            self._account = None
            if self._ep is not None:
                with contextlib.suppress(Exception):  # as far as it got
                    self._ep.libDestroy()
                self._ep = None
            self._settle(exc)
            return
        self._settle(port)
        try:
            while not self._stopping.is_set():
                self._drain()
                self._release_held()
                self._ep.libHandleEvents(POLL_MS)
        finally:
            self._close()

    def _settle(self, outcome: int | BaseException) -> None:
        ready, loop = self._ready, self._loop
        if ready is None or loop is None:
            return

        def settle() -> None:
            if ready.done():
                return
            if isinstance(outcome, BaseException):
                ready.set_exception(outcome)
            else:
                ready.set_result(outcome)

        loop.call_soon_threadsafe(settle)

    def _drain(self) -> None:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            command()

    def _open(self) -> int:
        import pjsua2 as pj

        options = self._options
        ep = pj.Endpoint()
        with stdout_to_stderr():
            # pjlib writes its first lines to the console before any log setting of ours
            # applies: onto stderr with the logs, not onto stdout.
            ep.libCreate()
        self._ep = ep
        config = pj.EpConfig()
        config.uaConfig.threadCnt = 0
        config.uaConfig.mainThreadOnly = False
        config.uaConfig.maxCalls = options.max_calls
        config.uaConfig.userAgent = options.user_agent
        config.logConfig.level = 1
        config.logConfig.consoleLevel = 1
        # PJSIP deletes its log writer in ``libDestroy``: the C++ side owns it (a Python
        # delete after that would free it twice), and this reference keeps it alive.
        self._writer = new_log_writer()
        self._writer.__disown__()
        config.logConfig.writer = self._writer
        config.medConfig.clockRate = 16_000
        config.medConfig.sndClockRate = 16_000
        config.medConfig.noVad = True
        config.medConfig.ecTailLen = 0  # no echo canceller: the caller's phone has its own
        ep.libInit(config)
        transport = pj.TransportConfig()
        transport.port = options.port
        transport.boundAddress = options.host
        transport.publicAddress = options.public_host or options.host
        tid = ep.transportCreate(pj.PJSIP_TRANSPORT_UDP, transport)
        if options.tls_host:
            self.tls_port = self._tls_transport(ep)
        ep.audDevManager().setNullDev()
        ep.libStart()
        wanted = {codec: 255 - i for i, codec in enumerate(CODECS)}
        for info in ep.codecEnum2():
            ep.codecSetPriority(info.codecId, wanted.get(info.codecId, 0))
        account_config = pj.AccountConfig()
        public = options.public_host or options.host
        account_config.idUri = f"sip:switchboard@{public}"
        media = account_config.mediaConfig.transportConfig
        media.boundAddress = options.host
        media.publicAddress = public
        media.port = options.rtp_low
        media.portRange = options.rtp_count
        # SRTP when a call offers it, plain RTP otherwise. PJSIP's own "keys only over
        # TLS" would refuse every call over UDP (406) on this one account; the screen
        # holds a trunk with ``srtp`` to TLS instead (its offer's keys never in the clear).
        account_config.mediaConfig.srtpUse = (
            pj.PJMEDIA_SRTP_OPTIONAL if options.tls_host else pj.PJMEDIA_SRTP_DISABLED
        )
        account_config.mediaConfig.srtpSecureSignaling = 0
        self._account = new_account(self)
        self._account.create(account_config, True)
        for trunk in options.outbound:
            self._trunks[trunk.trunk] = self._outbound_account(trunk, public)
        name = str(ep.transportGetInfo(tid).localName)
        matched = _SOURCE.match(name)
        return int(matched.group(2)) if matched else options.port

    def _tls_transport(self, ep: Any) -> int:
        """SIP over TLS: its listener (a TLS transport serves calls out too); the port."""
        import pjsua2 as pj

        options = self._options
        transport = pj.TransportConfig()
        transport.port = options.tls_port
        transport.boundAddress = options.tls_host
        transport.publicAddress = options.public_host or options.tls_host
        transport.tlsConfig.certFile = options.tls_cert
        transport.tlsConfig.privKeyFile = options.tls_key
        transport.tlsConfig.method = pj.PJSIP_TLSV1_2_METHOD
        # A call out checks whom it reached: the carrier's chain, and its name against
        # the address called (a failed check ends the call before its INVITE is sent).
        transport.tlsConfig.CaListFile = options.tls_ca  # sic: SWIG takes any other name silently
        transport.tlsConfig.verifyServer = True
        tid = ep.transportCreate(pj.PJSIP_TRANSPORT_TLS, transport)
        matched = _SOURCE.match(str(ep.transportGetInfo(tid).localName))
        return int(matched.group(2)) if matched else options.tls_port

    def _outbound_account(self, trunk: OutboundAccount, public: str) -> Any:
        """An account for calls out on ``trunk``: its caller ID, its credentials for the
        carrier's challenge; it registers nowhere (the carrier knows us by them)."""
        import pjsua2 as pj

        config = pj.AccountConfig()
        config.idUri = f"sip:{trunk.caller_id}@{public}"
        if trunk.username:
            config.sipConfig.authCreds.append(
                pj.AuthCredInfo("digest", "*", trunk.username, 0, trunk.password)
            )
        media = config.mediaConfig.transportConfig
        media.boundAddress = self._options.host
        media.publicAddress = public
        media.port = self._options.rtp_low
        media.portRange = self._options.rtp_count
        if trunk.srtp:
            config.mediaConfig.srtpUse = pj.PJMEDIA_SRTP_MANDATORY
            config.mediaConfig.srtpSecureSignaling = 1
        account = new_account(self)
        account.create(config, False)
        return account

    def _close(self) -> None:
        import pjsua2 as pj

        for leg in list(self._legs.values()):
            if not leg.ended:
                with contextlib.suppress(Exception):  # PJSIP's Error: already ending
                    leg.call.hangup(pj.CallOpParam(True))
        for _ in range(50):
            if all(leg.ended for leg in self._legs.values()):
                break
            self._ep.libHandleEvents(POLL_MS)
        for leg in list(self._legs.values()):
            self._unplug(leg)
        self._legs.clear()
        self._ports.abandon()
        # Whatever of PJSIP's is left in a cycle goes now, on this thread: the collector
        # running on another thread, or after the library, would crash the process.
        gc.collect()
        for account in [*self._trunks.values(), self._account]:
            if account is not None:
                with contextlib.suppress(Exception):
                    account.shutdown()
        self._trunks.clear()
        self._account = None
        try:
            self._ep.libDestroy()
        except Exception as exc:  # noqa: BLE001 - the process stops either way
            log.warning("PJSIP did not stop cleanly: %s", _said(exc))
        self._ep = None
        self._writer = None

    def _unplug(self, leg: _Leg) -> None:
        if leg.port is not None:
            for audio in leg.extra:
                with contextlib.suppress(Exception):  # PJSIP's Error: already gone
                    audio.stopTransmit(leg.port)
                with contextlib.suppress(Exception):
                    leg.port.stopTransmit(audio)
            rate = leg.playout.rate if leg.playout else 8_000
            self._ports.give_back(leg.port, rate, Playout(rate))
        # PJSIP's objects are let go here, on this thread, and the leg's cycle with its
        # call broken: the garbage collector must never delete one on another thread
        # or after the library is gone (a crash).
        leg.extra.clear()
        leg.port = None
        if leg.call is not None:
            leg.call.leg = None
            leg.call = None

    # -- PJSIP's callbacks (on this thread) ------------------------------------------------

    def on_invite(self, call_id: int, source: str, message: str) -> None:
        leg = self._leg(new_call(self, call_id))
        info = leg.call.getInfo()
        matched = _SOURCE.match(source)
        head = message.split("\r\n\r\n", 1)[0].replace("\r\n", "\n").split("\n")
        parts = head[0].split(" ")
        request_uri = parts[1] if len(parts) == 3 else ""
        invite = Invite(
            call=leg.number,
            source=matched.group(1) if matched else source,
            dialed=user_of(request_uri),
            caller=user_of(uri_of(str(info.remoteUri))),
            display=display_of(str(info.remoteUri)),
            request_uri=request_uri[:512],
            authorization=header_of(head[1:], "authorization")[:2048],
            # PJSIP names the transport an INVITE came by in the Contact it answers with.
            tls=";transport=tls" in str(info.localContact).lower(),
            srtp_offered="\na=crypto:" in message.replace("\r\n", "\n").lower(),
        )
        refusal = self._screen(invite)
        if refusal is not None:
            self._refuse(leg, refusal)
            return
        self._report(self._events.incoming, invite)

    def _leg(self, call: Any, number: int = 0) -> _Leg:
        leg = _Leg(number=number or next(self._numbers), call=call)
        call.leg = leg
        self._legs[leg.number] = leg
        return leg

    def _answer(self, leg: _Leg, code: int) -> None:
        import pjsua2 as pj

        param = pj.CallOpParam(True)
        param.statusCode = code
        leg.call.answer(param)

    def _refuse(self, leg: _Leg, refusal: Refusal) -> None:
        """A final answer to an INVITE not answered yet, once it is safe (``_churning``)."""
        if self._churning():
            self._held.append((leg, refusal))
        else:
            self._send_refusal(leg, refusal)

    def _churning(self) -> bool:
        """Whether ending one more call now could run PJSIP out of sockets.

        PJSIP makes a call's RTP and RTCP sockets when its INVITE arrives, before any
        callback, and a closed socket's slot in its I/O queue comes back only after
        ``SOCKET_LINGER_S``; the wheel's queue holds 64 sockets, and running out
        aborts the process. A flood of INVITEs refused at once would do that in a
        fraction of a second. So while many calls ended lately, a refusal waits and
        its call keeps its slot: with every slot held, PJSIP answers further INVITEs 486
        itself, before making any socket."""
        now = time.monotonic()
        while self._ended_at and now - self._ended_at[0] > SOCKET_LINGER_S:
            self._ended_at.popleft()
        return len(self._ended_at) >= MAX_RECENT_ENDS

    def _release_held(self) -> None:
        while self._held and not self._churning():
            leg, refusal = self._held.popleft()
            if not leg.ended and leg.call is not None:
                with contextlib.suppress(Exception):  # PJSIP's Error: it ended meanwhile
                    self._send_refusal(leg, refusal)

    def _send_refusal(self, leg: _Leg, refusal: Refusal) -> None:
        """With headers it goes as an answer (a hang-up's final response carries none of
        them: a 401 would lose its challenge)."""
        import pjsua2 as pj

        if not refusal.headers:
            self._hang_up(leg, refusal.code, refusal.reason)
            return
        param = pj.CallOpParam(True)
        param.statusCode = refusal.code
        param.reason = refusal.reason
        for name, value in refusal.headers:
            header = pj.SipHeader()
            header.hName = name
            header.hValue = value
            param.txOption.headers.append(header)
        leg.call.answer(param)

    def _hang_up(self, leg: _Leg, code: int, reason: str) -> None:
        import pjsua2 as pj

        param = pj.CallOpParam(True)
        if code:
            param.statusCode = code
        if reason:
            param.reason = reason
        leg.call.hangup(param)

    def on_media(self, leg: _Leg) -> None:
        import pjsua2 as pj

        if leg.port is not None:
            return
        info = leg.call.getInfo()
        for index, media in enumerate(info.media):
            if media.type != pj.PJMEDIA_TYPE_AUDIO or media.status != pj.PJSUA_CALL_MEDIA_ACTIVE:
                continue
            stream = leg.call.getStreamInfo(index)
            rate = 16_000 if int(stream.codecClockRate) >= 16_000 else 8_000
            playout = Playout(rate)
            port = self._ports.lend(leg.number, rate, playout)
            audio = leg.call.getAudioMedia(index)
            audio.startTransmit(port)
            port.startTransmit(audio)
            leg.port, leg.playout = port, playout
            leg.extra.append(audio)
            srtp = bool(int(stream.proto) & pj.PJMEDIA_TP_PROFILE_SRTP)
            self._report(self._events.media, leg.number, str(stream.codecName), rate, srtp)
            return

    @property
    def account(self) -> Any:
        return self._account

    def on_key(self, leg: _Leg, digit: str) -> None:
        self._report(self._events.dtmf, leg.number, digit)

    def on_audio(self, number: int, pcm: bytes) -> None:
        """On PJSIP's media thread: the frame is handed to the loop. PJSIP's clock hands
        every call its frame in the same tick, so the loop is woken once a tick for all
        of them, not once a frame (each wake-up is a loop pass: at four calls, a quarter
        of what the frames cost the loop)."""
        with self._inbox_lock:
            self._inbox.append((number, pcm))
            if self._inbox_woken:
                return
            self._inbox_woken = True
        self._report(self._deliver_audio)

    def _deliver_audio(self) -> None:
        with self._inbox_lock:
            frames = list(self._inbox)
            self._inbox.clear()
            self._inbox_woken = False
        audio = self._events.audio
        for number, pcm in frames:
            audio(number, pcm)

    def on_transferred(self, leg: _Leg, code: int) -> None:
        """The REFER's outcome: the caller reached the destination (a 2xx NOTIFY), and this
        leg is done (a blind transfer's end), or the transfer failed and the call goes on."""
        if 200 <= code < 300:
            log.info("a call was transferred; this leg hangs up")
            self._hang_up(leg, 0, "")
        else:
            log.info("a call's transfer failed (%d); the call goes on", code)

    def on_state(self, leg: _Leg) -> None:
        import pjsua2 as pj

        info = leg.call.getInfo()
        if info.state == pj.PJSIP_INV_STATE_EARLY and not leg.ended:
            self._report(self._events.progress, leg.number, int(info.lastStatusCode))
        elif info.state == pj.PJSIP_INV_STATE_CONFIRMED and not leg.ended:
            self._report(self._events.confirmed, leg.number)
        elif info.state == pj.PJSIP_INV_STATE_DISCONNECTED and not leg.ended:
            leg.ended = True
            self._ended_at.append(time.monotonic())
            self._report(
                self._events.ended, leg.number, int(info.lastStatusCode), str(info.lastReason)
            )
            # Let go here, in the callback (pjsua2 allows it): the call's objects are
            # deleted once it returns, while its id is still this call's. Deleted later,
            # a new call given the same slot meanwhile would lose its callbacks.
            self._legs.pop(leg.number, None)
            self._unplug(leg)


def _said(exc: BaseException) -> str:
    info = getattr(exc, "info", None)
    if callable(info):
        try:
            return str(info())[:300]
        except Exception:  # noqa: BLE001
            return type(exc).__name__
    return str(exc)[:300]
