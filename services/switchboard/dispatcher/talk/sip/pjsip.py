"""PJSIP's side of the engine: the SWIG directors through which PJSIP calls back (an
INVITE, a call's state and media, a key pressed, a transfer's outcome, each 20 ms of a
call's audio, a log line), how a frame's bytes are read out of PJSIP's vectors, how
an INVITE's headers are read, and our ports in PJSIP's conference bridge (``Ports``).

Everything here runs on a thread of PJSIP's (the engine's, or the media clock's for the
audio) and hands the engine what happened; ``engine.py`` says what the engine does with it.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, Final, Protocol

log = logging.getLogger("switchboard.dispatcher.talk.sip")

_USER: Final = re.compile(r"^(?:sips?|tel):([^@;>]+)", re.IGNORECASE)


class Host(Protocol):
    """The engine, as its callbacks reach it (``engine.Host``). A leg is the
    engine's record of one call, passed back as it was given."""

    @property
    def account(self) -> Any: ...

    def on_invite(self, call_id: int, source: str, message: str) -> None: ...

    def on_state(self, leg: Any) -> None: ...

    def on_media(self, leg: Any) -> None: ...

    def on_transferred(self, leg: Any, code: int) -> None: ...

    def on_key(self, leg: Any, digit: str) -> None: ...

    def on_audio(self, number: int, pcm: bytes) -> None: ...


class Frames(Protocol):
    """A call's answer audio, taken 20 ms at a time (``engine.Playout``)."""

    def take(self) -> bytes: ...


@functools.cache
def _pj_classes() -> tuple[type, type, type, type]:
    """PJSIP's directors, defined when the engine first starts (``pjsua2`` is imported
    only by a process that serves SIP). No exception may leave one: it would cross into
    PJSIP's C (SWIG throws it on as a C++ exception through C frames, which crashes the
    process), so each logs it instead (``_guarded``)."""
    import pjsua2 as pj

    class Account(pj.Account):  # type: ignore[misc]
        def __init__(self, engine: Host) -> None:
            super().__init__()
            self.engine = engine

        def onIncomingCall(self, prm: Any) -> None:
            with _guarded("an INVITE"):
                message = str(prm.rdata.wholeMsg)
                self.engine.on_invite(int(prm.callId), str(prm.rdata.srcAddress), message)

    class Call(pj.Call):  # type: ignore[misc]
        def __init__(self, engine: Host, call_id: int, account: Any = None) -> None:
            # An incoming call's id, on the engine's account; a call to place: no id yet,
            # on its trunk's account.
            super().__init__(account if account is not None else engine.account, call_id)
            self.engine = engine
            self.leg: Any = None

        def onCallState(self, prm: Any) -> None:
            with _guarded("a call's state"):
                if self.leg is not None:
                    self.engine.on_state(self.leg)

        def onCallMediaState(self, prm: Any) -> None:
            with _guarded("a call's media"):
                if self.leg is not None:
                    self.engine.on_media(self.leg)

        def onCallTransferStatus(self, prm: Any) -> None:
            with _guarded("a call's transfer"):
                if self.leg is not None and prm.finalNotify:
                    self.engine.on_transferred(self.leg, int(prm.statusCode))

        def onDtmfDigit(self, prm: Any) -> None:
            with _guarded("a key pressed"):
                if self.leg is not None:
                    digit = str(prm.digit)
                    self.engine.on_key(self.leg, digit)

    read = _vector_reader()

    class Port(pj.AudioMediaPort):  # type: ignore[misc]
        # Both run on PJSIP's media clock thread, every 20 ms. A port serves call after
        # call (``Ports``): its number and playout are the call's of the moment.
        def __init__(self, engine: Host, number: int, playout: Frames) -> None:
            super().__init__()
            self.engine = engine
            self.number = number
            self.playout = playout

        def onFrameReceived(self, frame: Any) -> None:
            with _guarded("a call's audio in"):
                number = self.number  # 0: resting between calls (``Ports``)
                if number and frame.type == pj.PJMEDIA_FRAME_TYPE_AUDIO and frame.size > 0:
                    pcm = read(frame.buf)
                    self.engine.on_audio(number, pcm)

        def onFrameRequested(self, frame: Any) -> None:
            with _guarded("a call's audio out"):
                data = self.playout.take()
                frame.type = pj.PJMEDIA_FRAME_TYPE_AUDIO
                frame.buf = pj.ByteVector(data)
                frame.size = len(data)

    class LogWriter(pj.LogWriter):  # type: ignore[misc]
        def write(self, entry: Any) -> None:
            # PJSIP's own lines (level 1: errors) into ours, never to the console.
            with _guarded("a PJSIP log line"):
                level = logging.WARNING if int(entry.level) <= 1 else logging.INFO
                log.log(level, "pjsip: %s", str(entry.msg).strip()[:500])

    return Account, Call, Port, LogWriter


def _vector_reader() -> Callable[[Any], bytes]:
    """How a frame's bytes are read out of PJSIP's ``ByteVector``.

    SWIG's own way (``bytes(vector)``) walks the vector an element at a time through its
    iterator: 170 µs for a 20 ms frame at 8 kHz, 8.5 ms of CPU a second per call, most of
    what a call cost beyond a gRPC Talk session (BENCHMARKS.md, "Phone calls (SIP)").
    Read whole instead: a ``std::vector``'s first word is its data pointer (libstdc++,
    which the manylinux wheel is built with), so ``string_at`` copies it in about a
    microsecond. Checked once against SWIG's way; if the layout ever differs, SWIG's way
    is used."""
    import ctypes

    import pjsua2 as pj

    def whole(vector: Any) -> bytes:
        size = int(vector.size())
        if not size:
            return b""
        start = ctypes.c_void_p.from_address(int(vector.this)).value
        return ctypes.string_at(start, size) if start else bytes(vector)

    probe = bytes(range(256)) * 2
    try:
        same = whole(pj.ByteVector(probe)) == probe and whole(pj.ByteVector()) == b""
    except Exception:  # noqa: BLE001 - anything odd: SWIG's way
        same = False
    if not same:
        log.warning("reading PJSIP's audio the slow way: its vector layout is not the one known")
    return whole if same else bytes


