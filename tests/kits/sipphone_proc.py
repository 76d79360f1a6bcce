"""A real SIP phone (PJSIP's pjsua2) in a process of its own, driven over stdin/stdout.

PJSIP allows one ``Endpoint`` per process and the server under test may run its own, so
the tests' phone lives here; ``tests/kits/sipphone.py`` starts it and speaks for it. It
needs only the standard library, numpy and pjsua2, so it runs by path::

    python tests/kits/sipphone_proc.py --workdir DIR [--codec PCMU/8000/1 ...]
        [--auto-answer] [--ring-ms 200] [--refer-code 202] [--log-level 1]
        [--tls [--tls-cert PEM --tls-key PEM]] [--srtp off|optional|mandatory]

Protocol: one JSON object a line each way. A command is ``{"id": 1, "cmd": "call", ...}``
and is answered ``{"ok": 1, ...}`` or ``{"error": 1, "message": "..."}``; everything else
written is an event, ``{"event": "...", ...}`` (see ``Phone``'s methods for each).

Threads: the main thread created the library and is the only one that calls it (a
thread that did not create it would have to be registered); it pumps
``libHandleEvents(10)`` and runs the commands a reader thread queues from stdin. PJSIP's
media clock thread calls the audio ports (``onFrameRequested``/``onFrameReceived``) and
its media worker reports RFC 4733 digits; the ports touch only their own state, under a
lock, and every event from another thread waits for the main one to write it, so stdout
has a single writer.

Lifetimes (a prototype crashed on each of these): every ``Call`` and audio port stays
referenced until its call is DISCONNECTED and that callback has returned; the main loop
drops them afterwards, and drops them all before ``libDestroy``. A disconnected call is
never hung up again.

Transfer: a REFER is reported (``transfer`` event with the Refer-To target) and, by
default, accepted with 202 the way a phone does: PJSIP then calls the target on a new
call, which gets its own number (``new_n`` in the event) and its own events, so a test
can point the transfer at another phone. ``--refer-code`` set to a failure (say 603)
rejects every REFER instead.

PJSIP prints to fd 1 before any log setting applies, so fd 1 is pointed at stderr at
start and the protocol is written to a private copy of the original stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import queue
import sys
import threading
import time
import traceback
import wave
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Final

import numpy as np
import pjsua2 as pj

RATE: Final = 16_000
SRTP_USE: Final = {
    "off": pj.PJMEDIA_SRTP_DISABLED,
    "optional": pj.PJMEDIA_SRTP_OPTIONAL,
    "mandatory": pj.PJMEDIA_SRTP_MANDATORY,
}
FRAME_MS: Final = 20
FRAME_SAMPLES: Final = RATE * FRAME_MS // 1000
FRAME_BYTES: Final = FRAME_SAMPLES * 2
SILENT_FRAME: Final = bytes(FRAME_BYTES)
DEFAULT_CODECS: Final = ("PCMU/8000/1", "PCMA/8000/1", "G722/16000/1")
#: What the phone hears louder than this (RMS of a 20 ms frame, PCM16) is sound.
SOUND_RMS: Final = 200.0
#: Sound after this much quiet is a new ``sound`` event; this much quiet after sound
#: is a ``quiet`` event (a pause between words is shorter).
QUIET_MS: Final = 500
#: On quit: the longest wait for the calls hung up to end, then a last pump for the
#: final responses to leave.
QUIT_WAIT_S: Final = 2.0
QUIT_PUMP_S: Final = 0.2
STATES: Final = {
    pj.PJSIP_INV_STATE_NULL: "NULL",
    pj.PJSIP_INV_STATE_CALLING: "CALLING",
    pj.PJSIP_INV_STATE_INCOMING: "INCOMING",
    pj.PJSIP_INV_STATE_EARLY: "EARLY",
    pj.PJSIP_INV_STATE_CONNECTING: "CONNECTING",
    pj.PJSIP_INV_STATE_CONFIRMED: "CONFIRMED",
    pj.PJSIP_INV_STATE_DISCONNECTED: "DISCONNECTED",
}
DTMF_METHODS: Final = {
    pj.PJSUA_DTMF_METHOD_RFC2833: "rfc4733",
    pj.PJSUA_DTMF_METHOD_SIP_INFO: "info",
}


class CommandError(Exception):
    """A command that cannot be done: answered with an ``error`` line, the phone goes on."""


def pcm16_from_wav(path: Path) -> bytes:
    """A WAV file's PCM16 mono audio at 16 kHz (other rates linearly interpolated)."""
    try:
        with wave.open(str(path), "rb") as source:
            channels, width, rate = (
                source.getnchannels(),
                source.getsampwidth(),
                source.getframerate(),
            )
            data = source.readframes(source.getnframes())
    except (OSError, EOFError, wave.Error) as error:
        raise CommandError(f"cannot read {path}: {error}") from error
    if width != 2 or channels != 1:
        raise CommandError(f"{path}: {8 * width}-bit, {channels} channels; PCM16 mono is played")
    samples = np.frombuffer(data, dtype="<i2")
    if rate == RATE or samples.size == 0:
        return samples.tobytes()
    count = max(1, round(samples.size * RATE / rate))
    positions = np.arange(count, dtype=np.float64) * (rate / RATE)
    resampled = np.interp(positions, np.arange(samples.size, dtype=np.float64), samples)
    out: bytes = np.clip(np.rint(resampled), -32768, 32767).astype("<i2").tobytes()
    return out


