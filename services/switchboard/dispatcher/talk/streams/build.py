"""The carriers' media streams as a dispatcher process builds them from
``SWITCHBOARD_STREAMS_*``: none without ``SWITCHBOARD_STREAMS_LISTEN``; else the server
started, its calls closed (before the dispatcher's runs stop) and the server stopped when
the process stops."""

from __future__ import annotations

import logging

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from switchboard.dispatcher.ports.context import ContextPort
from switchboard.dispatcher.talk.phone.book import CallBook
from switchboard.dispatcher.talk.session import Talks
from switchboard.dispatcher.talk.streams.calls import MediaStreams, StreamLimits
from switchboard.dispatcher.talk.streams.settings import (
    StreamsSettings,
    dialplan,
    listen,
    public_url,
    telnyx_key,
)
from switchboard.dispatcher.talk.streams.signing import Tickets
from switchboard.dispatcher.tools.runner import LateTools
from switchboard.platform.config import ConfigError
from switchboard.platform.imports import imported
from switchboard.platform.process import Shared

log = logging.getLogger("switchboard.dispatcher.talk.streams")

SERVER = "switchboard.dispatcher.talk.streams.server"
#: Sockets open at once per call allowed: a carrier's retry may overlap the last try.
SOCKETS_PER_CALL = 2


async def start_streams(
    shared: Shared, talks: Talks, context: ContextPort, late: LateTools, calls: CallBook
) -> MediaStreams | None:
    settings = shared.section(StreamsSettings)
    where = listen(settings.streams_listen)
    if where is None:
        return None
    public = public_url(settings.streams_public_url)
    if public.startswith("http:") and not shared.settings.dev_mode:
        # The carriers' signatures and the tickets cross the Internet: never in clear.
        raise ConfigError("SWITCHBOARD_STREAMS_PUBLIC_URL: https:// is needed outside dev mode")
    plan = dialplan(settings.streams_rules.get_secret_value())
    streams = MediaStreams(
        plan=plan,
        talks=talks,
        context=context,
        policy=shared.policy,
        limits=StreamLimits(
            max_calls=settings.streams_max_calls,
            max_calls_per_workspace=settings.streams_max_calls_per_workspace,
        ),
        # Every replica accepts every other's tickets (signing.py).
        tickets=Tickets(shared.settings.effective_secret_key()),
        calls=calls,
    )
    # aiohttp's server and numpy's tables load only where streams are served (decision 66).
    await imported(SERVER)
    from switchboard.dispatcher.talk.streams.server import StreamServer

    key = settings.streams_telnyx_public_key
    server = StreamServer(
        streams,
        public_url=public,
        twilio_token=settings.streams_twilio_auth_token.get_secret_value(),
        telnyx_key=Ed25519PublicKey.from_public_bytes(telnyx_key(key)) if key else None,
        max_sockets=settings.streams_max_calls * SOCKETS_PER_CALL,
    )
    late.sources.append(streams)  # end_call, offered to its calls' runs
    calls.lines.append(streams)  # EndCall

    async def started() -> MediaStreams:
        return streams

    await shared.part(MediaStreams, started)
    try:
        port = await server.start(where[0], where[1])
    except OSError as exc:
        raise ConfigError(
            f"SWITCHBOARD_STREAMS_LISTEN: media streams cannot listen on "
            f"{where[0]}:{where[1]}: {exc.strerror or exc}"
        ) from None
    streams.port = port
    shared.resources.push_async_callback(server.stop)
    shared.resources.push_async_callback(streams.close)
    log.info(
        "media streams served on %s:%d for %s; %d dispatch rules",
        where[0],
        port,
        ", ".join(server.carriers),
        len(plan.rules),
    )
    return streams
