"""Context service benchmarks: GetContextWindow on a long conversation, AppendMessage under load.

    python bench/context.py                the full run (about 3 minutes); prints the report
    python bench/context.py --quick        small sizes and short phases, to try it out (< 1 min)
    python bench/context.py --write        ... and put the report into BENCHMARKS.md
    python bench/context.py --json         one JSON line: the figures and the report (bench/run.py)
    python bench/context.py --only window  some scenarios: window append
    python bench/context.py --no-postgres  AppendMessage on SQLite only

The server is a real ``switchboard serve --dev --port 0`` process (``python -m
switchboard.cli``, default settings, JSON access log to a file) on a fresh
embedded SQLite database, or on a throwaway PostgreSQL cluster started with
``tests/infra/postgres.py`` (its durability settings restored to PostgreSQL's
defaults). Every measured call is a gRPC call from a separate client process
(``python bench/context.py client SPEC``) over loopback; both share the cores.

GetContextWindow: the server runs with ``SWITCHBOARD_CONTEXT_AUTO_PRUNE_MESSAGES=0``
so the conversation really holds every message live. The user, workspace and
conversation are created through the RPCs; most messages and every memory item
are then written in this process through the real context domain
(``context/messages/catalog.py``, ``context/memory/catalog.py`` and their stores) on the same
database file (the event bus replaced by a no-op: nobody subscribes to the
seed), and the last messages through AppendMessage.
Messages alternate user/assistant, 20-80 words each; memory items (10-40 words)
are spread over the conversation, workspace and user scopes, a few pinned in
each. The text is drawn from a shared work-chat vocabulary with no links,
addresses, mentions or dates, so no entity memory is derived and the memory
count is exact, while full-text relevance has many candidates to rank.

AppendMessage: one writer per conversation, each appending in a closed loop;
every appended sequence number is checked to increase, and afterwards every
conversation's ``message_count`` is checked against the appends that succeeded.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, cast

from grpc import aio

from switchboard.api.context.v1 import context_pb2 as pb
from switchboard.api.context.v1 import context_pb2_grpc
from switchboard.api.events.v1 import events_pb2

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository: bench.*, tests.*

from bench.fixtures import Account, create_conversations, create_workspace, register
from bench.harness import (
    CpuMeter,
    bearer,
    clients,
    command_line,
    errors_text,
    host_speed_line,
    provenance,
    quiet_gc,
    report,
    run_client,
    say,
    section_main,
    serve,
    session,
    summary,
    verdict,
)

SECTION: Final = "## Context service"
WINDOW_METHOD: Final = "/switchboard.api.context.v1.ContextService/GetContextWindow"
WORKSPACE: Final = "bench"
#: Budgets of the issue: p99 of GetContextWindow, in ms.
CACHED_P99_BUDGET_MS: Final = 5.0
UNCACHED_P99_BUDGET_MS: Final = 50.0
#: Messages appended through the RPC at the end of the seed (the rest in process).
RPC_TAIL: Final = 100
#: Pinned memory items per scope (settings: context_max_pinned, 50 by default).
PINNED_PER_SCOPE: Final = 3


@dataclass(frozen=True)
class Sizes:
    messages: int
    memory: int
    budgets: tuple[int, ...]
    warmup: int
    cached_calls: int
    uncached_calls: int
    append_calls: int
    writers: int
    append_seconds: float
    single_seconds: float


FULL: Final = Sizes(
    messages=10_000,
    memory=1_000,
    budgets=(4_000, 32_000),
    warmup=50,
    cached_calls=2_000,
    uncached_calls=500,
    append_calls=300,
    writers=50,
    append_seconds=15.0,
    single_seconds=5.0,
)
QUICK: Final = Sizes(
    messages=1_000,
    memory=100,
    budgets=(4_000, 32_000),
    warmup=10,
    cached_calls=200,
    uncached_calls=50,
    append_calls=20,
    writers=50,
    append_seconds=3.0,
    single_seconds=1.5,
)


# ---------------------------------------------------------------------------------
# Text: a work chat's vocabulary, deterministic.

NAMES: Final = (
    *("Alice", "Bashir", "Chen", "Dana", "Emeka", "Farah", "Goran", "Hana"),
    *("Ivan", "Julia", "Kenji", "Lena", "Marco", "Nadia", "Omar", "Priya"),
)
TEAMS: Final = ("platform", "billing", "growth", "design", "support", "research", "mobile")
TOPICS: Final[dict[str, tuple[str, ...]]] = {
    "infra": (
        "the database migration",
        "read replica lag",
        "the failover drill",
        "cache hit rate on the gateway",
        "the staging cluster",
        "rolling back the last deploy",
        "the deploy pipeline",
        "alert thresholds for the queue",
        "the incident review",
        "connection pool limits",
        "disk usage on the primary",
        "the nightly backup job",
    ),
    "launch": (
        "the public beta",
        "the pricing page",
        "release notes for the launch",
        "the waitlist invitations",
        "the press announcement",
        "feature flags for the rollout",
        "the onboarding checklist",
        "the customer webinar",
        "the landing page copy",
        "early access feedback",
    ),
    "budget": (
        "the quarterly budget",
        "vendor contract renewals",
        "the cloud spend forecast",
        "headcount for next quarter",
        "the travel reimbursement policy",
        "invoice approvals",
        "the annual licence audit",
        "cost per active customer",
        "the procurement request",
        "savings from reserved instances",
    ),
    "design": (
        "the signup flow mockups",
        "accessibility contrast issues",
        "the settings screen redesign",
        "icons for the sidebar",
        "usability interviews",
        "the empty state illustrations",
        "typography in the dashboard",
        "the mobile navigation",
        "dark mode colours",
        "the design system tokens",
    ),
    "support": (
        "the escalated refund ticket",
        "crash reports from the android app",
        "the support backlog",
        "response times on priority tickets",
        "the enterprise customer complaint",
        "triage rotation for the weekend",
        "known issues in the help centre",
        "the login bug on older browsers",
        "chat widget outages",
        "macros for common questions",
    ),
    "research": (
        "the evaluation dataset",
        "baseline results for the ranking model",
        "ablation runs on the retriever",
        "reviewer comments on the paper",
        "the benchmark harness",
        "accuracy on the held out split",
        "training costs for the larger model",
        "the annotation guidelines",
        "latency of the embedding service",
        "error analysis for long queries",
    ),
    "hiring": (
        "the backend engineer loop",
        "interview scorecards",
        "the offer for the staff candidate",
        "referrals from the meetup",
        "the recruiter sync",
        "take home exercise feedback",
        "onsite panel scheduling",
        "the hiring plan for support",
        "calibration of the interviewers",
        "the internship programme",
    ),
    "travel": (
        "flights to the Berlin offsite",
        "hotel blocks near the venue",
        "the conference talk proposal",
        "visa letters for the team",
        "the offsite agenda",
        "train tickets from the airport",
        "the speaker dinner",
        "booster sessions for new joiners",
        "the workshop materials",
        "budget for the team trip",
    ),
}
OPENERS: Final = (
    "I think",
    "Can you check",
    "We should look at",
    "Quick update on",
    "Still waiting on",
    "Let me know about",
    "After the review,",
    "Before we ship,",
    "Honestly,",
    "As discussed,",
    "Following up on",
    "Good news about",
    "One concern with",
    "Do we have numbers on",
)
LINKS: Final = (
    "depends on",
    "is blocked by",
    "should go before",
    "needs another pass after",
    "looks fine but",
    "is related to",
    "will take longer than",
    "affects",
    "came up again with",
    "is owned by the same people as",
)
CLOSERS: Final = (
    "so we can close it this week.",
    "and I will write it up.",
    "which nobody has picked up yet.",
    "but the numbers are still rough.",
    "so please add your notes to the doc.",
    "and the team agreed to revisit it on Monday.",
    "because the last attempt failed twice.",
    "if that works for everyone.",
    "and the owner is waiting on legal.",
    "so expect a short delay.",
)
ASSISTANT_OPENERS: Final = (
    "Here is a summary:",
    "Based on the thread,",
    "Sure.",
    "To recap,",
    "The short answer is that",
    "From what I can see,",
    "Good question:",
)
QUERY_TEMPLATES: Final = (
    "what did we decide about {a} and {b}",
    "who owns {a} now",
    "remind me of the status of {a} and how it affects {b}",
    "is {a} still blocked by {b}",
    "summarize the open questions on {a}",
    "any updates on {a} or {b} from {name}",
    "what does {name} prefer for {a}",
)


class Corpus:
    """Message, memory and query text from one seeded generator."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)  # noqa: S311 - benchmark text, reproducible
        self.phrases = [phrase for group in TOPICS.values() for phrase in group]
        self.topics = list(TOPICS)
        self.topic = self.topics[0]
        self.used_queries: set[str] = set()

    def _phrase(self) -> str:
        # A conversation sticks to a topic for a while, then drifts.
        if self.rng.random() < 0.05:
            self.topic = self.rng.choice(self.topics)
        pool = TOPICS[self.topic] if self.rng.random() < 0.7 else self.phrases
        return self.rng.choice(pool)

    def _sentence(self, opener: str) -> str:
        parts = [opener, self._phrase()]
        if self.rng.random() < 0.7:
            parts += [self.rng.choice(LINKS), self._phrase()]
        if self.rng.random() < 0.5:
            parts.append(f"for the {self.rng.choice(TEAMS)} team")
        parts.append(self.rng.choice(CLOSERS))
        return " ".join(parts)

    def _text(self, low: int, high: int, openers: Sequence[str]) -> str:
        words = self.rng.randint(low, high)
        text: list[str] = []
        while len(text) < words:
            text += self._sentence(self.rng.choice(openers)).split()
        cut = text[:words]
        if not cut[-1].endswith((".", "?", ":", ",")):
            cut[-1] += "."
        return " ".join(cut).replace(" ,", ",")

    def message(self, index: int) -> tuple[int, str]:
        """(role, text) of the index-th message: user on even, assistant on odd."""
        if index % 2 == 0:
            return pb.MESSAGE_ROLE_USER, self._text(20, 60, OPENERS)
        return pb.MESSAGE_ROLE_ASSISTANT, self._text(30, 80, ASSISTANT_OPENERS + OPENERS)

    def memory(self) -> tuple[int, str]:
        """(kind, content) of a memory item."""
        name, team = self.rng.choice(NAMES), self.rng.choice(TEAMS)
        a, b = self._phrase(), self._phrase()
        kind, first = self.rng.choice(
            [
                (pb.MEMORY_KIND_PREFERENCE, f"{name} prefers to discuss {a} before {b}."),
                (pb.MEMORY_KIND_FACT, f"The {team} team owns {a}; {name} is the contact."),
                (pb.MEMORY_KIND_FACT, f"Decision: {a} ships only after {b} is done."),
                (pb.MEMORY_KIND_NOTE, f"Open question from {name}: how {a} affects {b}."),
                (pb.MEMORY_KIND_NOTE, f"Reminder for the {team} team: revisit {a}."),
            ]
        )
        extra = self._text(4, 28, OPENERS)
        words = f"{first} {extra}".split()
        return kind, " ".join(words[: self.rng.randint(max(10, len(first.split())), 40)])

    def query(self) -> str:
        """A query never returned before (the query is part of the window cache key)."""
        while True:
            text = self.rng.choice(QUERY_TEMPLATES).format(
                a=self.rng.choice(self.phrases),
                b=self.rng.choice(self.phrases),
                name=self.rng.choice(NAMES),
            )
            if text not in self.used_queries:
                self.used_queries.add(text)
                return text