@dataclass
class _Play:
    number: int
    data: bytes
    offset: int = 0


@dataclass
class _Listen:
    """What the call heard so far, for the ``sound``/``quiet`` events."""

    heard_ms: int = 0
    sounding: bool = False
    quiet_ms: int = QUIET_MS


class CallPort(pj.AudioMediaPort):  # type: ignore[misc]  # pjsua2 is untyped
    """One call's audio: plays what is queued to it, writes what it hears to a file.

    Both callbacks run on PJSIP's media clock thread; ``lock`` guards what they share
    with the main thread. Events they cause wait in ``phone.later`` for the main thread.
    """

    def __init__(self, phone: Phone, n: int, heard: Path) -> None:
        super().__init__()
        self.phone = phone
        self.n = n
        self.lock = threading.Lock()
        self.sink: IO[bytes] | None = heard.open("ab", buffering=0)
        self.plays: deque[_Play] = deque()
        self.listen = _Listen()
        self.slot = -1
        self.closed = False

    def queue(self, play: _Play) -> None:
        with self.lock:
            self.plays.append(play)

    def clear(self) -> list[int]:
        with self.lock:
            dropped = [play.number for play in self.plays]
            self.plays.clear()
        return dropped

    def close(self) -> None:
        """The call is over: the port hears and plays nothing more, and stays (``kept``)."""
        with self.lock:
            self.closed = True
            self.plays.clear()
            if self.sink is not None:
                self.sink.close()
                self.sink = None

    def onFrameRequested(self, frame: Any) -> None:
        try:
            finished: list[int] = []
            out = bytearray()
            with self.lock:
                while not self.closed and len(out) < FRAME_BYTES and self.plays:
                    play = self.plays[0]
                    take = play.data[play.offset : play.offset + FRAME_BYTES - len(out)]
                    out += take
                    play.offset += len(take)
                    if play.offset >= len(play.data):
                        finished.append(play.number)
                        self.plays.popleft()
            out += SILENT_FRAME[: FRAME_BYTES - len(out)]
            frame.type = pj.PJMEDIA_FRAME_TYPE_AUDIO
            frame.buf = pj.ByteVector(bytes(out))
            frame.size = FRAME_BYTES
            for number in finished:
                self.phone.emit(event="played", n=self.n, play=number)
        except Exception:  # noqa: BLE001 - an exception must not cross into PJSIP's C++
            self.phone.fault("onFrameRequested")

    def onFrameReceived(self, frame: Any) -> None:
        try:
            data = (
                bytes(frame.buf)
                if frame.type == pj.PJMEDIA_FRAME_TYPE_AUDIO and frame.size > 0
                else SILENT_FRAME  # no audio this tick: keep the file a timeline
            )
            with self.lock:
                if self.closed:
                    return
                if self.sink is not None:
                    self.sink.write(data)
                event = self._listen(data)
            if event is not None:
                self.phone.emit(**event)
        except Exception:  # noqa: BLE001 - an exception must not cross into PJSIP's C++
            self.phone.fault("onFrameReceived")

    def _listen(self, data: bytes) -> dict[str, Any] | None:
        samples = np.frombuffer(data[: len(data) - len(data) % 2], dtype="<i2")
        rms = float(np.sqrt(np.mean(samples.astype(np.float64) ** 2))) if samples.size else 0.0
        listen = self.listen
        at_ms = listen.heard_ms
        listen.heard_ms += samples.size * 1000 // RATE
        if rms >= SOUND_RMS:
            was_quiet = listen.quiet_ms >= QUIET_MS
            listen.quiet_ms = 0
            if not listen.sounding and was_quiet:
                listen.sounding = True
                return {"event": "sound", "n": self.n, "at_ms": at_ms}
            return None
        listen.quiet_ms += samples.size * 1000 // RATE
        if listen.sounding and listen.quiet_ms >= QUIET_MS:
            listen.sounding = False
            # Where the quiet began, not where it was long enough to count.
            return {"event": "quiet", "n": self.n, "at_ms": listen.heard_ms - listen.quiet_ms}
        return None


