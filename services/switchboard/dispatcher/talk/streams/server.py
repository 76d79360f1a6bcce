"""The carriers' HTTP side: the voice webhook and the media stream's WebSocket (aiohttp).

``POST /telephony/{carrier}/voice``: the carrier's webhook for an incoming call. Its
signature is checked first (``signing.py``; 403 without a word otherwise), then the
registry screens the call (``calls.py``): ``<Reject/>`` (``reason="busy"`` at the limits)
or ``<Connect><Stream>`` to this server's public ``wss://`` URL with the call's ticket as
the stream's ``call`` parameter. TwiML and Telnyx's TeXML are the same document here.

``GET /telephony/{carrier}/stream``: the stream. Twilio's upgrade is signed too. Then
the frames (``frames.py``): the ``start`` must come within ``START_TIMEOUT_S`` and redeem
a ticket for that call, in 8 kHz mu-law; the call is admitted (``MediaStreams.admit``); the
caller's ``media`` becomes 20 ms frames of the bridge's audio, ``dtmf`` its keys, ``stop``
or the socket closing its hang-up. The answer goes out through the ``Pacer``; a barge-in
sends ``clear``. Limits: a message's size (``MAX_MESSAGE_BYTES``, aiohttp closes 1009
past it), messages a second (a token bucket), the sockets open at once (503 past them).
A frame that is not the protocol's, or arrives out of order, closes the stream with 1008
and is logged by its kind only; a refused stream closes with 1008 (no ticket, forbidden)
or 1013 (busy, or the server's trouble: the carrier may try again).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import urllib.parse
from collections.abc import Coroutine
from typing import Any, Final
from xml.sax.saxutils import quoteattr

from aiohttp import WSCloseCode, WSMsgType, web
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from switchboard.dispatcher.talk.streams import frames
from switchboard.dispatcher.talk.streams.audio import Frames, Pacer, StreamPlayout
from switchboard.dispatcher.talk.streams.calls import BUSY, MediaStreams, Screened, StreamCall
from switchboard.dispatcher.talk.streams.settings import TELNYX, TWILIO
from switchboard.dispatcher.talk.streams.signing import telnyx_valid, twilio_valid

log = logging.getLogger("switchboard.dispatcher.talk.streams")

#: The largest webhook body taken (a carrier's form is a few hundred bytes).
MAX_BODY_BYTES: Final = 64 * 1024
#: The largest WebSocket message taken: a ``media`` frame of 1 s of audio, and its JSON.
MAX_MESSAGE_BYTES: Final = 16 * 1024
#: Messages a second a stream may send (a carrier sends 50 ``media`` a second), and at
#: once: what queued while the call was admitted is read at once.
MESSAGES_PER_S: Final = 100.0
MESSAGE_BURST: Final = 800
#: How long after the upgrade the ``start`` must come.
START_TIMEOUT_S: Final = 10.0
#: A stream that sends nothing for this long is dead (the carriers send audio throughout).
IDLE_TIMEOUT_S: Final = 30.0
#: How long sending one frame may take.
SEND_TIMEOUT_S: Final = 5.0
#: How long closing a socket waits for the carrier's close.
CLOSE_TIMEOUT_S: Final = 5.0
#: WebSocket close codes (RFC 6455): a policy violation, and try again later.
POLICY: Final = int(WSCloseCode.POLICY_VIOLATION)
TRY_AGAIN: Final = int(WSCloseCode.TRY_AGAIN_LATER)
_CALL_ID: Final = re.compile(r"^[A-Za-z0-9:._-]{1,128}$")
_NUMBER: Final = re.compile(r"^[^\x00-\x1f<>\"]{0,64}$")


class Bucket:
    """A token bucket: ``rate`` a second, ``burst`` at once."""

    def __init__(self, rate: float, burst: int) -> None:
        self._rate = rate
        self._burst = float(burst)
        self._tokens = float(burst)
        self._then = time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self._tokens = min(self._burst, self._tokens + (now - self._then) * self._rate)
        self._then = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True


class StreamServer:
    """See the module doc. ``start`` binds; ``stop`` closes every socket and the server."""

    def __init__(
        self,
        streams: MediaStreams,
        *,
        public_url: str,
        twilio_token: str,
        telnyx_key: Ed25519PublicKey | None,
        max_sockets: int,
    ) -> None:
        self._streams = streams
        self._public = public_url
        scheme, _, rest = public_url.partition("://")
        self._wss = f"{'wss' if scheme == 'https' else 'ws'}://{rest}"
        self._twilio_token = twilio_token
        self._telnyx_key = telnyx_key
        self._max_sockets = max_sockets
        self._sockets = 0
        self._tasks: set[asyncio.Task[Any]] = set()
        self._runner: web.AppRunner | None = None
        app = web.Application(client_max_size=MAX_BODY_BYTES)
        app.router.add_post("/telephony/{carrier}/voice", self._voice)
        app.router.add_get("/telephony/{carrier}/stream", self._stream)
        self._app = app

    @property
    def carriers(self) -> tuple[str, ...]:
        found = [TWILIO] if self._twilio_token else []
        return (*found, TELNYX) if self._telnyx_key is not None else tuple(found)

    async def start(self, host: str, port: int) -> int:
        """The port bound; OSError when it cannot be."""
        runner = web.AppRunner(
            self._app, handle_signals=False, access_log=None, shutdown_timeout=CLOSE_TIMEOUT_S
        )
        await runner.setup()
        site = web.TCPSite(runner, host, port)
        try:
            await site.start()
        except OSError:
            await runner.cleanup()
            raise
        self._runner = runner
        bound = runner.addresses[0]
        return int(bound[1])

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # -- the webhook -------------------------------------------------------------------------

    async def _voice(self, request: web.Request) -> web.StreamResponse:
        carrier = request.match_info["carrier"]
        if carrier not in self.carriers:
            return web.Response(status=404)
        body = await request.read()
        try:
            params = urllib.parse.parse_qsl(
                body.decode(), keep_blank_values=True, strict_parsing=False, max_num_fields=200
            )
        except (UnicodeDecodeError, ValueError):
            return web.Response(status=400)
        if not self._signed_webhook(carrier, request, body, params):
            log.info("a %s webhook with a bad or missing signature was refused", carrier)
            return web.Response(status=403)
        fields = dict(params)
        call_id, dialed = fields.get("CallSid", ""), fields.get("To", "")
        caller = fields.get("From", "")
        if not _CALL_ID.match(call_id) or not dialed or not _NUMBER.match(dialed):
            return web.Response(status=400)
        if not _NUMBER.match(caller):
            caller = ""
        screened = await self._streams.screen(
            carrier, caller=caller, dialed=dialed, call_id=call_id
        )
        return web.Response(
            text=self._answer(carrier, screened), content_type="text/xml", charset="utf-8"
        )

    def _signed_webhook(
        self, carrier: str, request: web.Request, body: bytes, params: list[tuple[str, str]]
    ) -> bool:
        if carrier == TWILIO:
            url = self._public + request.path_qs
            signature = request.headers.get("X-Twilio-Signature")
            return twilio_valid(self._twilio_token, url, params, signature)
        if self._telnyx_key is None:  # not served: ``carriers`` said so already
            return False
        return telnyx_valid(
            self._telnyx_key,
            request.headers.get("telnyx-timestamp"),
            body,
            request.headers.get("telnyx-signature-ed25519"),
        )

    def _answer(self, carrier: str, screened: Screened) -> str:
        head = '<?xml version="1.0" encoding="UTF-8"?>'
        if not screened.ticket:
            reason = ' reason="busy"' if screened.refusal == BUSY else ""
            return f"{head}<Response><Reject{reason}/></Response>"
        url = quoteattr(f"{self._wss}/telephony/{carrier}/stream")
        # Telnyx streams only one way unless asked; Twilio's <Connect> is both ways.
        both = ' bidirectionalMode="rtp"' if carrier == TELNYX else ""
        return (
            f"{head}<Response><Connect><Stream url={url}{both}>"
            f'<Parameter name="call" value={quoteattr(screened.ticket)}/>'
            "</Stream></Connect></Response>"
        )

    # -- the stream --------------------------------------------------------------------------

    async def _stream(self, request: web.Request) -> web.StreamResponse:
        carrier = request.match_info["carrier"]
        if carrier not in self.carriers:
            return web.Response(status=404)
        if self._sockets >= self._max_sockets:
            log.info("a %s stream was refused: %d sockets open", carrier, self._sockets)
            return web.Response(status=503)
        if carrier == TWILIO:
            url = self._wss + request.path_qs
            signature = request.headers.get("X-Twilio-Signature")
            if not twilio_valid(self._twilio_token, url, (), signature):
                log.info("a twilio stream with a bad or missing signature was refused")
                return web.Response(status=403)
        ws = web.WebSocketResponse(
            max_msg_size=MAX_MESSAGE_BYTES, autoping=True, timeout=CLOSE_TIMEOUT_S
        )
        self._sockets += 1
        try:
            await ws.prepare(request)
            await _Carried(self, carrier, ws).run()
        finally:
            self._sockets -= 1
            # Not prepared: not an upgrade at all (aiohttp answers 400).
            if ws.prepared and not ws.closed:
                await ws.close()
        return ws

    def spawn(self, work: Coroutine[Any, Any, Any], name: str) -> None:
        task = asyncio.get_running_loop().create_task(work, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @property
    def streams(self) -> MediaStreams:
        return self._streams


class _Carried:
    """One stream's frames, from its ``start`` to its end (see the module doc)."""

    def __init__(self, server: StreamServer, carrier: str, ws: web.WebSocketResponse) -> None:
        self._server = server
        self._carrier = carrier
        self._ws = ws
        self._bucket = Bucket(MESSAGES_PER_S, MESSAGE_BURST)
        self._frames = Frames()
        self._call: StreamCall | None = None
        self._stream_id = ""
        self._pacer: asyncio.Task[None] | None = None
        self._outcome = "the stream closed"

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        start_by = loop.time() + START_TIMEOUT_S
        try:
            while not self._ws.closed:
                wait = IDLE_TIMEOUT_S if self._call else max(0.0, start_by - loop.time())
                try:
                    message = await self._ws.receive(timeout=wait)
                except TimeoutError:
                    if self._call is None:
                        await self._refuse("no start in time", POLICY)
                    else:
                        self._outcome = "the stream went quiet"
                        await self._ws.close()
                    return
                if message.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED):
                    return
                if message.type == WSMsgType.ERROR:
                    self._outcome = "the stream failed"
                    return
                if message.type != WSMsgType.TEXT:
                    await self._refuse("a frame that is not text", POLICY)
                    return
                if not self._bucket.take():
                    await self._refuse("too many frames", POLICY)
                    return
                try:
                    frame = frames.parse(self._carrier, message.data)
                except frames.FrameError as exc:
                    # Its kind only: a frame may carry the caller's audio.
                    await self._refuse(f"a malformed frame ({exc})", POLICY)
                    return
                if not await self._take(frame):
                    return
        finally:
            await self._end()

    async def _take(self, frame: frames.Frame) -> bool:
        """Whether the stream goes on after ``frame``."""
        call = self._call
        if isinstance(frame, frames.Media):
            if call is None or call.bridge is None:
                await self._refuse("media before its start", POLICY)
                return False
            if frame.inbound:
                for pcm in self._frames.add(frame.payload):
                    call.bridge.audio(pcm)
        elif isinstance(frame, frames.Start):
            if call is not None:
                await self._refuse("a second start", POLICY)
                return False
            return await self._begin(frame)
        elif isinstance(frame, frames.Dtmf):
            if call is not None and call.bridge is not None:
                call.bridge.key(frame.digit)
        elif isinstance(frame, frames.Stop):
            self._outcome = "the caller hung up"
            return False
        elif isinstance(frame, frames.CarrierError):
            log.info("%s reported an error on a stream: %s", self._carrier, frame.code)
        return True

    async def _begin(self, start: frames.Start) -> bool:
        streams = self._server.streams
        ticket = streams.tickets.redeem(start.parameters.get("call", ""), self._carrier)
        if ticket is None or ticket.call_id != start.call_id:
            await self._refuse("no valid ticket", POLICY)
            return False
        if not start.mulaw_8k:
            await self._refuse("audio other than 8 kHz mu-law", POLICY)
            return False
        self._stream_id = start.stream_id
        call = await streams.admit(ticket, self._hang_up)
        if call is None or call.bridge is None:
            await self._refuse("refused", TRY_AGAIN)
            return False
        self._call = call
        playout = StreamPlayout(on_clear=self._clear)
        self._pacer = asyncio.get_running_loop().create_task(
            Pacer(playout, self._send_media).run(), name="stream-pacer"
        )
        call.bridge.begin(playout)
        log.info("a %s stream is up", self._carrier, extra={"session": call.bridge.session})
        return True

    async def _refuse(self, why: str, code: int) -> None:
        log.info("a %s stream was closed: %s", self._carrier, why)
        self._outcome = why
        await self._ws.close(code=code)

    async def _end(self) -> None:
        if self._pacer is not None:
            self._pacer.cancel()
            await asyncio.gather(self._pacer, return_exceptions=True)
        call = self._call
        if call is not None and call.bridge is not None:
            call.bridge.hung_up(self._outcome)

    def _hang_up(self) -> None:
        """The call ends from our side (``end_call``, the session's end): the carrier ends
        the call when its stream closes."""
        if not self._ws.closed:
            self._server.spawn(self._ws.close(), "stream-close")

    def _clear(self) -> None:
        if self._stream_id:
            self._server.spawn(
                self._send(frames.clear(self._carrier, self._stream_id)), "stream-clear"
            )

    async def _send_media(self, mulaw: bytes) -> None:
        await self._send(frames.media(self._carrier, self._stream_id, mulaw))

    async def _send(self, text: str) -> None:
        if self._ws.closed:
            return
        try:
            async with asyncio.timeout(SEND_TIMEOUT_S):
                await self._ws.send_str(text)
        except (ConnectionError, RuntimeError, TimeoutError):
            # The socket is going: its reader sees the end and hangs the call up.
            return