def _message(corpus: Corpus, index: int) -> pb.Message:
    role, text = corpus.message(index)
    author = "handlers/assistant" if role == pb.MESSAGE_ROLE_ASSISTANT else ""
    return pb.Message(role=role, author=author, parts=[pb.ContentPart(text=text)])  # type: ignore[arg-type]


#: One account drives every writer: its per-user write limit is lifted, as for many users.
APPEND_SETTINGS: dict[str, str] = {"SWITCHBOARD_CONTEXT_MAX_WRITES_PER_MINUTE": "10000000"}


# ---------------------------------------------------------------------------------
# Seeding through the domain objects, in this process.


class _NoBus:
    """Stands in for the event bus while seeding: nobody subscribes to the seed, and
    with no outbox the writes stage nothing."""

    outbox = None

    async def publish(self, event: events_pb2.Event) -> None:
        return None

    async def publish_staged(self, events: Sequence[events_pb2.Event]) -> None:
        return None


async def seed_in_process(
    database_url: str,
    account: Account,
    conversation: str,
    corpus: Corpus,
    *,
    messages: int,
    memory: int,
) -> dict[str, Any]:
    """Append ``messages`` and create ``memory`` items through the context domain and its stores."""
    from switchboard.context.build import context_service
    from switchboard.platform.cache import Cache
    from switchboard.platform.events.bus import EventBus
    from switchboard.platform.security.policy import AuthMethod, Principal, Scope
    from switchboard.platform.store.db import open_database
    from switchboard.platform.store.pagination import PageTokens
    from switchboard.settings import Settings

    settings = Settings.from_values(
        database_url=database_url,
        dev_mode=True,
        context_auto_prune_messages=0,
        # Seeding is one caller writing as fast as it can.
        context_max_writes_per_minute=10_000_000,
    )
    database = await open_database(database_url, timeout_s=30.0, migrate=False)
    counters = Cache("", timeout_s=1.0, lease_s=1.0)
    service = context_service(
        settings,
        database,
        cast(EventBus, _NoBus()),
        counters,
        PageTokens(settings.kernel.effective_secret_key()),
    )
    principal = Principal(
        user_id=account.user.removeprefix("users/"),
        auth_method=AuthMethod.PASSWORD,
        scopes=frozenset(Scope),
    )
    started = time.monotonic()
    try:
        for index in range(messages):
            await service.messages.append(
                principal,
                pb.AppendMessageRequest(parent=conversation, message=_message(corpus, index)),
            )
            if index and index % 2000 == 0:
                say(f"  seeded {index} messages ({time.monotonic() - started:.0f} s)")
        scopes = _memory_scopes(conversation, account.user, memory)
        pinned: dict[str, int] = {}
        for scope in scopes:
            kind, content = corpus.memory()
            pin = pinned.get(scope, 0) < PINNED_PER_SCOPE
            if pin:
                pinned[scope] = pinned.get(scope, 0) + 1
                content = " ".join(content.split()[:20])
            await service.memory.create(
                principal,
                pb.CreateMemoryItemRequest(
                    parent=scope,
                    memory_item=pb.MemoryItem(kind=kind, content=content, pinned=pin),  # type: ignore[arg-type]
                ),
            )
    finally:
        await service.close()
        await database.close()
    return {
        "seed_in_process_s": round(time.monotonic() - started, 1),
        "memory_by_scope": {
            "conversation": scopes.count(conversation),
            "workspace": scopes.count(f"workspaces/{WORKSPACE}"),
            "user": scopes.count(account.user),
        },
        "pinned": sum(pinned.values()),
    }