class PhoneCall(pj.Call):  # type: ignore[misc]  # pjsua2 is untyped
    """A call, in or out; ``n`` is its number in the protocol."""

    def __init__(self, phone: Phone, account: PhoneAccount, call_id: int | None = None) -> None:
        if call_id is None:
            super().__init__(account)
        else:
            super().__init__(account, call_id)
        self.phone = phone
        self.account = account
        self.n = phone.number(self)
        self.port: CallPort | None = None
        self.media: Any = None
        self.ended = False

    def onCallState(self, prm: Any) -> None:
        try:
            info = self.getInfo()
            state = STATES.get(info.state, str(info.state))
            self.phone.emit(
                event="state",
                n=self.n,
                state=state,
                code=int(info.lastStatusCode),
                reason=info.lastReason,
            )
            if info.state == pj.PJSIP_INV_STATE_DISCONNECTED:
                self.ended = True
                self.phone.retire(self)
        except Exception:  # noqa: BLE001 - an exception must not cross into PJSIP's C++
            self.phone.fault("onCallState")

    def onCallMediaState(self, prm: Any) -> None:
        try:
            info = self.getInfo()
            for media in info.media:
                if media.type != pj.PJMEDIA_TYPE_AUDIO:
                    continue
                if media.status != pj.PJSUA_CALL_MEDIA_ACTIVE:
                    self.phone.emit(event="media", n=self.n, status=_media_status(media.status))
                    continue
                self._connect(self.getAudioMedia(media.index))
                stream = self.getStreamInfo(media.index)
                self.phone.emit(
                    event="media",
                    n=self.n,
                    status="ACTIVE",
                    codec=stream.codecName,
                    rate=int(stream.codecClockRate),
                    srtp=bool(int(stream.proto) & pj.PJMEDIA_TP_PROFILE_SRTP),
                )
        except Exception:  # noqa: BLE001 - an exception must not cross into PJSIP's C++
            self.phone.fault("onCallMediaState")

    def audio_port(self) -> CallPort:
        """The call's port, made at its first use (a play may be queued before media)."""
        if self.port is None:
            port = CallPort(self.phone, self.n, self.phone.workdir / f"heard-{self.n}.raw")
            fmt = pj.MediaFormatAudio()
            fmt.type = pj.PJMEDIA_TYPE_AUDIO
            fmt.clockRate = RATE
            fmt.channelCount = 1
            fmt.bitsPerSample = 16
            fmt.frameTimeUsec = FRAME_MS * 1000
            port.createPort(f"call{self.n}", fmt)
            self.port = port
        return self.port

    def _connect(self, media: Any) -> None:
        port = self.audio_port()
        slot = media.getPortId()
        if slot == port.slot:
            return  # a re-INVITE that kept the stream: already connected
        self.media = media
        port.slot = slot
        media.startTransmit(port)
        port.startTransmit(media)

    def onDtmfDigit(self, prm: Any) -> None:
        try:
            self.phone.emit(
                event="dtmf",
                n=self.n,
                digit=prm.digit,
                method=DTMF_METHODS.get(prm.method, str(prm.method)),
            )
        except Exception:  # noqa: BLE001 - an exception must not cross into PJSIP's C++
            self.phone.fault("onDtmfDigit")

    def onCallTransferRequest(self, prm: Any) -> None:
        try:
            event: dict[str, Any] = {"event": "transfer", "n": self.n, "target": prm.dstUri}
            prm.statusCode = self.phone.refer_code
            if self.phone.refer_code // 100 == 2:
                # Ours, not a default Call PJSIP would make: the new call gets a number
                # and events like any other.
                child = PhoneCall(self.phone, self.account)
                prm.newCall = child
                event["new_n"] = child.n
            event["code"] = self.phone.refer_code
            self.phone.emit(**event)
        except Exception:  # noqa: BLE001 - an exception must not cross into PJSIP's C++
            self.phone.fault("onCallTransferRequest")

    def onCallTransferStatus(self, prm: Any) -> None:
        try:
            self.phone.emit(
                event="transfer_status",
                n=self.n,
                code=int(prm.statusCode),
                reason=prm.reason,
                final=bool(prm.finalNotify),
            )
        except Exception:  # noqa: BLE001 - an exception must not cross into PJSIP's C++
            self.phone.fault("onCallTransferStatus")


