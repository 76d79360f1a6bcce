"""A real SIP phone for tests: PJSIP (pjsua2) in a subprocess, driven from asyncio.

PJSIP allows one ``Endpoint`` per process and the server under test has its own, so
the phone runs ``tests/kits/sipphone_proc.py`` (its module doc has the protocol) and
this driver speaks for it::

    async with SipPhone.start(tmp_path, auto_answer=True) as phone:
        n = await phone.call("sip:+15550100@127.0.0.1:5080", from_user="+15557654321")
        await phone.wait_state(n, "CONFIRMED", timeout=20)
        await phone.play(n, speech_wav("hello", tmp_path / "hello.wav"))
        await phone.wait_played(n, timeout=20)
        await phone.wait_event(lambda e: e["event"] == "quiet" and e["n"] == n, timeout=20)
        assert energy(phone.heard(n)) > 100

Events (``phone.events``, every one so far, in order), each a dict with ``event``:

- ``ready``: ``port``, ``tls_port`` (0 without TLS);
- ``incoming``: ``n``, ``uri`` (the Request-URI), ``from``, ``to``, ``message`` (the
  whole INVITE);
- ``state``: ``n``, ``state`` (PJSIP's names, DISCONNECTED spelt out), ``code``, ``reason``;
- ``media``: ``n``, ``status``, and when ACTIVE ``codec``, ``rate`` and ``srtp``;
- ``dtmf``: ``n``, ``digit``, ``method`` (``rfc4733`` or ``info``);
- ``transfer``: ``n``, ``target`` (the REFER's Refer-To), ``code`` (the phone's answer),
  ``new_n`` (the call it made to the target);
- ``transfer_status``: the progress of a REFER the phone sent (``transfer``);
- ``played``: ``n``, ``play``, ``cleared`` when dropped before its end;
- ``sound`` and ``quiet``: ``n``, ``at_ms`` into what the call heard: sound starting
  after quiet, and where quiet began once half a second of it followed sound;
- ``fault``: an exception inside the phone (a test should see none).

What a call hears is in ``heard(n)``: PCM16 mono at 16 kHz, one frame per 20 ms of the
phone's clock (silence where nothing arrived), from when its media started.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, TypeVar

import numpy as np

from tests.conftest import CALL_DEADLINE_S
from tests.infra.processlogs import keep

PROC: Final = Path(__file__).with_name("sipphone_proc.py")
#: What the phone hears: PCM16 mono at this rate.
RATE: Final = 16_000
#: How long ``quit`` gets before the phone is killed.
QUIT_TIMEOUT_S: Final = 5.0
#: The end of the phone's log shown in a failed wait.
LOG_TAIL_BYTES: Final = 2048
#: eSpeak NG's voice and pace for speech (what tests/fakes/audio_server.py speaks).
ESPEAK_VOICE: Final = "en-us+m3"
ESPEAK_WPM: Final = 140
#: A line from the phone can hold a whole INVITE.
_LINE_LIMIT: Final = 1 << 20

Event = dict[str, Any]
_T = TypeVar("_T")


class PhoneError(RuntimeError):
    """The phone refused a command, or is gone."""


class CallEnded(PhoneError):
    """The call being waited on was DISCONNECTED first."""

    def __init__(self, message: str, event: Event) -> None:
        super().__init__(message)
        self.event = event


@dataclass
class SipPhone:
    """One phone (see the module). Build it with ``SipPhone.start``."""

    workdir: Path
    process: asyncio.subprocess.Process
    log: Path
    port: int = 0
    tls_port: int = 0
    events: list[Event] = field(default_factory=list)
    _pending: dict[int, asyncio.Future[Event]] = field(default_factory=dict)
    _changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    _plays: dict[int, int] = field(default_factory=dict)
    _serial: int = 0
    _reader: asyncio.Task[None] | None = None
    _gone: str = ""

    @classmethod
    @asynccontextmanager
    async def start(
        cls,
        workdir: Path,
        codecs: list[str] | None = None,
        auto_answer: bool = False,
        ring_ms: int = 200,
        refer_code: int = 202,
        log_level: int = 1,
        tls: tuple[Path, Path] | None = None,
        srtp: str = "off",
    ) -> AsyncIterator[SipPhone]:
        """Start a phone with its files in a new folder under ``workdir``; it quits (or
        is killed) when the block ends. ``codecs`` (PJSIP's ids, ``"PCMU/8000/1"``) are
        offered in that order and no other is; ``auto_answer`` answers incoming calls
        after ``ring_ms`` of ringing; ``refer_code`` is the answer to a REFER (202
        accepts and calls the target). ``tls`` (a certificate and its key) adds SIP over TLS,
        on ``tls_port``; ``srtp`` is ``off``, ``optional`` or ``mandatory``."""
        folder = Path(tempfile.mkdtemp(prefix="sipphone-", dir=workdir))
        log = folder / "phone.log"
        arguments = [str(PROC), "--workdir", str(folder), "--ring-ms", str(ring_ms)]
        arguments += ["--refer-code", str(refer_code), "--log-level", str(log_level)]
        for codec in codecs or []:
            arguments += ["--codec", codec]
        if auto_answer:
            arguments.append("--auto-answer")
        if tls is not None:
            arguments += ["--tls", "--tls-cert", str(tls[0]), "--tls-key", str(tls[1])]
        arguments += ["--srtp", srtp]
        with log.open("wb") as log_file:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                *arguments,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=log_file,
                limit=_LINE_LIMIT,
            )
        keep(log, "sipphone")
        phone = cls(workdir=folder, process=process, log=log)
        phone._reader = asyncio.create_task(phone._read(), name="sipphone-reader")
        try:
            await phone._started()
            yield phone
        except BaseException:
            await phone._close()
            raise
        # A phone that crashed on its way out hid a lifetime bug: that fails the test too.
        returncode = await phone._close()
        if returncode != 0:
            raise PhoneError(f"the phone exited with {returncode} at the end{phone._tail()}")

    async def _started(self) -> None:
        ready = await self.wait_event(lambda e: e["event"] in {"ready", "failed"})
        if ready["event"] == "failed":
            raise PhoneError(f"the phone did not start: {ready['message']}{self._tail()}")
        self.port = int(ready["port"])
        self.tls_port = int(ready.get("tls_port", 0))

    # -- commands ------------------------------------------------------------------

    async def call(
        self,
        uri: str,
        from_user: str | None = None,
        headers: dict[str, str] | None = None,
        auth: tuple[str, str] | None = None,
    ) -> int:
        """Call ``uri`` as ``sip:<from_user>@127.0.0.1``; the call's number."""
        fields: dict[str, Any] = {"uri": uri}
        if from_user is not None:
            fields["from_user"] = from_user
        if headers:
            fields["headers"] = headers
        if auth is not None:
            fields["auth"] = {"user": auth[0], "password": auth[1]}
        answer = await self._command("call", **fields)
        return int(answer["n"])

    async def play(self, n: int, wav: Path) -> int:
        """Queue ``wav`` (PCM16 mono, any rate) after what call ``n`` is playing; the
        play's number (its ``played`` event names it)."""
        answer = await self._command("play", n=n, wav=str(wav))
        self._plays[n] = self._plays.get(n, 0) + 1
        return int(answer["play"])

    async def clear(self, n: int) -> list[int]:
        """Drop what call ``n`` has queued to play; the plays dropped."""
        answer = await self._command("clear", n=n)
        return [int(play) for play in answer["cleared"]]

    async def dtmf(self, n: int, digits: str, method: str = "rfc4733") -> None:
        """Send ``digits`` in the media (``rfc4733``) or as SIP INFO (``info``)."""
        await self._command("dtmf", n=n, digits=digits, method=method)

    async def hangup(self, n: int, code: int | None = None) -> bool:
        """BYE, CANCEL or (an incoming call not answered) a rejection with ``code``;
        False when the call had already ended (the other side hung up first)."""
        fields: dict[str, Any] = {"n": n}
        if code is not None:
            fields["code"] = code
        answer = await self._command("hangup", **fields)
        return not answer["ended"]

    async def answer(self, n: int, code: int = 200) -> None:
        await self._command("answer", n=n, code=code)

    async def transfer(self, n: int, target: str) -> None:
        """Send a REFER naming ``target`` on call ``n``."""
        await self._command("transfer", n=n, target=target)

    # -- what happened ------------------------------------------------------------------

    def heard(self, n: int) -> bytes:
        """Everything call ``n`` heard so far: PCM16 mono at 16 kHz."""
        path = self.workdir / f"heard-{n}.raw"
        return path.read_bytes() if path.exists() else b""

    async def wait_event(
        self,
        match: Callable[[Event], bool],
        timeout: float = CALL_DEADLINE_S,  # noqa: ASYNC109
        since: int = 0,
    ) -> Event:
        """The first event (from index ``since`` of ``events``) that ``match``es, waiting
        for it up to ``timeout`` seconds (``TimeoutError`` with what was seen)."""
        return await self._wait(lambda: self._find(match, since), timeout, "an event")

    async def wait_state(
        self,
        n: int,
        state: str,
        timeout: float = CALL_DEADLINE_S,  # noqa: ASYNC109
    ) -> Event:
        """Call ``n``'s ``state`` event. Waiting for any other state, a DISCONNECTED
        first raises ``CallEnded`` (with its code) at once."""

        def reached() -> Event | None:
            for event in self.events:
                if event["event"] != "state" or event["n"] != n:
                    continue
                if event["state"] == state:
                    return event
                if event["state"] == "DISCONNECTED":
                    raise CallEnded(
                        f"call {n} ended ({event['code']} {event['reason']}) before {state}",
                        event,
                    )
            return None

        return await self._wait(reached, timeout, f"call {n} {state}")

    async def wait_played(self, n: int, timeout: float = CALL_DEADLINE_S) -> None:  # noqa: ASYNC109
        """Until everything queued to call ``n`` was played (or cleared)."""
        wanted = self._plays.get(n, 0)

        def done() -> bool | None:
            count = sum(1 for e in self.events if e["event"] == "played" and e["n"] == n)
            return True if count >= wanted else None

        await self._wait(done, timeout, f"call {n}'s {wanted} plays")

    # -- inside ----------------------------------------------------------------------

    def _find(self, match: Callable[[Event], bool], since: int) -> Event | None:
        for event in self.events[since:]:
            if match(event):
                return event
        return None

    async def _wait(
        self,
        check: Callable[[], _T | None],
        timeout: float,  # noqa: ASYNC109
        what: str,
    ) -> _T:
        async def until() -> _T:
            async with self._changed:
                while True:
                    found = check()
                    if found is not None:
                        return found
                    if self._gone:
                        raise PhoneError(f"waiting for {what}: {self._gone}{self._tail()}")
                    await self._changed.wait()

        try:
            return await asyncio.wait_for(until(), timeout)
        except TimeoutError:
            seen = json.dumps(self.events[-40:], default=str)[-4000:]
            raise TimeoutError(
                f"no {what} within {timeout} s; events: {seen}{self._tail()}"
            ) from None

    async def _command(self, cmd: str, **fields: Any) -> Event:
        if self._gone:
            raise PhoneError(f"{cmd}: {self._gone}{self._tail()}")
        self._serial += 1
        ident = self._serial
        done: asyncio.Future[Event] = asyncio.get_running_loop().create_future()
        self._pending[ident] = done
        stdin = self.process.stdin
        assert stdin is not None
        try:
            stdin.write(json.dumps({"id": ident, "cmd": cmd, **fields}).encode() + b"\n")
            await asyncio.wait_for(stdin.drain(), CALL_DEADLINE_S)
            answer = await asyncio.wait_for(done, CALL_DEADLINE_S)
        except (ConnectionError, TimeoutError) as error:
            raise PhoneError(f"{cmd}: no answer ({error!r}){self._tail()}") from error
        finally:
            self._pending.pop(ident, None)
        if "error" in answer:
            raise PhoneError(f"{cmd}: {answer['message']}")
        return answer

    async def _read(self) -> None:
        stdout = self.process.stdout
        assert stdout is not None
        try:
            while line := await stdout.readline():
                try:
                    message = json.loads(line)
                except ValueError:
                    message = {"event": "garbled", "line": line.decode(errors="replace")}
                reply = message.get("ok", message.get("error"))
                if "event" not in message and isinstance(reply, int):
                    future = self._pending.get(reply)
                    if future is not None and not future.done():
                        future.set_result(message)
                    continue
                async with self._changed:
                    self.events.append(message)
                    self._changed.notify_all()
        finally:
            # Its stdout closes as it exits.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.process.wait(), QUIT_TIMEOUT_S)
            self._gone = f"the phone exited ({self.process.returncode})"
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(PhoneError(self._gone + self._tail()))
            async with self._changed:
                self._changed.notify_all()

    def _tail(self) -> str:
        try:
            with self.log.open("rb") as log:
                log.seek(0, 2)
                log.seek(max(0, log.tell() - LOG_TAIL_BYTES))
                text = log.read().decode(errors="replace")
        except OSError:
            return ""
        return f"\n--- the phone's log (end) ---\n{text}" if text else ""

    async def _close(self) -> int:
        """Quit (or kill) the phone; its exit status (-9 when it had to be killed)."""
        process = self.process
        try:
            async with asyncio.timeout(QUIT_TIMEOUT_S):
                if process.returncode is None and not self._gone:
                    with contextlib.suppress(PhoneError):
                        await self._command("quit")
                if process.stdin is not None:
                    process.stdin.close()
                returncode = await process.wait()
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            returncode = await asyncio.wait_for(process.wait(), CALL_DEADLINE_S)
        if self._reader is not None:
            await asyncio.wait_for(self._reader, CALL_DEADLINE_S)
        return returncode


def energy(pcm: bytes) -> float:
    """RMS of PCM16 audio (0 for none)."""
    samples = np.frombuffer(pcm[: len(pcm) - len(pcm) % 2], dtype="<i2").astype(np.float64)
    return float(np.sqrt(np.mean(samples**2))) if samples.size else 0.0


def speech_wav(text: str, path: Path) -> Path:
    """``text`` spoken by eSpeak NG into the WAV ``path`` (PCM16 mono, 22,050 Hz)."""
    program = shutil.which("espeak-ng")
    if program is None:
        raise RuntimeError("espeak-ng is not installed; run scripts/install-deps.sh")
    # The text on stdin, not the command line: it may start with a dash. The leading
    # pause keeps the first word from being clipped (tests/infra/speech.py).
    subprocess.run(
        [program, "-v", ESPEAK_VOICE, "-s", str(ESPEAK_WPM), "-w", str(path), "--stdin"],
        input=f". . {text}".encode(),
        check=True,
        capture_output=True,
        timeout=CALL_DEADLINE_S,
    )
    return path