def _memory_scopes(conversation: str, user: str, count: int) -> list[str]:
    """40% conversation, 40% workspace, 20% user scope, interleaved."""
    cycle = [conversation, f"workspaces/{WORKSPACE}", conversation, f"workspaces/{WORKSPACE}", user]
    return [cycle[i % len(cycle)] for i in range(count)]


# ---------------------------------------------------------------------------------
# Scenario drivers (this process): servers, seeding, then the client process.


async def window_scenario(sizes: Sizes, directory: Path) -> dict[str, Any]:
    url = f"sqlite+aiosqlite:///{directory / 'window.db'}"
    corpus = Corpus(seed=5)
    settings = {"SWITCHBOARD_CONTEXT_AUTO_PRUNE_MESSAGES": "0"}
    with serve(directory, url, settings) as server:
        async with aio.insecure_channel(server.address) as channel:
            account = await register(channel, "window@example.com")
            workspace = await create_workspace(channel, account, WORKSPACE, "Bench")
            [conversation] = await create_conversations(
                channel, account, [workspace], "A long conversation"
            )
            say(f"window: seeding {sizes.messages} messages and {sizes.memory} memory items")
            seeded = await seed_in_process(
                url,
                account,
                conversation,
                corpus,
                messages=sizes.messages - RPC_TAIL,
                memory=sizes.memory,
            )
            stub = context_pb2_grpc.ContextServiceStub(channel)
            started = time.monotonic()
            for index in range(sizes.messages - RPC_TAIL, sizes.messages):
                await stub.AppendMessage(
                    pb.AppendMessageRequest(parent=conversation, message=_message(corpus, index)),
                    metadata=account.metadata,
                    timeout=30,
                )
            seeded["seed_rpc_s"] = round(time.monotonic() - started, 1)
            checked = await _check_seed(stub, account, conversation, sizes)
        say(f"window: seeded {json.dumps({**seeded, **checked})}")
        spec = {
            "mode": "window",
            "address": server.address,
            "token": account.token,
            "server_pid": server.pid,
            "conversation": conversation,
            "budgets": list(sizes.budgets),
            "warmup": sizes.warmup,
            "cached_calls": sizes.cached_calls,
            "uncached_calls": sizes.uncached_calls,
            "append_calls": sizes.append_calls,
            "next_message": sizes.messages,
        }
        figures = run_client(__file__, spec)
    return {**seeded, **checked, **figures}


