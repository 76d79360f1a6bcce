"""A run's answer stored with its end, in one transaction (decision 72).

``Execution._answer`` names the answer's message (``output_message``) and leaves its
request on the run (``Active.answer``); the end's save then runs inside the answer's
append (``RunStore.save``'s ``around``): both commit or neither does. A module of its
own, not the execution stage's: the save calls it from the publishing stage, and the
stages call forward only (``tests/dispatcher/test_dispatcher_stages.py``).
"""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy.orm import Session

from switchboard.api.context.v1 import context_pb2 as cpb
from switchboard.dispatcher.ports.context import ContextPort, Started
from switchboard.dispatcher.runs.core.active.lifecycle import Active
from switchboard.dispatcher.runs.core.active.live import FINISH_TIMEOUT_S
from switchboard.dispatcher.runs.core.store import Around, RunStore


class Renamed(Exception):
    """The run's answer was stored before under this name (rolls its end back)."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


def answering(active: Active, context: ContextPort, store: RunStore) -> Around | None:
    """The run's end saved in its answer's transaction (None: no answer waits).
    ``Renamed`` when the append answers with an earlier attempt's message."""
    if active.answer is None:
        return None
    request, message_id = active.answer
    named = active.run.output_message
    principal = active.principal

    def checked(message: cpb.Message) -> None:
        if message.name != named:
            # A retried run's first attempt stored it: the run names that one.
            raise Renamed(message.name)

    async def around(work: Callable[[Session], bool]) -> bool:
        def within(db: Session, message: cpb.Message) -> bool:
            checked(message)
            return work(db)

        async def alone(message: cpb.Message) -> bool:
            checked(message)
            return await store.transaction(work)

        _, saved = await context.append_message_with(
            principal,
            request,
            Started(within, alone),
            timeout_s=FINISH_TIMEOUT_S,
            message_id=message_id,
        )
        return saved

    return around