def _media_status(status: int) -> str:
    names = {
        pj.PJSUA_CALL_MEDIA_NONE: "NONE",
        pj.PJSUA_CALL_MEDIA_ACTIVE: "ACTIVE",
        pj.PJSUA_CALL_MEDIA_LOCAL_HOLD: "LOCAL_HOLD",
        pj.PJSUA_CALL_MEDIA_REMOTE_HOLD: "REMOTE_HOLD",
        pj.PJSUA_CALL_MEDIA_ERROR: "ERROR",
    }
    return names.get(status, str(status))


class PhoneAccount(pj.Account):  # type: ignore[misc]  # pjsua2 is untyped
    """A local identity (no registration); every one takes incoming calls."""

    def __init__(self, phone: Phone) -> None:
        super().__init__()
        self.phone = phone

    def onIncomingCall(self, prm: Any) -> None:
        try:
            call = PhoneCall(self.phone, self, prm.callId)
            info = call.getInfo()
            message = str(prm.rdata.wholeMsg)
            request_uri, to = _request_line_and_to(message)
            self.phone.emit(
                event="incoming",
                n=call.n,
                uri=request_uri,
                # The To header as sent (the call's local URI is the account's).
                **{"from": info.remoteUri, "to": to or info.localUri},
                message=message,
            )
            self.phone.answer(call, 180)
            if self.phone.auto_answer:
                self.phone.answer_at(call, time.monotonic() + self.phone.ring_ms / 1000)
        except Exception:  # noqa: BLE001 - an exception must not cross into PJSIP's C++
            self.phone.fault("onIncomingCall")