async def _check_seed(
    stub: context_pb2_grpc.ContextServiceAsyncStub,
    account: Account,
    conversation: str,
    sizes: Sizes,
) -> dict[str, Any]:
    """Through the RPCs: every message live, no derived entity memory, search works."""
    got = (
        await stub.GetConversation(
            pb.GetConversationRequest(name=conversation), metadata=account.metadata, timeout=30
        )
    ).conversation
    if got.message_count != sizes.messages:
        raise RuntimeError(f"{conversation} holds {got.message_count} live messages")
    entities = await stub.ListMemoryItems(
        pb.ListMemoryItemsRequest(parent=conversation, kinds=[pb.MEMORY_KIND_ENTITY], page_size=1),
        metadata=account.metadata,
        timeout=30,
    )
    if entities.memory_items:
        raise RuntimeError("the seed text produced entity memory; the memory count is off")
    found = await stub.SearchMemoryItems(
        pb.SearchMemoryItemsRequest(
            parent=f"workspaces/{WORKSPACE}", query="the database migration", page_size=50
        ),
        metadata=account.metadata,
        timeout=30,
    )
    return {
        "live_messages": got.message_count,
        "search_sample_results": len(found.results),
    }


async def append_scenario(
    sizes: Sizes, directory: Path, backend: str, database_url: str
) -> dict[str, Any]:
    with serve(directory, database_url, APPEND_SETTINGS) as server:
        async with aio.insecure_channel(server.address) as channel:
            account = await register(channel, f"append-{backend}@example.com")
            workspace = await create_workspace(channel, account, WORKSPACE, "Bench")
            conversations = await create_conversations(
                channel, account, [workspace] * (sizes.writers + 1), "Writer {}"
            )
            cases = []
            for writers, seconds, names in (
                (1, sizes.single_seconds, conversations[:1]),
                (sizes.writers, sizes.append_seconds, conversations[1:]),
            ):
                say(f"append ({backend}): {writers} writer(s) for {seconds:g} s")
                figures = run_client(
                    __file__,
                    {
                        "mode": "append",
                        "address": server.address,
                        "token": account.token,
                        "server_pid": server.pid,
                        "conversations": names,
                        "seconds": seconds,
                    },
                )
                figures["lost"] = await _check_counts(channel, account, figures)
                cases.append(figures)
    return {"backend": backend, "cases": cases}


