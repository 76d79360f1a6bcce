"""Embedding calls charged to the workspace's budgets through the ledger, on
SQLite and PostgreSQL, against the local embeddings server over HTTP."""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator

import pytest

from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.context.semantic.embedder import OpenAIEmbedder, estimate_tokens
from switchboard.context.semantic.ports import (
    EmbeddingModel,
    EmbeddingsBudgetExhausted,
    EmbeddingsUnavailable,
)
from switchboard.dispatcher.budgets.embeddings import (
    STALE_HOLD_S,
    LedgerCharger,
    parse_embedding_prices,
)
from switchboard.dispatcher.budgets.ledger import Amount, Ledger
from switchboard.platform.security.egress import EgressPolicy
from switchboard.platform.store.db import Database
from switchboard.platform.store.models import BudgetHoldRow, BudgetRow, WorkspaceRow
from tests.fakes.embeddings_server import HASH_MODEL, FakeEmbeddings, count_tokens

pytestmark = [pytest.mark.service, pytest.mark.asyncio]

NOW = dt.datetime(2026, 11, 26, 12, 0, tzinfo=dt.UTC)
WINDOW = "d:2026-11-26"
MODEL = EmbeddingModel(HASH_MODEL, 0)
#: Dollars per million input tokens: one micro-dollar a token.
PRICES = {HASH_MODEL: 1.0}


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[Database]:
    database = Database(database_url, timeout_s=10.0)
    try:
        await database.migrate()
        async with database.sessions() as session:
            session.add(WorkspaceRow(id="acme", created_at=NOW, updated_at=NOW))
            await session.commit()
        yield database
    finally:
        await database.close()


@pytest.fixture
async def server() -> AsyncIterator[FakeEmbeddings]:
    async with FakeEmbeddings() as fake:
        yield fake


async def _budget(db: Database, budget_id: str, **caps: int) -> None:
    budget = pb.Budget(display_name=budget_id, period=pb.BUDGET_PERIOD_DAY, **caps)  # type: ignore[arg-type]
    async with db.sessions() as session:
        session.add(
            BudgetRow(
                workspace_id="acme",
                id=budget_id,
                scope_kind="workspace",
                scope_id="",
                data=budget.SerializeToString(),
                created_at=NOW,
                updated_at=NOW,
            )
        )
        await session.commit()


async def _holds(db: Database) -> int:
    async with db.sessions() as session:
        return len((await session.execute(BudgetHoldRow.__table__.select())).all())


def _embedder(server: FakeEmbeddings, ledger: Ledger, **kwargs: object) -> OpenAIEmbedder:
    return OpenAIEmbedder(
        server.url,
        api_key="",
        policy=EgressPolicy(allow_loopback=True),
        charger=LedgerCharger(ledger, PRICES),
        backoff_base_s=0.01,
        backoff_max_s=0.02,
        **kwargs,  # type: ignore[arg-type]
    )


async def test_usage_settled_to_what_the_endpoint_counted(
    db: Database, server: FakeEmbeddings
) -> None:
    await _budget(db, "month", input_token_limit=10_000, cost_limit_micros=10_000)
    ledger = Ledger(db, clock=lambda: NOW)
    embedder = _embedder(server, ledger, batch=2)
    texts = ["the user prefers tea", "deploys fail on tuesdays", "a third note"]
    try:
        embedded = await embedder.embed("workspaces/acme", texts, MODEL)
    finally:
        await embedder.close()
    counted = sum(count_tokens(text) for text in texts)
    assert embedded.input_tokens == counted
    # The reservation (chars/3) over-estimated; the window holds what was counted.
    assert sum(estimate_tokens(text) for text in texts) > counted
    (budget,) = await ledger.applicable("acme")
    assert await ledger.window(budget, WINDOW) == (Amount(counted, counted, 0), Amount())
    assert await _holds(db) == 0


