"""In-process costs, without the transport: the guard's credential check, what the
same write costs when the host was idle just before it, and a write with an event.

    python bench/micro.py    prints one JSON line: microseconds per call

Separates what authentication itself costs from the noise of two processes
sharing two cores in the QPS figures. ``write_after_idle`` (also reported by
``bench/dispatcher.py``'s latency rows) explains why a run below capacity costs
more CPU than one at capacity: the same code runs slower when it starts cold.
``context_calls`` times what a run asks of the context store (a message appended,
the window read) through the stores themselves.
"""

from __future__ import annotations

import asyncio
import json
import logging
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Final

from sqlalchemy import bindparam
from sqlalchemy.orm import Session

from switchboard.api.auth.v1 import auth_pb2
from switchboard.api.events.v1 import events_pb2
from switchboard.auth.accounts import Accounts
from switchboard.context.messages.store import MessageStore, NewMessage
from switchboard.context.windows.store import WindowScopes, WindowStore
from switchboard.mesh import create_server
from switchboard.platform.events.bus import EventBus
from switchboard.platform.events.eventlog import LocalLog
from switchboard.platform.store.db import open_database
from switchboard.platform.store.models import (
    ConversationRow,
    EventOutboxRow,
    IdempotencyRow,
    WorkspaceRow,
    table_of,
)
from switchboard.platform.store.outbox import Outbox, Staged, staging
from switchboard.platform.store.storage import Idempotency
from switchboard.platform.values.names import new_id, now
from switchboard.settings import Settings

CALLS = 20_000

#: How long the host sits idle before each timed write, ms (0: back to back).
IDLE_GAPS_MS: Final = (0, 5, 50)
_OUTBOX: Final = table_of(EventOutboxRow)


async def write_after_idle(
    directory: Path, gaps_ms: Sequence[int] = IDLE_GAPS_MS, rounds: int = 3, samples: int = 40
) -> dict[str, float]:
    """Median process CPU µs of one small write through ``Database.run``, by idle gap.

    The write is a hot path's smallest: an outbox row inserted and deleted in one
    transaction, in the SQLite thread (the thread hop counted too). Timed back to
    back, and after the process sat idle ``gap`` ms; the gaps are interleaved
    over ``rounds``. On these VMs the same write costs about 2-3 times as much
    after a few milliseconds of idleness (the caches, the branch predictors and the
    virtual CPU go cold), which is what a run below capacity meets between its steps.
    """
    database = await open_database(
        f"sqlite+aiosqlite:///{directory}/idle.db", timeout_s=10, migrate=True
    )
    delete = _OUTBOX.delete().where(_OUTBOX.c.id == bindparam("id"))

    def write(session: Session) -> None:
        row_id = new_id()
        connection = session.connection()
        connection.execute(
            _OUTBOX.insert(),
            [{"id": row_id, "data": b"x" * 300, "key": "", "created_at": now()}],
        )
        connection.execute(delete, {"id": row_id})

    async def step() -> None:
        await database.run(write, write=True)

    try:
        return await _cpu_after_gaps(step, gaps_ms, rounds, samples)
    finally:
        await database.close()


async def _cpu_after_gaps(
    step: Callable[[], Awaitable[None]], gaps_ms: Sequence[int], rounds: int, samples: int
) -> dict[str, float]:
    """Median process CPU µs of ``step`` by the idle gap before it: ``samples`` warm-up
    calls (every statement compiled and cached), then ``rounds`` of ``samples`` per gap."""
    cpu: dict[int, list[float]] = {gap: [] for gap in gaps_ms}
    for _ in range(samples):
        await step()
    for _ in range(rounds):
        for gap in gaps_ms:
            for _ in range(samples):
                if gap:
                    await asyncio.sleep(gap / 1000)
                started = time.process_time()
                await step()
                cpu[gap].append(time.process_time() - started)
    return {str(gap): round(statistics.median(cpu[gap]) * 1e6) for gap in gaps_ms}