async def _check_counts(channel: aio.Channel, account: Account, figures: dict[str, Any]) -> int:
    """Conversations whose message_count differs from the appends that succeeded."""
    stub = context_pb2_grpc.ContextServiceStub(channel)
    wrong = 0
    for name, appended in figures["appended_by_conversation"].items():
        got = await stub.GetConversation(
            pb.GetConversationRequest(name=name), metadata=account.metadata, timeout=30
        )
        wrong += got.conversation.message_count != appended
    return wrong


def _sqlite_description(path: Path) -> str:
    """The SQLite library and the journal/sync modes a new connection to ``path`` gets."""
    import sqlite3

    with contextlib.closing(sqlite3.connect(path)) as connection:
        journal = connection.execute("PRAGMA journal_mode").fetchone()[0]
        sync = connection.execute("PRAGMA synchronous").fetchone()[0]
    names = {0: "OFF", 1: "NORMAL", 2: "FULL", 3: "EXTRA"}
    return (
        f"SQLite {sqlite3.sqlite_version}, the embedded default: a file on local disk, "
        f"journal_mode={journal}, synchronous={names.get(sync, sync)} (the library default)"
    )


@contextlib.asynccontextmanager
async def postgres() -> AsyncIterator[tuple[str | None, str]]:
    """(URL or None, description) of a throwaway PostgreSQL with durable settings."""
    from sqlalchemy.ext.asyncio import create_async_engine
    from sqlalchemy.pool import NullPool

    from tests.infra.postgres import PostgresUnavailable, running_postgres

    try:
        with running_postgres() as server:
            url = server.url("postgres")
            engine = create_async_engine(url, isolation_level="AUTOCOMMIT", poolclass=NullPool)
            try:
                async with engine.connect() as connection:
                    # The test cluster trades durability for speed; a benchmark of
                    # writes must pay what a real deployment pays.
                    for setting in ("fsync", "full_page_writes", "synchronous_commit"):
                        await connection.exec_driver_sql(f"ALTER SYSTEM SET {setting} = on")
                    await connection.exec_driver_sql("SELECT pg_reload_conf()")
                    await asyncio.sleep(0.5)  # the postmaster re-reads its configuration
                    version = (await connection.exec_driver_sql("SHOW server_version")).scalar()
                    shown = {
                        setting: (await connection.exec_driver_sql(f"SHOW {setting}")).scalar()
                        for setting in ("fsync", "synchronous_commit", "full_page_writes")
                    }
            finally:
                await engine.dispose()
            description = f"PostgreSQL {version} on loopback, " + ", ".join(
                f"{k}={v}" for k, v in shown.items()
            )
            yield url, description
    except PostgresUnavailable as exc:
        yield None, f"PostgreSQL unavailable: {str(exc).splitlines()[0]}"


# ---------------------------------------------------------------------------------
# Client process: the measured calls.


class WindowStats:
    """What the windows held (parsed after timing, outside the measured call)."""

    def __init__(self) -> None:
        self.parsed = 0
        self.messages = 0
        self.memory = 0
        self.pinned = 0
        self.relevant = 0
        self.tokens = 0
        self.omitted = 0
        self.bytes = 0
        self.versions: set[int] = set()

    def add(self, payload: bytes, budget: int) -> None:
        window = pb.GetContextWindowResponse.FromString(payload).window
        if window.total_tokens > budget:
            raise RuntimeError(f"a window of {window.total_tokens} tokens exceeds {budget}")
        self.parsed += 1
        self.bytes += len(payload)
        self.tokens += window.total_tokens
        self.omitted += window.omitted_messages
        self.versions.add(window.conversation_version)
        for item in window.included:
            if item.HasField("message"):
                self.messages += 1
            else:
                self.memory += 1
            self.pinned += item.reason == pb.CONTEXT_ITEM_REASON_PINNED
            self.relevant += item.reason == pb.CONTEXT_ITEM_REASON_RELEVANT

    def figures(self) -> dict[str, float]:
        n = max(self.parsed, 1)
        return {
            "response_kib": round(self.bytes / n / 1024, 1),
            "included_messages": round(self.messages / n, 1),
            "included_memory": round(self.memory / n, 1),
            "included_pinned": round(self.pinned / n, 1),
            "included_relevant": round(self.relevant / n, 1),
            "total_tokens": round(self.tokens / n),
            "omitted_messages": round(self.omitted / n),
            "versions_seen": len(self.versions),
        }


class _Phase:
    """Latencies of one case plus the CPU used meanwhile."""

    def __init__(self, server_pid: int) -> None:
        self.latencies: list[float] = []
        self.stats = WindowStats()
        self.cpu = CpuMeter(server_pid)

    def figures(self) -> dict[str, Any]:
        cpu = self.cpu.figures(len(self.latencies))
        return {
            **summary(self.latencies),
            **cpu,
            "calls_per_s": round(len(self.latencies) / cpu["wall_s"], 1),
            **self.stats.figures(),
        }