@contextlib.contextmanager
def _guarded(what: str) -> Iterator[None]:
    try:
        yield
    except Exception:
        log.exception("handling %s from PJSIP failed", what)


#: The longest answer audio one call may hold queued (s): beyond it, pushes are refused.
MAX_QUEUED_S: Final = 60.0
#: How long a call's port rests before another call takes it (``Ports``): the bridge
#: undoes a port's connections at its next 20 ms tick, so a port taken sooner could hand
#: the new call a frame of the old one's.
PORT_REST_S: Final = 0.2


class Playout:
    """A call's answer audio waiting for PJSIP's clock: pushed by the loop, taken 20 ms at
    a time by the media thread."""

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self.frame_bytes = rate // 50 * 2
        self._lock = threading.Lock()
        self._data = bytearray()
        self._limit = int(MAX_QUEUED_S * rate) * 2

    def push(self, pcm: bytes) -> bool:
        with self._lock:
            if len(self._data) + len(pcm) > self._limit:
                return False
            self._data += pcm
            return True

    def clear(self) -> None:
        """Drop what is queued (barge-in)."""
        with self._lock:
            self._data.clear()

    @property
    def queued_bytes(self) -> int:
        with self._lock:
            return len(self._data)

    def take(self) -> bytes:
        n = self.frame_bytes
        with self._lock:
            chunk = bytes(self._data[:n])
            del self._data[:n]
        return chunk if len(chunk) == n else chunk + bytes(n - len(chunk))


class Ports:
    """Our ports in PJSIP's conference bridge, kept and lent to call after call.

    Since PJSIP 2.15.1 the bridge removes a port at its next clock tick, on the media
    thread, and reads the port then; pjsua2's ``AudioMediaPort`` frees itself at once
    (upstream pjproject 4200, after 2.15.1). A port deleted with its call was read after
    its memory was freed and reused: a segfault, rarely (one run of the whole suite in
    CI; with glibc's ``MALLOC_PERTURB_``, most runs of a few thousand ports made and
    deleted). So no port is deleted while the library runs: a call's port goes back here
    with its connections undone, rests (``PORT_REST_S``), and serves the next call at
    its rate. At the end they are left to the process, never deleted (``abandon``)."""

    def __init__(self, host: Host) -> None:
        self._host = host
        self._resting: dict[int, collections.deque[tuple[float, Any]]] = {}
        self._made = 0

    def lend(self, number: int, rate: int, playout: Frames) -> Any:
        import pjsua2 as pj

        resting = self._resting.setdefault(rate, collections.deque())
        if resting and time.monotonic() - resting[0][0] >= PORT_REST_S:
            port = resting.popleft()[1]
            port.playout = playout
            port.number = number
            return port
        port = new_port(self._host, number, playout)
        fmt = pj.MediaFormatAudio()
        fmt.type = pj.PJMEDIA_TYPE_AUDIO
        fmt.clockRate = rate
        fmt.channelCount = 1
        fmt.bitsPerSample = 16
        fmt.frameTimeUsec = 20_000
        self._made += 1
        port.createPort(f"port-{self._made}", fmt)
        return port

    def give_back(self, port: Any, rate: int, silence: Frames) -> None:
        """``port``, its connections undone (by the bridge's next tick); ``silence``
        answers the bridge until then."""
        port.number = 0  # what the bridge still hands it goes nowhere
        port.playout = silence
        self._resting.setdefault(rate, collections.deque()).append((time.monotonic(), port))

    def abandon(self) -> None:
        """Before the library ends: the ports are never deleted (see the class), so each is
        handed to its C++ side, which nothing deletes (a few kilobytes a port, once)."""
        for resting in self._resting.values():
            for _, port in resting:
                port.__disown__()
        self._resting.clear()

    @property
    def made(self) -> int:
        return self._made


def new_account(engine: Host) -> Any:
    return _pj_classes()[0](engine)


def new_call(engine: Host, call_id: int, account: Any = None) -> Any:
    return _pj_classes()[1](engine, call_id, account)


def new_port(engine: Host, number: int, playout: Frames) -> Any:
    return _pj_classes()[2](engine, number, playout)


def new_log_writer() -> Any:
    return _pj_classes()[3]()


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def header_of(lines: list[str], name: str) -> str:
    """A header's value among a request's header ``lines`` ("" if absent)."""
    for line in lines:
        key, sep, value = line.partition(":")
        if sep and key.strip().lower() == name:
            return value.strip()
    return ""


def uri_of(header: str) -> str:
    """The URI in a From or To value (``"Ann" <sip:+1555@host>;tag=x``)."""
    if "<" in header and ">" in header:
        return header[header.index("<") + 1 : header.index(">")]
    return header.split(";", 1)[0].strip()


def user_of(uri: str) -> str:
    matched = _USER.match(uri.strip())
    return matched.group(1)[:64] if matched else ""


def display_of(header: str) -> str:
    if "<" not in header:
        return ""
    return header[: header.index("<")].strip().strip('"')[:64]