async def test_no_room_refuses_before_sending_and_holds_nothing(
    db: Database, server: FakeEmbeddings
) -> None:
    await _budget(db, "tiny", input_token_limit=5)
    ledger = Ledger(db, clock=lambda: NOW)
    embedder = _embedder(server, ledger)
    try:
        with pytest.raises(EmbeddingsBudgetExhausted, match="workspace acme has no room"):
            await embedder.embed(
                "workspaces/acme", ["a text rather longer than five tokens"], MODEL
            )
    finally:
        await embedder.close()
    assert server.requests == []
    assert await _holds(db) == 0
    (budget,) = await ledger.applicable("acme")
    assert await ledger.window(budget, WINDOW) in (None, (Amount(), Amount()))


async def test_a_failed_call_releases_its_hold(db: Database, server: FakeEmbeddings) -> None:
    await _budget(db, "month", input_token_limit=10_000)
    ledger = Ledger(db, clock=lambda: NOW)
    embedder = _embedder(server, ledger, attempts=2)
    server.fail_next(500, 2)
    try:
        with pytest.raises(EmbeddingsUnavailable):
            await embedder.embed("workspaces/acme", ["hello there"], MODEL)
    finally:
        await embedder.close()
    assert await _holds(db) == 0
    (budget,) = await ledger.applicable("acme")
    assert await ledger.window(budget, WINDOW) == (Amount(), Amount())


async def test_a_hold_left_by_a_dead_process_is_charged_once_stale(db: Database) -> None:
    """A process killed between reserving and settling leaves its hold; a later
    reservation (of any process) charges it at what it reserved once older than
    STALE_HOLD_S (the endpoint may have billed the call), never a younger one,
    which may be a live call of another replica: the room it took stays taken."""
    await _budget(db, "month", input_token_limit=1_000)
    now = [NOW]
    ledger = Ledger(db, clock=lambda: now[0])
    dead = LedgerCharger(ledger, PRICES, clock=lambda: now[0])
    assert await dead.reserve("acme", model=HASH_MODEL, input_tokens=600) is not None
    # The dead process's 600 leave no room for 600 more ...
    live = LedgerCharger(ledger, PRICES, clock=lambda: now[0])
    assert await live.reserve("acme", model=HASH_MODEL, input_tokens=600) is None
    assert await _holds(db) == 1
    # ... still not a minute short of stale (another process's first reservation sweeps) ...
    now[0] = NOW + dt.timedelta(seconds=STALE_HOLD_S - 60)
    third = LedgerCharger(ledger, PRICES, clock=lambda: now[0])
    assert await third.reserve("acme", model=HASH_MODEL, input_tokens=600) is None
    assert await _holds(db) == 1
    (budget,) = await ledger.applicable("acme")
    assert await ledger.window(budget, WINDOW) == (Amount(), Amount(600, 600, 0))
    # ... and once it is stale, the next reservation's sweep charges it: used, not free.
    now[0] = NOW + dt.timedelta(seconds=STALE_HOLD_S + 1)
    assert await live.reserve("acme", model=HASH_MODEL, input_tokens=600) is None
    assert await _holds(db) == 0
    assert await ledger.window(budget, WINDOW) == (Amount(600, 600, 0), Amount())
    # What is left is free.
    held = await live.reserve("acme", model=HASH_MODEL, input_tokens=400)
    assert held is not None
    await live.settle(held, model=HASH_MODEL, input_tokens=300)
    assert await _holds(db) == 0
    assert await ledger.window(budget, WINDOW) == (Amount(900, 900, 0), Amount())


async def test_a_user_s_memory_is_not_charged(db: Database, server: FakeEmbeddings) -> None:
    await _budget(db, "tiny", input_token_limit=1)
    ledger = Ledger(db, clock=lambda: NOW)
    embedder = _embedder(server, ledger)
    try:
        embedded = await embedder.embed("users/u1", ["a note of a user's own"], MODEL)
    finally:
        await embedder.close()
    assert len(embedded.vectors) == 1
    assert await _holds(db) == 0


async def test_prices_parse_and_refuse_nonsense() -> None:
    assert parse_embedding_prices("") == {}
    assert parse_embedding_prices('{"text-embedding-3-small": 0.02}') == {
        "text-embedding-3-small": 0.02
    }
    for bad in ("[]", '{"m": -1}', '{"m": true}', '{"m": "1"}', "nope"):
        with pytest.raises(ValueError, match="embedding prices"):
            parse_embedding_prices(bad)
