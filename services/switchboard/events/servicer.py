"""Transport for EventService: converts requests to domain calls and nothing else.

Its two open streams, Subscribe and Stream, are the service's (``streams.py``):
it hands them the caller and the request (or the request frames) and writes out
the frames they give back. Those are pre-serialized (``bytes``); ``PRESERIALIZED``
names them for the registration (``platform/rpc/registration.py``), which sends
them as they are. ListEvents is ``history.py``'s.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from grpc import aio

from switchboard.api.events.v1 import events_pb2
from switchboard.events.history import History
from switchboard.events.streams import Streams
from switchboard.platform.security.authn import current_principal

SERVICE = events_pb2.DESCRIPTOR.services_by_name["EventService"]

Context = aio.ServicerContext[object, object]


class EventServiceServicer:
    """EventService: Subscribe, Stream and ListEvents over the process's bus."""

    def __init__(self, streams: Streams, history: History) -> None:
        self._streams = streams
        self._history = history

    async def Subscribe(
        self, request: events_pb2.SubscribeRequest, context: Context
    ) -> AsyncIterator[bytes]:
        # Closed with this call, not left to the collector: its grant and quota go
        # now, and what its end raises is this call's.
        frames = self._streams.subscribe(current_principal(), request)
        async with contextlib.aclosing(frames):
            async for frame in frames:
                yield frame

    async def Stream(
        self, request_iterator: AsyncIterator[events_pb2.StreamRequest], context: Context
    ) -> AsyncIterator[bytes]:
        frames = self._streams.stream(current_principal(), request_iterator)
        async with contextlib.aclosing(frames):
            async for frame in frames:
                yield frame

    async def ListEvents(
        self, request: events_pb2.ListEventsRequest, context: Context
    ) -> events_pb2.ListEventsResponse:
        return await self._history.list_events(current_principal(), request)


#: Streams of event batches framed once for every subscriber (``eventlog.batch_payload``).
PRESERIALIZED = frozenset({"Subscribe", "Stream"})
