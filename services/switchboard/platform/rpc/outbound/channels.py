"""Client channels to domain experts (HandlerService), shared by the dispatcher and the hub.

One channel per expert, kept open: a run or a tool call should not pay a
TCP and HTTP/2 handshake, and the channel's own connectivity state tells
whether the expert is reachable now (an expert the channel cannot reach is
in TRANSIENT_FAILURE; one it is connected to is READY).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any, Final

import grpc
from grpc import aio
from pydantic import Field

from switchboard.platform.config import Section
from switchboard.platform.observe.telemetry import client_interceptors

ChannelOptions = Sequence[tuple[str, Any]]


class RemoteHandlerSettings(Section):
    """The operator's static experts: the dispatcher registers them as handlers and the
    integration hub keeps their ids from workspaces' integrations, so they are a section
    of the platform's, beside the channels both open to experts."""

    dispatcher_remote_handlers: str = Field(
        default="",
        description="static remote domain experts (HandlerService), comma-separated `id=host:port`",
    )


def parse_remotes(text: str) -> list[tuple[str, str]]:
    """``SWITCHBOARD_DISPATCHER_REMOTE_HANDLERS`` (``id=host:port,...``) as (id, address)
    pairs; ValueError if malformed."""
    found: list[tuple[str, str]] = []
    for raw in text.split(","):
        item = raw.strip()
        if not item:
            continue
        handler_id, sep, address = item.partition("=")
        host, colon, port = address.strip().rpartition(":")
        if not sep or not colon or not host or not port.isdigit():
            raise ValueError(f"remote handler {item!r}: expected id=host:port")
        found.append((handler_id.strip(), address.strip()))
    return found


READY: Final = grpc.ChannelConnectivity.READY
DOWN: Final = (grpc.ChannelConnectivity.TRANSIENT_FAILURE, grpc.ChannelConnectivity.SHUTDOWN)

CHANNEL_OPTIONS: Final[tuple[tuple[str, Any], ...]] = (
    # gRPC's reconnect backoff grows to 120 s: an expert back after a long
    # outage would be ignored that long. Capped, it is found within seconds.
    ("grpc.initial_reconnect_backoff_ms", 250),
    ("grpc.min_reconnect_backoff_ms", 250),
    ("grpc.max_reconnect_backoff_ms", 2_000),
    # A connection whose peer vanished (host gone, no FIN) is noticed during a
    # call. Not more often: gRPC servers by default refuse pings more frequent
    # than every 5 minutes and answer them with GOAWAY.
    ("grpc.keepalive_time_ms", 300_000),
    ("grpc.keepalive_timeout_ms", 20_000),
)


def expert_channel(target: str, options: ChannelOptions = (), *, tls: bool = False) -> aio.Channel:
    """A channel to one expert at ``target``; ``options`` override the defaults of the same name.

    ``options`` carry what the egress check decided (``platform/security/egress.py``):
    the checked address is the target, the host name stays the authority and
    the name TLS verifies. ``tls`` uses the system's trusted roots.
    """
    merged = over_defaults(options, CHANNEL_OPTIONS)
    # With tracing on: a client span per call, its context sent to the expert.
    interceptors = client_interceptors()
    if tls:
        return aio.secure_channel(
            target, grpc.ssl_channel_credentials(), options=merged, interceptors=interceptors
        )
    return aio.insecure_channel(target, options=merged, interceptors=interceptors)


def over_defaults(
    options: Sequence[tuple[str, Any]], defaults: Sequence[tuple[str, Any]]
) -> tuple[tuple[str, Any], ...]:
    """``options``, then each of ``defaults`` they do not name. gRPC takes an option's
    FIRST value (tests/platform/rpc/outbound/test_channel_options.py shows it), so a caller's option
    placed after a default of the same name would be ignored."""
    named = {name for name, _ in options}
    return (*options, *(option for option in defaults if option[0] not in named))


async def connected(channel: aio.Channel, within_s: float) -> bool:
    """Whether ``channel`` is READY, waiting at most ``within_s`` for one attempt.

    False as soon as an attempt fails (TRANSIENT_FAILURE): a caller must not
    wait out the reconnect backoff of an expert that is down.
    """
    try:
        async with asyncio.timeout(within_s):
            while True:
                state = channel.get_state(try_to_connect=True)
                if state == READY:
                    return True
                if state in DOWN:
                    return False
                await channel.wait_for_state_change(state)
    except TimeoutError:
        return False
