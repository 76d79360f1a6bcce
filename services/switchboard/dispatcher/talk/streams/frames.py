"""The carriers' WebSocket frames, read strictly and written as they expect.

Twilio Media MediaStreams (``connected``, ``start``, ``media``, ``dtmf``, ``mark``, ``stop``
in; ``media``, ``mark``, ``clear`` out, each naming the ``streamSid``) and Telnyx's media
streaming, which is the same protocol with other field names (``stream_id``; the start's
``call_control_id``, ``media_format`` with ``sample_rate``, ``custom_parameters``) and an
``error`` frame of its own. Anything that is not JSON, not an object, of an unknown
event, or without the fields its event needs is a ``FrameError``: the server closes the
stream (1008) and logs the event's name at most, never the frame.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass, field
from typing import Any, Final

from switchboard.dispatcher.talk.streams.settings import TELNYX, TWILIO

#: The most base64 characters one ``media`` frame carries: 1 s of 8 kHz mu-law (the
#: carriers send 20 ms, 216 characters; Telnyx's chunks may be longer).
MAX_PAYLOAD_CHARS: Final = 10_668
#: The most custom parameters a start carries, and the longest name or value.
MAX_PARAMETERS: Final = 16
MAX_PARAMETER_CHARS: Final = 2048
_DIGIT: Final = re.compile(r"^[0-9*#A-Da-d]$")
_ID: Final = re.compile(r"^[A-Za-z0-9:._-]{1,128}$")
#: The encodings of 8 kHz mu-law each carrier names.
_MULAW: Final = {TWILIO: "audio/x-mulaw", TELNYX: "PCMU"}


class FrameError(ValueError):
    """A frame the protocol does not allow (said without its content)."""


@dataclass(frozen=True)
class Connected:
    pass


@dataclass(frozen=True)
class Start:
    stream_id: str
    call_id: str
    parameters: dict[str, str] = field(default_factory=dict)
    #: Whether the audio is 8 kHz mono mu-law, the only audio taken.
    mulaw_8k: bool = True


@dataclass(frozen=True)
class Media:
    payload: bytes
    inbound: bool


@dataclass(frozen=True)
class Dtmf:
    digit: str


@dataclass(frozen=True)
class Mark:
    name: str


@dataclass(frozen=True)
class Stop:
    pass


@dataclass(frozen=True)
class CarrierError:
    """Telnyx's report of a problem with what it was sent."""

    code: str


Frame = Connected | Start | Media | Dtmf | Mark | Stop | CarrierError


def parse(carrier: str, text: str) -> Frame:
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        raise FrameError("not JSON") from None
    if not isinstance(value, dict):
        raise FrameError("not a JSON object")
    event = value.get("event")
    if event == "connected":
        return Connected()
    if event == "start":
        return _start(carrier, value)
    if event == "media":
        media = _object(value, "media")
        payload = media.get("payload")
        if not isinstance(payload, str) or len(payload) > MAX_PAYLOAD_CHARS:
            raise FrameError("media.payload")
        try:
            audio = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise FrameError("media.payload is not base64") from None
        track = media.get("track", "inbound")
        return Media(audio, inbound=track in ("inbound", "inbound_track"))
    if event == "dtmf":
        digit = _object(value, "dtmf").get("digit")
        if not isinstance(digit, str) or not _DIGIT.match(digit):
            raise FrameError("dtmf.digit")
        return Dtmf(digit.upper())
    if event == "mark":
        name = _object(value, "mark").get("name")
        return Mark(str(name)[:256] if name is not None else "")
    if event == "stop":
        return Stop()
    if event == "error" and carrier == TELNYX:
        payload = value.get("payload")
        code = payload.get("code") if isinstance(payload, dict) else None
        return CarrierError(str(code)[:32] if code is not None else "")
    raise FrameError("an unknown event")


def _start(carrier: str, value: dict[str, Any]) -> Start:
    start = _object(value, "start")
    if carrier == TWILIO:
        stream_id = value.get("streamSid", start.get("streamSid"))
        call_id = start.get("callSid")
        parameters = start.get("customParameters", {})
        media_format = _object(start, "mediaFormat")
        rate = media_format.get("sampleRate")
    else:
        stream_id = value.get("stream_id")
        call_id = start.get("call_control_id")
        parameters = start.get("custom_parameters", start.get("customParameters", {}))
        media_format = _object(start, "media_format")
        rate = media_format.get("sample_rate")
    if not isinstance(stream_id, str) or not _ID.match(stream_id):
        raise FrameError("the stream's id")
    if not isinstance(call_id, str) or not _ID.match(call_id):
        raise FrameError("the call's id")
    if (
        not isinstance(parameters, dict)
        or len(parameters) > MAX_PARAMETERS
        or not all(
            isinstance(k, str) and isinstance(v, str) and len(v) <= MAX_PARAMETER_CHARS
            for k, v in parameters.items()
        )
    ):
        raise FrameError("the custom parameters")
    encoding = media_format.get("encoding")
    channels = media_format.get("channels", 1)
    mulaw_8k = encoding == _MULAW[carrier] and rate == 8000 and channels == 1
    return Start(stream_id, call_id, dict(parameters), mulaw_8k)


def _object(value: dict[str, Any], name: str) -> dict[str, Any]:
    found = value.get(name)
    if not isinstance(found, dict):
        raise FrameError(f"{name} is not an object")
    return found


def media(carrier: str, stream_id: str, mulaw: bytes) -> str:
    payload = base64.b64encode(mulaw).decode()
    return _frame(carrier, stream_id, "media", {"media": {"payload": payload}})


def clear(carrier: str, stream_id: str) -> str:
    return _frame(carrier, stream_id, "clear", {})


def mark(carrier: str, stream_id: str, name: str) -> str:
    return _frame(carrier, stream_id, "mark", {"mark": {"name": name}})


def _frame(carrier: str, stream_id: str, event: str, body: dict[str, Any]) -> str:
    ids = {"streamSid": stream_id} if carrier == TWILIO else {"stream_id": stream_id}
    return json.dumps({"event": event, **ids, **body}, separators=(",", ":"))
