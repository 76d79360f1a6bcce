"""The one publisher of events: every service hands its ``Event`` envelopes here.

Today this is the in-process fan-out with a bounded recent history; the
replayable log with cursors and resumable subscriptions (issue 4) grows behind
this same ``publish`` so that publishers do not change.
"""

from __future__ import annotations

import collections
import logging
import uuid
from collections.abc import Callable

from switchboard.api.events.v1 import events_pb2

log = logging.getLogger("switchboard.bus")

Listener = Callable[[events_pb2.Event], None]


class EventBus:
    def __init__(self, history: int = 1000) -> None:
        self._recent: collections.deque[events_pb2.Event] = collections.deque(maxlen=history)
        self._listeners: list[Listener] = []

    def listen(self, listener: Listener) -> Callable[[], None]:
        """Call ``listener`` for every event published from now on; returns an unsubscribe."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)

    def recent(self) -> list[events_pb2.Event]:
        return list(self._recent)

    async def publish(self, event: events_pb2.Event) -> events_pb2.Event:
        """Stamp ``event`` (id, time) and deliver it; returns the stamped envelope."""
        if not event.id:
            event.id = uuid.uuid4().hex
        if not event.HasField("time"):
            event.time.GetCurrentTime()
        self._recent.append(event)
        for listener in list(self._listeners):
            try:
                listener(event)
            except Exception:  # a broken listener must not break the publisher
                log.exception("event listener failed")
        return event