def _request_line_and_to(message: str) -> tuple[str, str]:
    """A request's URI and its To header's value (the compact ``t:`` too)."""
    head = message.replace("\r\n", "\n").split("\n\n", 1)[0].split("\n")
    parts = head[0].split(" ") if head else []
    uri = parts[1] if len(parts) > 1 else ""
    for line in head[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() in {"to", "t"}:
            return uri, value.strip()
    return uri, ""


class LogToStderr(pj.LogWriter):  # type: ignore[misc]  # pjsua2 is untyped
    def write(self, entry: Any) -> None:
        with contextlib.suppress(Exception):
            sys.stderr.write(entry.msg if entry.msg.endswith("\n") else entry.msg + "\n")
            sys.stderr.flush()


@dataclass
class Phone:
    """The endpoint, its accounts and calls, and the command loop."""

    workdir: Path
    out: IO[bytes]
    codecs: list[str]
    auto_answer: bool = False
    ring_ms: int = 200
    refer_code: int = 202
    log_level: int = 1
    #: SIP over TLS beside UDP (its certificate and key, PEM files, to take calls on it),
    #: and whether calls' audio is SRTP: "off", "optional" or "mandatory".
    tls: bool = False
    tls_cert: str = ""
    tls_key: str = ""
    srtp: str = "off"
    tls_port: int = 0
    commands: queue.SimpleQueue[dict[str, Any] | None] = field(default_factory=queue.SimpleQueue)
    #: Events from the media thread, written by the main thread.
    later: queue.SimpleQueue[dict[str, Any]] = field(default_factory=queue.SimpleQueue)
    calls: dict[int, PhoneCall] = field(default_factory=dict)
    accounts: dict[tuple[str, str, str], PhoneAccount] = field(default_factory=dict)
    #: Calls whose DISCONNECTED callback is running or ran: dropped by the main loop.
    retired: list[PhoneCall] = field(default_factory=list)
    answers: list[tuple[float, PhoneCall]] = field(default_factory=list)
    #: Numbers of the calls that ended (and were dropped).
    ended: set[int] = field(default_factory=set)
    #: Ended calls' ports, closed and out of the bridge's connections (``_drop_retired``).
    kept: list[CallPort] = field(default_factory=list)
    plays: int = 0
    next_n: int = 1
    ep: Any = None
    logger: Any = None
    #: The thread that made the library: the only one that calls it or writes stdout.
    main_thread: int = field(default_factory=threading.get_ident)

    # -- output ---------------------------------------------------------------

    def emit(self, **event: Any) -> None:
        """Write ``event``; from any other thread (RFC 4733 digits are reported on the
        media thread), queue it for the main thread, stdout's one writer."""
        if threading.get_ident() != self.main_thread:
            self.later.put(event)
            return
        self.out.write(json.dumps(event).encode() + b"\n")
        self.out.flush()

    def fault(self, where: str) -> None:
        """An exception in a callback: on stderr, and an event a test can see."""
        text = traceback.format_exc()
        sys.stderr.write(f"sipphone: exception in {where}:\n{text}")
        sys.stderr.flush()
        self.later.put({"event": "fault", "where": where, "message": text.strip()[-500:]})

    # -- bookkeeping ------------------------------------------------------------

    def number(self, call: PhoneCall) -> int:
        n = self.next_n
        self.next_n += 1
        self.calls[n] = call
        return n

    def retire(self, call: PhoneCall) -> None:
        self.retired.append(call)

    def _drop_retired(self) -> None:
        while self.retired:
            call = self.retired.pop()
            self.calls.pop(call.n, None)
            self.ended.add(call.n)
            self.answers = [(at, c) for at, c in self.answers if c is not call]
            if call.port is not None:
                call.port.close()
                if call.media is not None:
                    with contextlib.suppress(Exception):  # PJSIP's Error: already gone
                        call.media.stopTransmit(call.port)
                    with contextlib.suppress(Exception):
                        call.port.stopTransmit(call.media)
                # Never deleted while the library runs: PJSIP 2.15.1's bridge reads a
                # removed port at its next tick, and pjsua2 frees it at once (the server's
                # ``pjsip.Ports``, decision 83). Handed to its C++ side at the end.
                self.kept.append(call.port)
            call.port = None
            call.media = None

    # -- start and stop ---------------------------------------------------------------

    def start(self) -> int:
        ep = self.ep = pj.Endpoint()
        ep.libCreate()
        config = pj.EpConfig()
        config.uaConfig.threadCnt = 0
        config.uaConfig.mainThreadOnly = False
        config.uaConfig.userAgent = "switchboard-test-phone"
        self.logger = LogToStderr()
        config.logConfig.writer = self.logger
        config.logConfig.level = self.log_level
        config.logConfig.consoleLevel = self.log_level
        config.medConfig.clockRate = RATE
        config.medConfig.sndClockRate = RATE
        # Silence is sent as audio: the far end's recorder and endpointing see a timeline.
        config.medConfig.noVad = True
        ep.libInit(config)
        transport = pj.TransportConfig()
        transport.port = 0
        transport.boundAddress = "127.0.0.1"
        transport.publicAddress = "127.0.0.1"
        transport_id = ep.transportCreate(pj.PJSIP_TRANSPORT_UDP, transport)
        if self.tls:
            secure = pj.TransportConfig()
            secure.port = 0
            secure.boundAddress = "127.0.0.1"
            secure.publicAddress = "127.0.0.1"
            secure.tlsConfig.certFile = self.tls_cert
            secure.tlsConfig.privKeyFile = self.tls_key
            secure.tlsConfig.method = pj.PJSIP_TLSV1_2_METHOD
            tls_id = ep.transportCreate(pj.PJSIP_TRANSPORT_TLS, secure)
            self.tls_port = int(str(ep.transportGetInfo(tls_id).localName).rsplit(":", 1)[1])
        ep.libStart()
        ep.audDevManager().setNullDev()
        self._set_codecs()
        self.account("phone", None, default=True)
        local = ep.transportGetInfo(transport_id).localName
        return int(str(local).rsplit(":", 1)[1])

    def _set_codecs(self) -> None:
        known = {codec.codecId for codec in self.ep.codecEnum2()}
        missing = [name for name in self.codecs if name not in known]
        if missing:
            raise CommandError(f"unknown codecs {missing}; PJSIP has {sorted(known)}")
        for codec_id in known:
            self.ep.codecSetPriority(codec_id, 0)
        for rank, name in enumerate(self.codecs):
            self.ep.codecSetPriority(name, 255 - rank)

    def account(
        self, user: str, auth: dict[str, Any] | None, default: bool = False
    ) -> PhoneAccount:
        auth_user = str(auth["user"]) if auth else ""
        password = str(auth["password"]) if auth else ""
        key = (user, auth_user, password)
        found = self.accounts.get(key)
        if found is not None:
            return found
        config = pj.AccountConfig()
        config.idUri = f"sip:{user}@127.0.0.1"
        if auth:
            config.sipConfig.authCreds.append(
                pj.AuthCredInfo("digest", "*", auth_user, 0, password)
            )
        config.mediaConfig.transportConfig.boundAddress = "127.0.0.1"
        config.mediaConfig.transportConfig.port = 0  # any free port; never a fixed one
        config.mediaConfig.srtpUse = SRTP_USE[self.srtp]
        # SDES keys only over TLS, as a careful phone does.
        config.mediaConfig.srtpSecureSignaling = 1
        account = PhoneAccount(self)
        account.create(config, default)
        self.accounts[key] = account
        return account

    def run(self) -> None:
        reader = threading.Thread(target=self._read_stdin, name="sipphone-stdin", daemon=True)
        reader.start()
        while True:
            self.ep.libHandleEvents(10)
            self._drop_retired()
            self._flush_later()
            self._answer_due()
            while True:
                try:
                    command = self.commands.get_nowait()
                except queue.Empty:
                    break
                if command is None or command.get("cmd") == "quit":
                    self.stop(command)
                    return
                self._dispatch(command)

    def _read_stdin(self) -> None:
        for line in sys.stdin.buffer:
            if not line.strip():
                continue
            try:
                command = json.loads(line)
            except ValueError as error:
                command = {"cmd": "_bad", "message": str(error)}
            if not isinstance(command, dict):
                command = {"cmd": "_bad", "message": "a command is a JSON object"}
            self.commands.put(command)
        self.commands.put(None)

    def _flush_later(self) -> None:
        while True:
            try:
                event = self.later.get_nowait()
            except queue.Empty:
                return
            self.emit(**event)

    def stop(self, command: dict[str, Any] | None) -> None:
        self._end_all()
        deadline = time.monotonic() + QUIT_WAIT_S
        while self._calls_up() and time.monotonic() < deadline:
            self.ep.libHandleEvents(10)
            self._flush_later()
        pump_until = time.monotonic() + QUIT_PUMP_S
        while time.monotonic() < pump_until:
            self.ep.libHandleEvents(10)
        self._flush_later()
        if command is not None:
            self.emit(ok=command.get("id"))
        # Everything PJSIP calls back goes before the library: calls, ports, accounts.
        # (A Call deleted after libDestroy trips an assertion in its destructor, so no
        # reference may survive in a local variable or a cycle either.)
        self.retired.extend(self.calls.values())
        self._drop_retired()
        self.calls.clear()
        self.answers.clear()
        self._shut_accounts()
        for port in self.kept:
            port.__disown__()
        self.kept.clear()
        gc.collect()
        # Calls are over and their last messages out: nothing on the network to wait for.
        self.ep.libDestroy(pj.PJSUA_DESTROY_NO_NETWORK)
        self.ep = None

    def _end_all(self) -> None:
        for call in list(self.calls.values()):
            self._end(call, None)

    def _calls_up(self) -> bool:
        return any(not call.ended and call.getId() >= 0 for call in self.calls.values())

    def _shut_accounts(self) -> None:
        for account in self.accounts.values():
            with contextlib.suppress(pj.Error):
                account.shutdown()
        self.accounts.clear()

    # -- commands -------------------------------------------------------------------

    def _dispatch(self, command: dict[str, Any]) -> None:
        ident = command.get("id")
        if command.get("cmd") == "_bad":
            self.emit(error=ident, message=f"not a command: {command['message']}")
            return
        handler = getattr(self, f"do_{command.get('cmd')}", None)
        if handler is None:
            self.emit(error=ident, message=f"unknown command {command.get('cmd')!r}")
            return
        try:
            result = handler(command) or {}
        except CommandError as error:
            self.emit(error=ident, message=str(error))
        except pj.Error as error:
            self.emit(error=ident, message=f"pjsua2: {error.info()}")
        except (KeyError, TypeError, ValueError) as error:
            self.emit(error=ident, message=f"bad command: {error!r}")
        else:
            self.emit(ok=ident, **result)

    def _call(self, command: dict[str, Any]) -> PhoneCall:
        n = command.get("n")
        call = self.calls.get(n) if isinstance(n, int) else None
        if call is None or call.ended:
            raise CommandError(f"call {n} has ended" if n in self.ended else f"no call {n}")
        return call

    def do_call(self, command: dict[str, Any]) -> dict[str, Any]:
        account = self.account(command.get("from_user") or "phone", command.get("auth"))
        call = PhoneCall(self, account)
        param = pj.CallOpParam(True)
        for name, value in (command.get("headers") or {}).items():
            header = pj.SipHeader()
            header.hName = str(name)
            header.hValue = str(value)
            param.txOption.headers.append(header)
        try:
            call.makeCall(str(command["uri"]), param)
        except pj.Error:
            self.calls.pop(call.n, None)
            raise
        return {"n": call.n}

    def do_play(self, command: dict[str, Any]) -> dict[str, Any]:
        call = self._call(command)
        data = pcm16_from_wav(Path(command["wav"]))
        self.plays += 1
        call.audio_port().queue(_Play(self.plays, data))
        return {"play": self.plays, "ms": len(data) * 1000 // (2 * RATE)}

    def do_clear(self, command: dict[str, Any]) -> dict[str, Any]:
        call = self._call(command)
        dropped = call.port.clear() if call.port is not None else []
        for number in dropped:
            self.emit(event="played", n=call.n, play=number, cleared=True)
        return {"cleared": dropped}

    def do_dtmf(self, command: dict[str, Any]) -> None:
        call = self._call(command)
        digits = str(command["digits"])
        method = command.get("method", "rfc4733")
        if method == "rfc4733":
            call.dialDtmf(digits)
        elif method == "info":
            param = pj.CallSendDtmfParam()
            param.method = pj.PJSUA_DTMF_METHOD_SIP_INFO
            param.digits = digits
            param.duration = int(command.get("duration_ms", 160))
            call.sendDtmf(param)
        else:
            raise CommandError(f"dtmf method {method!r}: rfc4733 or info")

    def do_hangup(self, command: dict[str, Any]) -> dict[str, Any]:
        # The far end may hang up first: a race a test cannot avoid, so not an error.
        n = command.get("n")
        call = self.calls.get(n) if isinstance(n, int) else None
        if n in self.ended or (call is not None and call.ended):
            return {"ended": True}
        self._end(self._call(command), command.get("code"))
        return {"ended": False}

    def _end(self, call: PhoneCall, code: int | None) -> None:
        if call.ended or call.getId() < 0:
            return
        param = pj.CallOpParam(True)
        if code is not None:
            param.statusCode = int(code)
        with contextlib.suppress(pj.Error):  # ended meanwhile (its event is on the way)
            call.hangup(param)

    def do_answer(self, command: dict[str, Any]) -> None:
        call = self._call(command)
        self.answers = [(at, c) for at, c in self.answers if c is not call]
        self.answer(call, int(command.get("code", 200)))

    def do_transfer(self, command: dict[str, Any]) -> None:
        """Send a REFER naming ``target`` (the phone as a transferor)."""
        self._call(command).xfer(str(command["target"]), pj.CallOpParam(True))

    def do_quit(self, command: dict[str, Any]) -> None:  # handled by run()
        raise CommandError("quit is handled by the loop")

    def answer(self, call: PhoneCall, code: int) -> None:
        param = pj.CallOpParam(True)
        param.statusCode = code
        call.answer(param)

    def answer_at(self, call: PhoneCall, at: float) -> None:
        self.answers.append((at, call))

    def _answer_due(self) -> None:
        now = time.monotonic()
        due = [call for at, call in self.answers if at <= now]
        if not due:
            return
        self.answers = [(at, call) for at, call in self.answers if at > now]
        for call in due:
            if call.ended:
                continue
            try:
                self.answer(call, 200)
            except pj.Error as error:
                self.emit(event="fault", where="auto answer", message=error.info())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--codec", action="append", dest="codecs")
    parser.add_argument("--auto-answer", action="store_true")
    parser.add_argument("--ring-ms", type=int, default=200)
    parser.add_argument("--refer-code", type=int, default=202)
    parser.add_argument("--log-level", type=int, default=1)
    parser.add_argument("--tls", action="store_true")
    parser.add_argument("--tls-cert", default="")
    parser.add_argument("--tls-key", default="")
    parser.add_argument("--srtp", choices=sorted(SRTP_USE), default="off")
    args = parser.parse_args(argv)
    # The protocol gets its own descriptor; fd 1 (where PJSIP prints) becomes stderr's.
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    args.workdir.mkdir(parents=True, exist_ok=True)
    phone = Phone(
        workdir=args.workdir,
        out=out,
        codecs=list(args.codecs or DEFAULT_CODECS),
        auto_answer=args.auto_answer,
        ring_ms=args.ring_ms,
        refer_code=args.refer_code,
        log_level=args.log_level,
        tls=args.tls,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        srtp=args.srtp,
    )
    try:
        port = phone.start()
    except (pj.Error, CommandError) as error:
        message = error.info() if isinstance(error, pj.Error) else str(error)
        phone.emit(event="failed", message=message)
        return 1
    phone.emit(event="ready", port=port, tls_port=phone.tls_port)
    phone.run()
    out.flush()
    return 0


if __name__ == "__main__":
    code = main()
    sys.stderr.flush()
    # Straight out: the interpreter's teardown would otherwise collect SWIG objects
    # after the library is gone (and wait on the stdin reader).
    os._exit(code)