async def context_calls(directory: Path, rounds: int = 3, samples: int = 200) -> dict[str, float]:
    """Median process CPU µs of a run's context store calls, back to back, on SQLite.

    What each run asks of the context store: a message appended (with a request_id,
    as a run's answer has) and the window read, through ``MessageStore`` and
    ``WindowStore`` and their ``Database.run`` (the thread hop counted too), on a
    conversation that grows by one message each time. No events are staged: the
    outbox's share is the same with or without the store's changes.
    """
    database = await open_database(
        f"sqlite+aiosqlite:///{directory}/context.db", timeout_s=10, migrate=True
    )
    messages, windows = MessageStore(database), WindowStore(database)
    stamp = now()

    def conversation(session: Session) -> None:
        session.add(WorkspaceRow(id="micro", created_at=stamp, updated_at=stamp, version=1))
        session.flush()
        session.add(
            ConversationRow(
                id="c1", workspace_id="micro", created_at=stamp, updated_at=stamp, version=1
            )
        )

    await database.run(conversation, write=True)
    scopes = WindowScopes("workspaces/micro/conversations/c1", "workspaces/micro", "users/u1")
    text = b"the quick brown fox jumps over the lazy dog and then runs far away"

    async def append() -> None:
        message_id = new_id()
        new = NewMessage(
            id=message_id,
            name=f"{scopes.conversation}/messages/{message_id}",
            scope=scopes.conversation,
            role="user",
            tokens=13,
            encode=lambda seq, when, branch: text,
            entities=(),
            entity_creator="system",
        )
        key = Idempotency(f"u1/AppendMessage/{message_id}", "f" * 64)
        await messages.append_message(
            "micro", "c1", new, max_memory_per_scope=10_000, idempotency=key
        )

    async def window() -> None:
        await windows.window_rows(
            "micro",
            "c1",
            scopes,
            budget=4000,
            query=lambda latest: "quick brown fox",
            relevant_limit=10,
            max_pinned=50,
        )

    cases = {"append": append, "window": window}
    cpu: dict[str, list[float]] = {name: [] for name in cases}
    try:
        for _ in range(samples // 4):  # warm-up: every statement compiled and cached
            for call in cases.values():
                await call()
        for _ in range(rounds):
            for name, call in cases.items():
                for _ in range(samples):
                    started = time.process_time()
                    await call()
                    cpu[name].append(time.process_time() - started)
    finally:
        await database.close()
    return {name: round(statistics.median(cpu[name]) * 1e6) for name in cases}


async def staged_change(
    directory: Path, gaps_ms: Sequence[int] = (0, 5), rounds: int = 3, samples: int = 60
) -> dict[str, float]:
    """Median process CPU µs of one change with one event, by idle gap: a row inserted
    and one event staged in its transaction (``Staged``), then ``publish_staged``
    awaited, on the embedded log over a SQLite file. Everything a write with an event
    costs until its event is in the log and delivered: on the outbox path a second
    transaction (the event logged, its outbox row deleted), inline none."""
    database = await open_database(
        f"sqlite+aiosqlite:///{directory}/staged.db", timeout_s=10, migrate=True
    )
    outbox = Outbox(database)
    local = LocalLog(database, retention=100_000, retention_s=3600, memory=1000, outbox=outbox)
    bus = EventBus(local, memory=1000, outbox=outbox)
    await bus.start()
    keys = table_of(IdempotencyRow)

    async def change() -> None:
        staged: Staged[None] = Staged(
            outbox,
            lambda _: [
                events_pb2.Event(
                    type=events_pb2.EVENT_TYPE_CONVERSATION_CHANGED, workspace="workspaces/w"
                )
            ],
        )

        def work(session: Session) -> None:
            session.connection().execute(
                keys.insert(),
                [{"key": new_id(), "fingerprint": "f", "resource": "r", "created_at": now()}],
            )

        await database.run(staging(staged, work), write=True)
        await bus.publish_staged(staged.events)

    try:
        return await _cpu_after_gaps(change, gaps_ms, rounds, samples)
    finally:
        await bus.close()
        await database.close()


async def main() -> None:
    logging.disable(logging.WARNING)
    directory = tempfile.mkdtemp(prefix="switchboard-micro-")
    settings = Settings.from_values(
        host="127.0.0.1",
        port=0,
        dev_mode=True,
        database_url=f"sqlite+aiosqlite:///{directory}/micro.db",
    )
    server, _ = await create_server(settings)
    try:
        shared = server.shared
        accounts = shared.built(Accounts)
        assert accounts is not None  # the auth service is served
        sign_in = await accounts.register(
            auth_pb2.RegisterRequest(
                email="micro@example.com",
                password="measured many times 123",  # noqa: S106 - a throwaway account
                display_name="Micro",
            ),
            "-",
        )
        token = sign_in.tokens.access_token
        await shared.authenticator.authenticate(token)
        started = time.perf_counter()
        for _ in range(CALLS):
            await shared.authenticator.authenticate(token)
        cached_us = (time.perf_counter() - started) / CALLS * 1e6
        tokens = shared.tokens  # the verifier the authenticator wraps
        started = time.perf_counter()
        for _ in range(CALLS // 10):
            tokens.verify(token)
        verify_us = (time.perf_counter() - started) / (CALLS // 10) * 1e6
        idle = await write_after_idle(Path(directory))
        context = await context_calls(Path(directory))
        staged = await staged_change(Path(directory))
    finally:
        await server.shutdown(grace=0)
    print(
        json.dumps(
            {
                "cached_authenticate_us": round(cached_us, 2),
                "verify_us": round(verify_us, 1),
                "write_after_idle_us": idle,
                "context_calls_us": context,
                "staged_change_us": staged,
            }
        )
    )


if __name__ == "__main__":
    asyncio.run(main())
