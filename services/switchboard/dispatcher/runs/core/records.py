"""The runs' rows as plain values, and what their store refuses.

``RunStore`` (``store.py``) returns these: a run with its restart data (``Stored``),
what its budgets were charged (``Charged``), the instance that owns it (``Owner``); and
it takes them: a run to insert (``NewRun``), which runs to list (``Listing``). A message
sent with policy REJECT to a conversation with an active run is refused here
(``raise_busy``), by the store's insert and by admission alike.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass

from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.platform.errors import ConversationBusy
from switchboard.platform.store.storage import Idempotency


@dataclass(frozen=True)
class Charged:
    """What a run's budgets were charged: its settlements' sum, kept on its row."""

    cost_micros: int = 0
    input_tokens: int = 0
    output_tokens: int = 0

    def __add__(self, other: Charged) -> Charged:
        return Charged(
            self.cost_micros + other.cost_micros,
            self.input_tokens + other.input_tokens,
            self.output_tokens + other.output_tokens,
        )


@dataclass(frozen=True)
class Stored:
    """A run as the store returns it, with its restart data."""

    run: pb.Run
    job: bytes
    workspace_id: str
    conversation_id: str
    #: What its budgets were charged so far (an active run's settlements, every
    #: attempt's); an ended run's usage columns.
    charged: Charged = Charged()


@dataclass(frozen=True)
class Owner:
    """The dispatcher instance a run belongs to, as its lease describes it."""

    instance: str
    #: Where other replicas reach it (``SWITCHBOARD_ADVERTISE_ADDRESS``); "" if unknown.
    address: str
    #: Its lease has not expired: it is running (or about to recover) the run.
    live: bool


@dataclass(frozen=True)
class NewRun:
    """What ``create`` inserts."""

    run_id: str
    workspace_id: str
    conversation_id: str
    creator: str
    worker: str
    run: pb.Run
    job: bytes
    #: The request's ``request_id`` key, if it has one.
    idempotency: Idempotency | None = None
    #: Refuse (ConversationBusy) if the conversation has an active run.
    reject_if_active: bool = False
    #: The API key the run was started with ("" for none): quotas count a key's runs.
    api_key_id: str = ""
    #: The run whose delegate call started it, and its tree's root ("": none; the root
    #: of a run with no parent is itself).
    parent_id: str = ""
    root_id: str = ""


@dataclass(frozen=True)
class Listing:
    """Which runs ``RunStore.page`` lists: a workspace's, or one conversation's, with
    the filters that are set."""

    workspace_id: str
    conversation_id: str = ""
    assistant_id: str = ""
    states: Sequence[int] = ()
    changed_after: dt.datetime | None = None
    #: Only the children of this run (its id).
    parent_id: str = ""


def raise_busy() -> None:
    """Refuse a REJECT-policy message: the conversation has an active run."""
    raise ConversationBusy(
        "the conversation already has an active run (policy REJECT); "
        "retry when it ends, or send with ENQUEUE or INTERRUPT"
    )
