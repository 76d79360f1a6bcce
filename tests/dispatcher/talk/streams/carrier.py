"""A faithful carrier for the media-stream tests: what Twilio (or Telnyx) does on a call.

It posts the voice webhook as the carrier does (a form, signed: Twilio's
``X-Twilio-Signature`` over the public URL and the sorted parameters, or Telnyx's ed25519
over ``timestamp|body``), reads the TwiML answer, opens the ``<Stream>``'s WebSocket
(Twilio signs the upgrade too; the public ``wss://`` URL is mapped to the server's local
address, as a proxy would carry it) and speaks the protocol: ``connected``, ``start``
with the ``<Parameter>``s, ``media`` every 20 ms in real time (speech queued by
``play``, silence otherwise, as a phone line sends), ``dtmf``, ``stop``. What the server
sends is kept: the answer's audio (decoded to PCM16 at 8 kHz), each ``clear``, each
``mark``, and how the socket closed.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import time
import urllib.parse
import uuid
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Final

import aiohttp
import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from switchboard.dispatcher.talk.streams import audio
from switchboard.dispatcher.talk.streams.signing import twilio_signature
from tests.conftest import CALL_DEADLINE_S

#: RMS of speech through G.711 is in the thousands; silence is near zero.
SPEECH_RMS: Final = 300.0
#: The answer is over once nothing loud came for this long.
QUIET_S: Final = 0.8
SILENCE: Final = b"\xff" * audio.FRAME_SAMPLES


def rms(pcm: bytes) -> float:
    samples = np.frombuffer(pcm[: len(pcm) - len(pcm) % 2], dtype="<i2").astype(np.float64)
    return float(np.sqrt(np.mean(samples**2))) if samples.size else 0.0


@dataclass
class Carrier:
    """Who signs: Twilio's auth token, or Telnyx's private key."""

    name: str
    public_url: str
    local_url: str
    twilio_token: str = ""
    telnyx_key: Ed25519PrivateKey | None = None

    def voice_url(self) -> str:
        return f"/telephony/{self.name}/voice"

    def headers_for(self, path: str, form: dict[str, str], body: bytes) -> dict[str, str]:
        if self.name == "twilio":
            signed = twilio_signature(self.twilio_token, self.public_url + path, form.items())
            return {"X-Twilio-Signature": signed}
        assert self.telnyx_key is not None
        stamp = str(int(time.time()))
        signature = self.telnyx_key.sign(stamp.encode() + b"|" + body)
        return {
            "telnyx-timestamp": stamp,
            "telnyx-signature-ed25519": base64.b64encode(signature).decode(),
        }


@dataclass
class Webhook:
    status: int
    text: str

    @property
    def rejected(self) -> str | None:
        """The ``<Reject>``'s reason ("" for none) if the answer is one."""
        if self.status != 200:
            return None
        found = _xml(self.text).find("Reject")
        return None if found is None else found.get("reason", "")

    def stream(self) -> tuple[str, dict[str, str]]:
        """The ``<Connect><Stream>``'s URL and parameters."""
        root = _xml(self.text)
        stream = root.find("Connect/Stream")
        assert stream is not None, self.text
        parameters = {p.get("name", ""): p.get("value", "") for p in stream.findall("Parameter")}
        return stream.get("url", ""), parameters


def _xml(text: str) -> ET.Element:
    # Our own server's answer, not a stranger's document.
    return ET.fromstring(text)  # noqa: S314


async def webhook(
    session: aiohttp.ClientSession,
    carrier: Carrier,
    *,
    to: str,
    caller: str,
    call_sid: str,
    headers: dict[str, str] | None = None,
) -> Webhook:
    form = {
        "AccountSid": "AC" + "0" * 32,
        "ApiVersion": "2010-04-01",
        "CallSid": call_sid,
        "CallStatus": "ringing",
        "Called": to,
        "Caller": caller,
        "Direction": "inbound",
        "From": caller,
        "To": to,
    }
    body = urllib.parse.urlencode(form).encode()
    path = carrier.voice_url()
    sent = carrier.headers_for(path, form, body) if headers is None else headers
    async with session.post(
        carrier.local_url + path,
        data=body,
        headers={"Content-Type": "application/x-www-form-urlencoded", **sent},
        timeout=aiohttp.ClientTimeout(total=CALL_DEADLINE_S),
    ) as answer:
        return Webhook(answer.status, await answer.text())


@dataclass
class Heard:
    """A frame's arrival: when, what kind, and for media its loudness."""

    at: float
    event: str
    loud: bool = False