class WindowClient:
    """The GetContextWindow cases, one call at a time on one channel."""

    def __init__(self, spec: dict[str, Any], channel: aio.Channel) -> None:
        self.spec = spec
        self.metadata = bearer(spec["token"])
        self.conversation: str = spec["conversation"]
        self.pid: int = spec["server_pid"]
        self.corpus = Corpus(seed=7)  # a different stream of text than the seed's
        self.next_message: int = spec["next_message"]
        # Raw bytes back: the client's own parsing is not the server's latency;
        # responses are parsed and checked after their call is timed.
        self.call = channel.unary_unary(
            WINDOW_METHOD,
            request_serializer=pb.GetContextWindowRequest.SerializeToString,
            response_deserializer=None,
        )
        self.stub = context_pb2_grpc.ContextServiceStub(channel)

    async def window(self, budget: int, query: str) -> tuple[float, bytes]:
        request = pb.GetContextWindowRequest(
            conversation=self.conversation, token_budget=budget, query=query
        )
        start = time.perf_counter()
        payload = await self.call(request, metadata=self.metadata, timeout=60)
        return time.perf_counter() - start, cast(bytes, payload)

    async def cached(self, budget: int) -> dict[str, Any]:
        """The same request again and again (default query: the latest user message)."""
        phase = _Phase(self.pid)
        for _ in range(self.spec["warmup"]):
            await self.window(budget, "")
        phase.cpu.start()
        for i in range(self.spec["cached_calls"]):
            elapsed, payload = await self.window(budget, "")
            phase.latencies.append(elapsed)
            if i % 20 == 0:
                phase.stats.add(payload, budget)
        phase.cpu.stop()
        if len(phase.stats.versions) != 1:
            raise RuntimeError("the conversation changed during the cached calls")
        return phase.figures()

    async def by_query(self, budget: int) -> dict[str, Any]:
        """A query never sent before on every call (the query is in the cache key)."""
        phase = _Phase(self.pid)
        for _ in range(max(5, self.spec["warmup"] // 5)):
            await self.window(budget, self.corpus.query())
        phase.cpu.start()
        for _ in range(self.spec["uncached_calls"]):
            elapsed, payload = await self.window(budget, self.corpus.query())
            phase.latencies.append(elapsed)
            phase.stats.add(payload, budget)
        phase.cpu.stop()
        return phase.figures()

    async def after_append(self, budget: int) -> dict[str, Any]:
        """A message appended (not timed) before each call: a new conversation version."""
        phase = _Phase(self.pid)
        phase.cpu.start()
        for _ in range(self.spec["append_calls"]):
            message = _message(self.corpus, self.next_message)
            self.next_message += 1
            await self.stub.AppendMessage(
                pb.AppendMessageRequest(parent=self.conversation, message=message),
                metadata=self.metadata,
                timeout=30,
            )
            elapsed, payload = await self.window(budget, "")
            phase.latencies.append(elapsed)
            phase.stats.add(payload, budget)
        phase.cpu.stop()
        figures = phase.figures()
        if figures["versions_seen"] != self.spec["append_calls"]:
            raise RuntimeError("a window after an append did not see the new version")
        return figures


async def client_window(spec: dict[str, Any]) -> dict[str, Any]:
    results: dict[str, Any] = {}
    async with aio.insecure_channel(spec["address"]) as channel:
        client = WindowClient(spec, channel)
        quiet_gc()
        cases: list[tuple[str, str, Callable[[int], Awaitable[dict[str, Any]]]]] = [
            ("cached", "cached", client.cached),
            ("query", "new query per call", client.by_query),
            ("append", "append before each call", client.after_append),
        ]
        for key, label, run in cases:
            for budget in spec["budgets"]:
                figures = results[f"{key}-{budget}"] = await run(budget)
                say(f"  {label}, budget {budget}: {_brief(figures)}")
    return results


def _brief(figures: dict[str, Any]) -> str:
    return (
        f"p50 {figures['p50_ms']:.2f} ms, p99 {figures['p99_ms']:.2f} ms, "
        f"max {figures['max_ms']:.2f} ms over {figures['calls']} calls"
    )


class AppendLoad:
    """Writers appending in a closed loop, one per conversation, from one process."""

    WARMUP: Final = 2

    def __init__(self, spec: dict[str, Any], channels: Sequence[aio.Channel]) -> None:
        self.spec = spec
        self.metadata = bearer(spec["token"])
        self.names: list[str] = spec["conversations"]
        self.stubs = [context_pb2_grpc.ContextServiceStub(c) for c in channels]
        corpus = Corpus(seed=11)
        self.texts = [_message(corpus, i) for i in range(2000)]
        self.latencies: list[float] = []
        self.errors: dict[str, int] = {}
        self.appended: dict[str, int] = dict.fromkeys(self.names, 0)
        self.out_of_order = 0
        self.warm = 0
        self.all_warm = asyncio.Event()
        self.go = asyncio.Event()
        self.deadline = 0.0
        self.ends: list[float] = []

    async def _append(self, writer: int, name: str, n: int) -> tuple[float, int]:
        message = self.texts[(writer * 37 + n) % len(self.texts)]
        begun = time.perf_counter()
        response = await self.stubs[writer % len(self.stubs)].AppendMessage(
            pb.AppendMessageRequest(parent=name, message=message),
            metadata=self.metadata,
            timeout=60,
        )
        return time.perf_counter() - begun, response.message.sequence

    async def writer(self, writer: int, name: str) -> None:
        last = 0
        for n in range(self.WARMUP):  # connection, caches
            _, last = await self._append(writer, name, n)
            self.appended[name] += 1
        self.warm += 1
        if self.warm == len(self.names):
            self.all_warm.set()
        await self.go.wait()
        n = self.WARMUP
        while time.perf_counter() < self.deadline:
            n += 1
            try:
                elapsed, sequence = await self._append(writer, name, n)
            except aio.AioRpcError as err:
                self.errors[err.code().name] = self.errors.get(err.code().name, 0) + 1
                continue
            self.latencies.append(elapsed)
            self.appended[name] += 1
            self.out_of_order += sequence <= last
            last = sequence
        self.ends.append(time.perf_counter())

    async def run(self) -> dict[str, Any]:
        tasks = [asyncio.create_task(self.writer(i, name)) for i, name in enumerate(self.names)]
        await self.all_warm.wait()  # every writer warmed up before the clock starts
        quiet_gc()
        cpu = CpuMeter(self.spec["server_pid"])
        cpu.start()
        began = time.perf_counter()
        self.deadline = began + self.spec["seconds"]
        self.go.set()
        await asyncio.gather(*tasks)
        cpu.stop()
        wall = max(self.ends, default=time.perf_counter()) - began
        return {
            "writers": len(self.names),
            "seconds": round(wall, 2),
            **summary(self.latencies),
            "messages_per_s": round(len(self.latencies) / wall, 1),
            "errors": self.errors,
            "out_of_order": self.out_of_order,
            **cpu.figures(len(self.latencies)),
            "appended_by_conversation": self.appended,
        }


async def client_append(spec: dict[str, Any]) -> dict[str, Any]:
    channels = [
        aio.insecure_channel(spec["address"]) for _ in range(min(4, len(spec["conversations"])))
    ]
    try:
        return await AppendLoad(spec, channels).run()
    finally:
        for channel in channels:
            await channel.close(None)


# ---------------------------------------------------------------------------------
# The report.


def render(results: dict[str, Any], command: str, sizes: Sizes) -> str:
    lines = [
        SECTION,
        "",
        *provenance(command),
        "- shape: a real `switchboard serve --dev` process (default settings, in-memory "
        "window cache, JSON access log to a file) and the measuring client "
        "(`bench/context.py client`, grpc.aio, one channel) in separate processes on "
        "loopback, sharing the cores. Server CPU is the serve process's user+system time "
        "over the measured calls (/proc), divided by the calls; the CPU columns are cores "
        "used meanwhile by the server, the client, and everything else on the machine "
        "(other jobs share it: latency tails are only meaningful when that is near 0).",
        host_speed_line(
            results["host"],
            "; aiosqlite makes one for every SQLite call. This shared virtual machine "
            "drifts: while this benchmark was written, the cost of a database read on the "
            "cache-hit path varied about 2x within an hour, with the loop unchanged; compare "
            "runs on these two scales.",
        ),
        "",
    ]
    if "window" in results:
        lines += _window_section(results["window"], sizes)
    if "append" in results:
        lines += _append_section(results["append"], sizes)
    return "\n".join(lines)


def _cores(f: dict[str, Any]) -> str:
    return f"{f['server_cores']:.2f} / {f['client_cores']:.2f} / {f['other_cores']:.2f}"


def _window_section(r: dict[str, Any], sizes: Sizes) -> list[str]:
    scopes = r["memory_by_scope"]
    rows = []
    cases = (
        ("cached", "cached: the same request repeated", CACHED_P99_BUDGET_MS),
        ("query", "uncached: a new `query` on every call", UNCACHED_P99_BUDGET_MS),
        (
            "append",
            "uncached: AppendMessage (not timed) before every call, default query",
            UNCACHED_P99_BUDGET_MS,
        ),
    )
    for budget in sizes.budgets:
        for key, label, limit in cases:
            f = r[f"{key}-{budget}"]
            rows.append(
                f"| {budget:,} | {label} | {f['calls']} | {f['p50_ms']:.2f} "
                f"| **{f['p99_ms']:.2f}** | {f['max_ms']:.2f} | < {limit:g} "
                f"| {verdict(f['p99_ms'] < limit)} | {f['calls_per_s']:.0f} "
                f"| {f['server_cpu_ms_per_call']:.2f} | {_cores(f)} | {f['response_kib']:.1f} "
                f"| {f['included_messages']:.0f} / {f['included_memory']:.1f} "
                f"({f['included_pinned']:.0f} pinned, {f['included_relevant']:.1f} relevant) "
                f"| {f['total_tokens']} |"
            )
    return [
        f"### GetContextWindow: {r['live_messages']:,} live messages, "
        f"{sizes.memory:,} memory items",
        "",
        f"One conversation of {r['live_messages']:,} live messages (user and assistant "
        f"alternating, 20-80 words; auto pruning off) and {sizes.memory:,} memory items "
        f"({scopes['conversation']} in the conversation, {scopes['workspace']} in the "
        f"workspace, {scopes['user']} in the caller's user scope; {r['pinned']} pinned, "
        f"{PINNED_PER_SCOPE} per scope), on the embedded SQLite default. Seeded in "
        f"{r['seed_in_process_s']:.0f} s through the context domain and its stores in "
        f"the benchmark process, then the last {RPC_TAIL} messages through AppendMessage "
        f"({r['seed_rpc_s']:.1f} s). One caller, one call at a time, after "
        f"{sizes.warmup} warm-up calls; latency is the client's, request sent to "
        "response bytes received (the client parses and checks every uncached response, "
        "and every 20th cached one, after timing it). Uncached calls are made uncached "
        "either by a `query` never sent before (the query is part of the cache key; "
        "realistic questions over the same vocabulary, so full-text search ranks many "
        "candidates) or by appending a message before each call (a new conversation "
        "version; the query then defaults to the latest user message).",
        "",
        "| budget (tokens) | case | calls | p50 ms | p99 ms | max ms | p99 budget ms "
        "| budget | calls/s | server CPU ms/call | CPU server / client / others (cores) "
        "| response KiB | included: messages / memory items | tokens used |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        "Server CPU per call of the rows with an append includes that append. Included "
        "memory items: mean per window, by reason; relevant items are capped by "
        "`context_relevant_limit` (10).",
        "",
    ]


def _append_section(runs: list[dict[str, Any]], sizes: Sizes) -> list[str]:
    rows = []
    notes = []
    for run in runs:
        if run.get("skipped"):
            notes.append(f"- {run['backend']}: not run ({run['skipped']})")
            continue
        if run.get("description"):
            notes.append(f"- {run['backend']}: {run['description']}")
        for f in run["cases"]:
            rows.append(
                f"| {run['backend']} | {f['writers']} | {f['calls']} | {f['seconds']:.1f} "
                f"| **{f['messages_per_s']:.0f}** | {f['p50_ms']:.1f} | {f['p99_ms']:.1f} "
                f"| {f['max_ms']:.1f} | {errors_text(f['errors'])} | {_cores(f)} "
                f"| {f['out_of_order'] + f['lost']} |"
            )
    return [
        "### AppendMessage throughput",
        "",
        f"Each writer appends to its own conversation (one writer per conversation) in a "
        f"closed loop: 1 writer for {sizes.single_seconds:g} s, then {sizes.writers} "
        f"writers for {sizes.append_seconds:g} s, on a fresh server per backend with "
        "default settings except the per-user write limit, lifted because one account "
        "drives every writer (each append also stores a MessageCreated event in the "
        "embedded event log). Messages of 20-80 words; every writer does 2 warm-up "
        "appends first. messages/s: appends that succeeded over the measured time.",
        *(["", *notes] if notes else []),
        "",
        "| backend | writers | appended | s | messages/s | p50 ms | p99 ms | max ms "
        "| errors | CPU server / client / others (cores) | lost or out of order |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        "lost or out of order: appended sequence numbers that did not increase, plus "
        "conversations whose `message_count` afterwards differs from the appends that "
        "succeeded.",
        "",
    ]


async def drive(args: argparse.Namespace) -> int:
    sizes = QUICK if args.quick else FULL
    wanted = set(args.only or ("window", "append"))
    results: dict[str, Any] = {}
    async with session(results, "switchboard-ctx-bench-") as directory:
        if "window" in wanted:
            results["window"] = await window_scenario(sizes, directory)
        if "append" in wanted:
            url = f"sqlite+aiosqlite:///{directory / 'append.db'}"
            run = await append_scenario(sizes, directory, "SQLite", url)
            runs = [{**run, "description": _sqlite_description(directory / "append.db")}]
            if not args.no_postgres:
                async with postgres() as (pg_url, description):
                    if pg_url is None:
                        say(description)
                        runs.append({"backend": "PostgreSQL", "skipped": description})
                    else:
                        run = await append_scenario(sizes, directory, "PostgreSQL", pg_url)
                        runs.append({**run, "description": description})
            results["append"] = runs
    text = render(results, command_line("bench/context.py"), sizes)
    report(results, text, args)
    return 0


def options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-postgres", action="store_true", help="AppendMessage on SQLite only")
    parser.add_argument(
        "--only", nargs="+", choices=["window", "append"], help="run only these scenarios"
    )


def main() -> int:
    return section_main(
        __doc__,
        drive,
        quick="small sizes, short phases",
        options=options,
        roles={"client": clients({"window": client_window, "append": client_append})},
    )


if __name__ == "__main__":
    raise SystemExit(main())