@dataclass
class StreamCall:
    """One call's stream, from the carrier's side (see the module doc)."""

    carrier: Carrier
    ws: aiohttp.ClientWebSocketResponse
    call_sid: str
    stream_sid: str
    received: list[Heard] = field(default_factory=list)
    heard: bytearray = field(default_factory=bytearray)
    clears: int = 0
    closed_code: int | None = None
    _pending: bytearray = field(default_factory=bytearray)
    _sequence: int = 0
    _chunk: int = 0
    _changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    # -- sending -----------------------------------------------------------------------------

    def _ids(self) -> dict[str, Any]:
        self._sequence += 1
        if self.carrier.name == "twilio":
            return {"sequenceNumber": str(self._sequence), "streamSid": self.stream_sid}
        return {"sequence_number": str(self._sequence), "stream_id": self.stream_sid}

    async def send(self, frame: dict[str, Any]) -> None:
        async with self._lock:
            await self.ws.send_str(json.dumps(frame))

    async def start(self, parameters: dict[str, str]) -> None:
        await self.send({"event": "connected", "protocol": "Call", "version": "1.0.0"})
        if self.carrier.name == "twilio":
            start: dict[str, Any] = {
                "streamSid": self.stream_sid,
                "accountSid": "AC" + "0" * 32,
                "callSid": self.call_sid,
                "tracks": ["inbound"],
                "customParameters": parameters,
                "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
            }
        else:
            start = {
                "call_control_id": self.call_sid,
                "custom_parameters": parameters,
                "media_format": {"encoding": "PCMU", "sample_rate": 8000, "channels": 1},
            }
        await self.send({"event": "start", **self._ids(), "start": start})
        self._tasks.append(asyncio.get_running_loop().create_task(self._line()))

    def play(self, pcm8k: bytes) -> None:
        """Queue speech (PCM16, 8 kHz) for the line to send, in real time."""
        self._pending += audio.encode(pcm8k)

    async def _line(self) -> None:
        """A phone line: a 20 ms frame every 20 ms, by deadline, speech or silence."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        while not self.ws.closed:
            self._chunk += 1
            await asyncio.sleep(max(0.0, start + self._chunk * audio.FRAME_S - loop.time()))
            chunk = bytes(self._pending[: audio.FRAME_SAMPLES])
            del self._pending[: audio.FRAME_SAMPLES]
            chunk = chunk + SILENCE[len(chunk) :]
            media = {
                "track": "inbound",
                "chunk": str(self._chunk),
                "timestamp": str(self._chunk * 20),
                "payload": base64.b64encode(chunk).decode(),
            }
            with contextlib.suppress(ConnectionError, RuntimeError):
                await self.send({"event": "media", **self._ids(), "media": media})

    @property
    def playing(self) -> bool:
        return bool(self._pending)

    async def dtmf(self, digits: str) -> None:
        for digit in digits:
            await self.send(
                {"event": "dtmf", **self._ids(), "dtmf": {"track": "inbound_track", "digit": digit}}
            )

    async def stop(self) -> None:
        body = {"accountSid": "AC" + "0" * 32, "callSid": self.call_sid}
        await self.send({"event": "stop", **self._ids(), "stop": body})
        await self.ws.close()

    # -- receiving ---------------------------------------------------------------------------

    async def read(self) -> None:
        async for message in self.ws:
            if message.type != aiohttp.WSMsgType.TEXT:
                continue
            frame = json.loads(message.data)
            event = frame["event"]
            loud = False
            key = "streamSid" if self.carrier.name == "twilio" else "stream_id"
            assert frame.get(key) == self.stream_sid, frame
            if event == "media":
                pcm = audio.decode(base64.b64decode(frame["media"]["payload"]))
                self.heard += pcm
                loud = rms(pcm) > SPEECH_RMS
            elif event == "clear":
                self.clears += 1
            async with self._changed:
                self.received.append(Heard(time.monotonic(), event, loud))
                self._changed.notify_all()
        async with self._changed:
            self.closed_code = self.ws.close_code
            self._changed.notify_all()

    async def wait_for(self, what: str, holds: Any, timeout_s: float = CALL_DEADLINE_S) -> None:
        async with asyncio.timeout(timeout_s), self._changed:
            while not holds():
                try:
                    async with asyncio.timeout(0.1):
                        await self._changed.wait()
                except TimeoutError:
                    continue  # a quiet spell is a condition too: look again

    async def answered(self, since: int) -> tuple[float, float]:
        """The first loud answer frame after frame ``since``, and when it went quiet."""

        def sound() -> Heard | None:
            return next((h for h in self.received[since:] if h.loud), None)

        await self.wait_for("the answer's sound", lambda: sound() is not None)
        first = sound()
        assert first is not None

        def quiet() -> bool:
            louds = [h.at for h in self.received[since:] if h.loud]
            return time.monotonic() - louds[-1] > QUIET_S

        await self.wait_for("the answer's end", quiet)
        last = max(h.at for h in self.received[since:] if h.loud)
        return first.at, last

    async def closed(self, timeout_s: float = CALL_DEADLINE_S) -> int | None:
        await self.wait_for("the stream's close", lambda: self.closed_code is not None, timeout_s)
        return self.closed_code

    async def aclose(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if not self.ws.closed:
            await self.ws.close()


def local(carrier: Carrier, url: str) -> str:
    """The public ``wss://`` URL as the local server serves it (a proxy's mapping)."""
    public = urllib.parse.urlsplit(carrier.public_url)
    parsed = urllib.parse.urlsplit(url)
    assert parsed.netloc == public.netloc, (url, carrier.public_url)
    assert parsed.scheme == ("wss" if public.scheme == "https" else "ws"), url
    return carrier.local_url.replace("http", "ws", 1) + parsed.path


@contextlib.asynccontextmanager
async def stream(
    session: aiohttp.ClientSession,
    carrier: Carrier,
    answer: Webhook,
    call_sid: str,
    *,
    parameters: dict[str, str] | None = None,
    signature: str | None = None,
) -> AsyncIterator[StreamCall]:
    """The answer's stream opened and started (``parameters`` in place of the answer's)."""
    url, given = answer.stream()
    headers = {}
    if carrier.name == "twilio":
        headers["X-Twilio-Signature"] = (
            twilio_signature(carrier.twilio_token, url) if signature is None else signature
        )
    ws = await session.ws_connect(
        local(carrier, url), headers=headers, timeout=aiohttp.ClientWSTimeout(ws_close=10)
    )
    call = StreamCall(carrier, ws, call_sid, "MZ" + uuid.uuid4().hex)
    reader = asyncio.get_running_loop().create_task(call.read())
    call._tasks.append(reader)
    try:
        await call.start(given if parameters is None else parameters)
        yield call
    finally:
        await call.aclose()


def call_sid() -> str:
    return "CA" + uuid.uuid4().hex
