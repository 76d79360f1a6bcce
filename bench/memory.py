"""Memory that forms itself (issue 82): what forming costs, how far behind a run it
lands, whether it delays answers, and whether the window then holds the current fact.

    python bench/memory.py                 the full run (about 2 minutes on 2 cores)
    python bench/memory.py --quick         fewer people and exchanges (under a minute)
    python bench/memory.py --write         ... and put the report into BENCHMARKS.md
    python bench/memory.py --json          one JSON line, figures and report (bench/run.py)
    python bench/memory.py --only quality  some parts: quality lag first-token
    python bench/memory.py --model-url URL [--api-key K] [--model M]
                                           the same bench against any OpenAI-compatible
                                           endpoint instead of the scripted model

The model: ``bench/memory_model.py`` in its own process. By default it is a SCRIPTED
model (rules over the text, not a language model; its docstring has the rules): the runs'
answers are a fixed sentence, forming's two structured-output calls are answered by
first-person statement rules (candidates) and by matching the subjects of the similar
memories the prompt lists (decisions). With ``--model-url`` it passes every request on
to that endpoint and only counts (``usage``, answers that are not JSON), so the server
talks to the real model through it; ``--model`` is then the model's name.

Every part runs on a fresh ``switchboard serve --dev`` (embedded SQLite, the in-memory
event log; no embeddings endpoint, so search ranks by full text), the ``llm`` handler at
the model, the rate limits lifted. Runs are sent to an assistant with a ``MemoryPolicy``
(``MEMORY_FORMING_MODE_USER``, forming after each run), or, where a part compares, to a
second one in the same workspace whose policy is OFF. Times come from the server's own
events (``EventService.Subscribe``): the run's RUN_UPDATED with its SUCCEEDED state, and
each MEMORY_DECIDED of that run.

``quality``: the multi-session set (``people``, deterministic from ``--seed``). Each
person is an account with a workspace; three sessions (each a conversation) state facts
(where they live, where they work, favourites, a pet, a language, a trip), change some
("I moved to Lyon"), retract some ("I no longer have a dog; ..."), between small talk and
distractors ("My sister lives in Porto", "I would love to visit Oslo one day"); the next
session waits until the last one's forming settled (people talk days apart). Then, in a
fourth conversation, one question per fact ("Where do I live?"), each read three ways:

- forming: ``GetContextWindow`` (the question as its query): its memory items and messages;
- the window's message retrieval: the same window with ``RetrievalOptions`` (top_k 5,
  1,000 tokens, filter ``source = message``), its memory items left out: the window a
  run gets with forming off. The window's retrieval searches its own conversation, so it
  cannot reach earlier sessions: the baseline as the product has it;
- message search over the workspace: ``SearchContext`` on the workspace, filter
  ``source = message``, 5 results: the best plain message retrieval can do across
  conversations (no run reads this today: the ``search_memory`` tool too searches the
  run's own conversation).

A question about a fact that stands or changed counts when its current value is in what
was read; also counted: when a superseded value is too. A question about a retracted
fact counts when the retracted value is not shown as current: not in a memory item, and
in no message unless the retraction is there too.

``lag``: one conversation sending exchanges one at a time (the next after the last one's
decision: an idle worker), then ``conversations`` at once, each sending its exchanges back
to back (the worker behind). Each exchange states one new fact. Lag: the run's
SUCCEEDED event to the last MEMORY_DECIDED of that run (p50/p95). Cost: the same load
first on the assistant that does not form, then on the one that does; the server
process's CPU (from /proc) from the first send until every decision is stored (or every
run ended), less what it uses idle over as long; forming's share is the difference, per
exchange. Tokens: what the model counted for the forming calls, per exchange.

``first-token``: ``pairs`` pairs of runs in the same server, each loop alternating a run
on the forming assistant and one on the other (each message a new fact; each assistant in
a conversation of its own), a few loops at once; from SendMessage to the first text of
the answer. Forming runs after each run; this asks whether it delays any answer.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import functools
import json
import math
import random
import re
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from grpc import aio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository: bench.*, tests.*

from bench.fixtures import Account, create_conversations, create_workspace, register
from bench.harness import (
    ROOT,
    CpuMeter,
    command_line,
    dedicated_channel,
    errors_text,
    gather_limited,
    host_speed_line,
    percentile,
    process_cpu_s,
    provenance,
    python,
    report,
    say,
    section_main,
    serve,
    session,
    settings_text,
    spawn,
    stop,
    verdict,
    wait_quiet,
)
from bench.memory_model import facts_said
from switchboard.api.context.v1 import context_pb2 as cpb
from switchboard.api.context.v1 import context_pb2_grpc
from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.api.dispatcher.v1 import dispatcher_pb2_grpc
from switchboard.api.events.v1 import events_pb2 as epb
from switchboard.api.events.v1 import events_pb2_grpc
from switchboard.dispatcher.runs.core.store import TERMINAL

SECTION: Final = "## Memory forming"
MODEL: Final = "bench-model"
PARTS: Final = ("quality", "lag", "first-token")
SERVER_SETTINGS: Final[dict[str, str]] = {
    "SWITCHBOARD_EGRESS_ALLOW_LOOPBACK": "true",
    "SWITCHBOARD_LLM_MAX_RETRIES": "0",
    "SWITCHBOARD_LLM_MAX_CONNECTIONS": "1000",
    "SWITCHBOARD_DISPATCHER_MAX_RUNNING": "1000",
    "SWITCHBOARD_DISPATCHER_MAX_RUNNING_PER_WORKSPACE": "1000",
    "SWITCHBOARD_CONTEXT_MAX_WRITES_PER_MINUTE": "10000000",
    "SWITCHBOARD_CONTEXT_MAX_MEMORY_ITEMS": "1000000",
    "SWITCHBOARD_DISPATCHER_MAX_MESSAGES_PER_MINUTE_PER_USER": "10000000",
    "SWITCHBOARD_DISPATCHER_MAX_MESSAGES_PER_MINUTE_PER_WORKSPACE": "10000000",
}
#: The window every question is read with, and the retrieval the baseline adds.
WINDOW_TOKENS: Final = 8000
TOP_K: Final = 5
RETRIEVAL_TOKENS: Final = 1000
#: Conversations per workspace in the lag part (one Subscribe takes 16 scopes).
PER_WORKSPACE: Final = 10
#: Conversations sharing one connection (each has a SendMessage or a WatchRun open).
CONVERSATIONS_PER_CHANNEL: Final = 25
FORMING, PLAIN = "former", "plain"
#: The goal: first token with forming on within noise of off (p50 ratio at most this).
FIRST_TOKEN_RATIO_GOAL: Final = 1.10
#: Forming has stalled when no decision came for this long while some are awaited.
STALL_S: Final = 30.0
#: Without a scripted model to say which exchanges will be decided, forming has settled
#: once no decision came for this long after the last run ended.
QUIET_S: Final = 15.0


@dataclass(frozen=True)
class Sizes:
    people: int
    pairs: int
    loops: int
    lag_one: int
    conversations: int
    per_conversation: int
    settle_s: float
    quiet_wait_s: float


FULL: Final = Sizes(
    people=40,
    pairs=300,
    loops=4,
    lag_one=30,
    conversations=100,
    per_conversation=3,
    settle_s=300.0,
    quiet_wait_s=5.0,
)
QUICK: Final = Sizes(
    people=8,
    pairs=100,
    loops=4,
    lag_one=10,
    conversations=100,
    per_conversation=1,
    settle_s=180.0,
    quiet_wait_s=2.0,
)


# ---------------------------------------------------------------------------------
# The multi-session set.

CITIES: Final = (
    "Paris", "Berlin", "Lisbon", "Madrid", "Vienna", "Prague", "Dublin", "Oslo", "Lyon",
    "Porto", "Krakow", "Turin", "Ghent", "Bergen", "Seville", "Munich", "Zurich", "Leeds",
)  # fmt: skip
COMPANIES: Final = (
    "Acme", "Globex", "Initech", "Umbrella", "Hooli", "Vandelay", "Stark", "Wayne",
    "Tyrell", "Cyberdyne", "Soylent", "Gringotts", "Monarch", "Aperture",
)  # fmt: skip
FAVOURITES: Final = {
    "colour": ("green", "blue", "red", "yellow", "purple", "orange", "teal"),
    "food": ("ramen", "paella", "lasagne", "curry", "sushi", "falafel", "tacos"),
    "sport": ("tennis", "rowing", "cycling", "football", "climbing", "swimming"),
    "band": ("Radiohead", "Abba", "Queen", "Blur", "Portishead", "Oasis"),
}
PETS: Final = {
    "dog": ("Rex", "Bella", "Max", "Luna", "Bruno"),
    "cat": ("Tom", "Misty", "Felix", "Nala", "Olive"),
}
LANGUAGES: Final = ("Spanish", "Japanese", "German", "Italian", "Portuguese", "Korean")
DATES: Final = ("3 May", "12 June", "21 July", "9 August", "14 September", "2 October")
SMALL_TALK: Final = (
    "Can you recommend a good book for the weekend?",
    "What is a quick recipe for dinner tonight?",
    "How do I politely decline a meeting?",
    "Tell me a fun fact about octopuses.",
    "What should I pack for a rainy day out?",
    "Any tips for sleeping better?",
)
DISTRACTORS: Final = (
    "My sister lives in {city}.",
    "My friend works at {company}.",
    "I would love to visit {city} one day.",
    "My neighbour has a {pet} called {name}.",
    "My colleague is learning {language}.",
)


@dataclass(frozen=True)
class Question:
    """One question about one fact, and what answers it."""

    text: str
    #: stated (never changed), changed, or retracted.
    fate: str
    #: The current value ("" when retracted).
    current: str
    #: Values no longer true.
    stale: tuple[str, ...]
    #: The sentence that retracted it ("" unless retracted).
    retraction: str = ""


@dataclass(frozen=True)
class Person:
    index: int
    #: Each session's user messages, in order.
    sessions: tuple[tuple[str, ...], ...]
    questions: tuple[Question, ...]


@dataclass
class _Fact:
    """A fact as the generator plans it: how each session speaks of it."""

    subject: str
    question: str
    values: list[str]
    said: list[tuple[int, str]] = field(default_factory=list)
    retraction: str = ""


def person(seed: int, index: int) -> Person:  # noqa: PLR0912, PLR0915 - one plan, read top down
    """Person ``index`` of the set made from ``seed``: the same every time."""
    rng = random.Random(seed * 100_003 + index)  # noqa: S311 - a reproducible data set
    facts: list[_Fact] = []

    def plan(subject: str, question: str, values: Sequence[str], say_first: str) -> _Fact:
        fact = _Fact(subject, question, [values[0]])
        fact.said.append((0, say_first.format(v=values[0])))
        facts.append(fact)
        return fact

    cities = rng.sample(CITIES, 4)
    home = plan("home", "Where do I live?", cities, "I live in {v}.")
    companies = rng.sample(COMPANIES, 3)
    work = plan("employer", "Where do I work?", companies, "I work at {v}.")
    topics = rng.sample(sorted(FAVOURITES), 2)
    pools = {topic: rng.sample(FAVOURITES[topic], 2) for topic in topics}
    favourites = [
        plan(
            f"favourite {topic}",
            f"What is my favourite {topic}?",
            pools[topic],
            f"My favourite {topic} is {{v}}.",
        )
        for topic in topics
    ]
    pet = rng.choice(sorted(PETS))
    pet_fact = plan(
        f"{pet}", f"Do I have a {pet}?", rng.sample(PETS[pet], 1), f"I have a {pet} called {{v}}."
    )
    languages = rng.sample(LANGUAGES, 2)
    learning = plan("language", "Which language am I learning?", languages, "I am learning {v}.")
    trip_city = cities[3]
    dates = rng.sample(DATES, 2)
    trip = plan(
        f"trip {trip_city}",
        f"When is my trip to {trip_city}?",
        dates,
        f"My trip to {trip_city} is on {{v}}.",
    )
    # Fates: the generator changes or retracts some facts in sessions 2 and 3.
    if rng.random() < 0.7:
        moved = cities[1]
        home.said.append((1, f"I moved to {moved} last month, I love it here."))
        home.values.append(moved)
        if rng.random() < 0.4:
            home.said.append((2, f"I moved to {cities[2]}, so I live there now."))
            home.values.append(cities[2])
    if rng.random() < 0.35:
        work.said.append((2, f"I no longer work at {companies[0]}; I am taking a break."))
        work.retraction = f"I no longer work at {companies[0]}"
    elif rng.random() < 0.6:
        work.said.append((1, f"I now work at {companies[1]}, I started on Monday."))
        work.values.append(companies[1])
    for fact, topic in zip(favourites, topics, strict=True):
        if rng.random() < 0.5:
            later = pools[topic][1]
            fact.said.append((rng.choice((1, 2)), f"My favourite {topic} is now {later}."))
            fact.values.append(later)
    if rng.random() < 0.4:
        name = pet_fact.values[0]
        pet_fact.said.append((2, f"I no longer have a {pet}; {name} lives with my parents now."))
        pet_fact.retraction = f"I no longer have a {pet}"
    if rng.random() < 0.3:
        learning.said.append((2, f"I stopped learning {languages[0]}, it took too much time."))
        learning.retraction = f"I stopped learning {languages[0]}"
    elif rng.random() < 0.5:
        learning.said.append((1, f"I am learning {languages[1]} now instead."))
        learning.values.append(languages[1])
    if rng.random() < 0.25:
        trip.said.append((2, f"I cancelled my trip to {trip_city}."))
        trip.retraction = f"I cancelled my trip to {trip_city}"
    elif rng.random() < 0.5:
        trip.said.append((1, f"My trip to {trip_city} is now on {dates[1]}."))
        trip.values.append(dates[1])
    sessions: list[list[str]] = [[], [], []]
    for fact in facts:
        for session_no, text in fact.said:
            sessions[session_no].append(text)
    for session_no, messages in enumerate(sessions):
        rng.shuffle(messages)
        extra = [
            rng.choice(SMALL_TALK),
            rng.choice(DISTRACTORS).format(
                city=rng.choice(CITIES),
                company=rng.choice(COMPANIES),
                pet=pet,
                name=rng.choice(PETS[pet]),
                language=rng.choice(LANGUAGES),
            ),
        ]
        for text in extra:
            messages.insert(rng.randrange(len(messages) + 1), text)
        sessions[session_no] = messages
    questions = []
    for fact in facts:
        if fact.retraction:
            questions.append(
                Question(fact.question, "retracted", "", tuple(fact.values), fact.retraction)
            )
        else:
            fate = "changed" if len(fact.values) > 1 else "stated"
            questions.append(
                Question(fact.question, fate, fact.values[-1], tuple(fact.values[:-1]))
            )
    return Person(index, tuple(tuple(s) for s in sessions), tuple(questions))


def people(seed: int, count: int) -> list[Person]:
    return [person(seed, index) for index in range(count)]


# ---------------------------------------------------------------------------------
# Scoring a read.


@dataclass(frozen=True)
class Read:
    """What one way of reading gave for a question: texts of memory items and of messages."""

    memories: tuple[str, ...]
    messages: tuple[str, ...]


def _mentions(texts: Sequence[str], value: str) -> bool:
    pattern = re.compile(rf"\b{re.escape(value)}\b", re.IGNORECASE)
    return any(pattern.search(text) for text in texts)


def score(question: Question, read: Read) -> dict[str, bool]:
    """``right``: the current fact is there (stands, changed) or the retracted one is not
    shown as current; ``stale``: a superseded value is there too (stands, changed)."""
    every = (*read.memories, *read.messages)
    if question.fate == "retracted":
        in_memory = any(_mentions(read.memories, value) for value in question.stale)
        in_messages = any(_mentions(read.messages, value) for value in question.stale)
        retracted = any(question.retraction.lower() in text.lower() for text in read.messages)
        return {"right": not in_memory and (not in_messages or retracted), "stale": False}
    return {
        "right": _mentions(every, question.current),
        "stale": any(_mentions(every, value) for value in question.stale),
    }


def tally(scored: Sequence[tuple[Question, dict[str, bool]]]) -> dict[str, Any]:
    """Shares by fate, and over the facts that stand or changed."""
    by_fate: dict[str, list[dict[str, bool]]] = defaultdict(list)
    for question, marks in scored:
        by_fate[question.fate].append(marks)
    out: dict[str, Any] = {}
    for fate, listed in sorted(by_fate.items()):
        out[fate] = {
            "questions": len(listed),
            "right": sum(m["right"] for m in listed),
            "stale": sum(m["stale"] for m in listed),
        }
    current = [m for q, m in scored if q.fate != "retracted"]
    out["current"] = {
        "questions": len(current),
        "right": sum(m["right"] for m in current),
        "stale": sum(m["stale"] for m in current),
    }
    return out


# ---------------------------------------------------------------------------------
# The model process.


@dataclass
class Model:
    process: Any
    url: str
    name: str
    upstream: str

    def stats(self, *, reset: bool = False) -> dict[str, Any]:
        assert self.process.stdin is not None
        assert self.process.stdout is not None
        self.process.stdin.write(json.dumps({"reset": reset, "stats": True}) + "\n")
        self.process.stdin.flush()
        answer: dict[str, Any] = json.loads(self.process.stdout.readline())
        return answer


@contextlib.contextmanager
def model_server(args: argparse.Namespace) -> Iterator[Model]:
    argv = python(str(ROOT / "bench" / "memory_model.py"))
    if args.model_url:
        argv += ["--upstream", args.model_url]
        if args.api_key:
            argv += ["--api-key", args.api_key]
    process = spawn(argv, cwd=ROOT)
    try:
        assert process.stdout is not None
        url = json.loads(process.stdout.readline())["url"]
        yield Model(process, url, args.model or MODEL, args.model_url or "")
    finally:
        stop(process, by="terminate")


def settings_for(model: Model) -> dict[str, str]:
    return {
        **SERVER_SETTINGS,
        "SWITCHBOARD_LLM_BASE_URL": model.url,
        "SWITCHBOARD_LLM_MODEL": model.name,
        "SWITCHBOARD_MEMORY_FORMING": "true",
    }


# ---------------------------------------------------------------------------------
# The server's events: when each run ended and each decision was stored.


@dataclass
class Decision:
    at: float
    action: str
    outcome: str


class Events:
    """RUN_UPDATED (SUCCEEDED) and MEMORY_DECIDED of some workspaces, by run id, as the
    server timed them (``Event.time``)."""

    def __init__(self) -> None:
        self.ended: dict[str, float] = {}
        self.decided: dict[str, list[Decision]] = defaultdict(list)
        self.last_decision = 0.0
        self.changed = asyncio.Condition()
        self._tasks: list[asyncio.Task[None]] = []
        self._ready: list[asyncio.Event] = []

    async def follow(self, channel: aio.Channel, account: Account, workspaces: list[str]) -> None:
        """Follow ``workspaces`` and the account's own partition as ``account``, from now
        on (a decision about a user's memory is on the user's partition, the runs on their
        workspaces')."""
        scopes = [epb.Scope(user=account.user), *(epb.Scope(workspace=w) for w in workspaces)]
        for start in range(0, len(scopes), 16):
            ready = asyncio.Event()
            self._ready.append(ready)
            task = self._follow(channel, account, scopes[start : start + 16], ready)
            self._tasks.append(asyncio.create_task(task))
        await asyncio.wait_for(asyncio.gather(*(r.wait() for r in self._ready)), 60)

    async def _follow(
        self,
        channel: aio.Channel,
        account: Account,
        scopes: list[epb.Scope],
        ready: asyncio.Event,
    ) -> None:
        stub = events_pb2_grpc.EventServiceStub(channel)
        request = epb.SubscribeRequest(
            scopes=scopes,
            types=[epb.EVENT_TYPE_RUN_UPDATED, epb.EVENT_TYPE_MEMORY_DECIDED],
            merge_deltas=True,
        )
        with contextlib.suppress(asyncio.CancelledError):
            async for frame in stub.Subscribe(request, metadata=account.metadata):
                ready.set()
                if frame.WhichOneof("frame") != "batch":
                    continue
                for event in frame.batch.events:
                    self._take(event)
                async with self.changed:
                    self.changed.notify_all()

    def _take(self, event: epb.Event) -> None:
        at = event.time.ToDatetime().timestamp()
        kind = event.WhichOneof("payload")
        if kind == "run_updated":
            update = event.run_updated.update
            if (
                update.WhichOneof("update") == "state_change"
                and update.state_change.run.state == pb.RUN_STATE_SUCCEEDED
            ):
                self.ended[run_id(update.run)] = at
        elif kind == "memory_decided":
            decided = event.memory_decided
            self.decided[run_id(decided.run)].append(
                Decision(
                    at,
                    epb.MemoryDecisionAction.Name(decided.action),
                    epb.MemoryFormingOutcome.Name(decided.outcome),
                )
            )
            self.last_decision = time.monotonic()

    async def settled(self, runs: Sequence[str], expected: Sequence[str], limit_s: float) -> bool:
        """Until every run of ``expected`` has a decision and every run of ``runs`` has
        ended (or, with nothing expected, no decision came for ``QUIET_S``); False if
        ``limit_s`` passed first, or no decision came for ``STALL_S`` while some were
        awaited (forming stalled: its figures say so rather than wait on)."""
        began = time.monotonic()
        deadline = began + limit_s
        wanted_ids = [run_id(r) for r in expected]
        all_ids = [run_id(r) for r in runs]

        def quiet_for() -> float:
            return time.monotonic() - max(self.last_decision, began)

        def done() -> bool:
            if not all(r in self.ended for r in all_ids):
                return False
            if expected:
                return all(r in self.decided for r in wanted_ids)
            return quiet_for() >= QUIET_S

        async with self.changed:
            while not done():
                left = deadline - time.monotonic()
                if left <= 0 or (expected and quiet_for() >= STALL_S):
                    return False
                with contextlib.suppress(TimeoutError):
                    # Woken by each batch; the timeout lets the quiet rule see time pass.
                    await asyncio.wait_for(self.changed.wait(), min(left, 1.0))
        return True

    def lags(self, runs: Sequence[str]) -> list[float]:
        """Seconds from each run's end to its last decision (runs with both)."""
        out = []
        for name in runs:
            key = run_id(name)
            if key in self.ended and self.decided.get(key):
                out.append(max(d.at for d in self.decided[key]) - self.ended[key])
        return out

    def actions(self, runs: Sequence[str] | None = None) -> Counter[str]:
        keys = None if runs is None else {run_id(r) for r in runs}
        counted: Counter[str] = Counter()
        for key, decisions in self.decided.items():
            if keys is None or key in keys:
                for d in decisions:
                    label = d.action.removeprefix("MEMORY_DECISION_ACTION_")
                    if d.outcome not in (
                        "MEMORY_FORMING_OUTCOME_APPLIED",
                        "MEMORY_FORMING_OUTCOME_UNSPECIFIED",
                    ):
                        label = d.outcome.removeprefix("MEMORY_FORMING_OUTCOME_")
                    counted[label] += 1
        return counted

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def run_id(name: str) -> str:
    return name.rsplit("/", 1)[-1]


# ---------------------------------------------------------------------------------
# What every part sets up, and one run.


async def assistants(channel: aio.Channel, account: Account, workspace: str) -> dict[str, str]:
    """The forming assistant and the plain one of ``workspace``; their names by role."""
    stub = dispatcher_pb2_grpc.DispatcherServiceStub(channel)
    made = {}
    for role, mode in (
        (FORMING, cpb.MEMORY_FORMING_MODE_USER),
        (PLAIN, cpb.MEMORY_FORMING_MODE_OFF),
    ):
        response = await stub.CreateAssistant(
            pb.CreateAssistantRequest(
                parent=workspace,
                assistant_id=role,
                assistant=pb.Assistant(
                    display_name=role.title(),
                    instructions="You are a helpful assistant.",
                    handler="handlers/llm",
                    memory_policy=cpb.MemoryPolicy(mode=mode, max_items=10_000),
                ),
            ),
            metadata=account.metadata,
            timeout=30,
        )
        made[role] = response.assistant.name
    return made


@dataclass
class Sent:
    run: str
    first_s: float
    error: str = ""


async def send(
    stub: dispatcher_pb2_grpc.DispatcherServiceAsyncStub,
    account: Account,
    conversation: str,
    assistant: str,
    text: str,
) -> Sent:
    """SendMessage, then WatchRun to the run's end: the run and the first text's time."""
    started = time.perf_counter()
    try:
        response = await stub.SendMessage(
            pb.SendMessageRequest(
                conversation=conversation,
                assistant=assistant,
                message=cpb.Message(parts=[cpb.ContentPart(text=text)]),
            ),
            metadata=account.metadata,
            timeout=60,
        )
    except aio.AioRpcError as err:
        return Sent("", 0.0, f"SendMessage {err.code().name}")
    run = response.run.name
    first = 0.0
    try:
        async for frame in stub.WatchRun(
            pb.WatchRunRequest(name=run, after_sequence=0, merge_deltas=True),
            metadata=account.metadata,
            timeout=120,
        ):
            if frame.WhichOneof("frame") != "update":
                continue
            update = frame.update
            kind = update.WhichOneof("update")
            if kind == "delta" and not first and update.delta.text:
                first = time.perf_counter() - started
            elif kind == "state_change" and update.state_change.run.state in TERMINAL:
                state = update.state_change.run.state
                error = "" if state == pb.RUN_STATE_SUCCEEDED else pb.RunState.Name(state)
                return Sent(run, first, error)
    except aio.AioRpcError as err:
        return Sent(run, first, f"WatchRun {err.code().name}")
    return Sent(run, first, "WatchRun ended early")


# ---------------------------------------------------------------------------------
# quality


async def quality(sizes: Sizes, directory: Path, model: Model, seed: int) -> dict[str, Any]:
    group = people(seed, sizes.people)
    url = f"sqlite+aiosqlite:///{directory / 'quality.db'}"
    errors: Counter[str] = Counter()
    scored: dict[str, list[tuple[Question, dict[str, bool]]]] = defaultdict(list)
    shown: dict[str, list[tuple[int, int]]] = defaultdict(list)
    unsettled = 0
    with serve(directory, url, settings_for(model)) as server:
        async with dedicated_channel(server.address) as channel:
            dispatcher = dispatcher_pb2_grpc.DispatcherServiceStub(channel)
            context = context_pb2_grpc.ContextServiceStub(channel)
            accounts = [await register(channel, f"person{p.index}@example.com") for p in group]
            workspaces = [
                await create_workspace(channel, a, f"person-{i:03d}", f"Person {i}")
                for i, a in enumerate(accounts)
            ]
            formers = [
                (await assistants(channel, a, w))[FORMING]
                for a, w in zip(accounts, workspaces, strict=True)
            ]
            conversations = [
                await create_conversations(channel, a, [w] * 4, title="Session {}")
                for a, w in zip(accounts, workspaces, strict=True)
            ]
            events = Events()
            for account, workspace in zip(accounts, workspaces, strict=True):
                await events.follow(channel, account, [workspace])
            try:
                for session_no in range(3):
                    runs: list[str] = []
                    expected: list[str] = []

                    async def talk(
                        i: int,
                        session_no: int = session_no,
                        runs: list[str] = runs,
                        expected: list[str] = expected,
                    ) -> None:
                        for text in group[i].sessions[session_no]:
                            sent = await send(
                                dispatcher,
                                accounts[i],
                                conversations[i][session_no],
                                formers[i],
                                text,
                            )
                            if sent.error:
                                errors[sent.error] += 1
                            if sent.run:
                                runs.append(sent.run)
                                if facts_said(text):
                                    expected.append(sent.run)

                    await gather_limited(
                        [functools.partial(talk, i) for i in range(len(group))], limit=8
                    )
                    if not await events.settled(runs, expected, sizes.settle_s):
                        unsettled += 1
                    decided = dict(events.actions(runs))
                    say(f"  session {session_no + 1}: {len(runs)} runs, decisions {decided}")
                for i, one in enumerate(group):
                    for question in one.questions:
                        reads = await read_three(
                            context, accounts[i], workspaces[i], conversations[i][3], question.text
                        )
                        for way, read in reads.items():
                            scored[way].append((question, score(question, read)))
                            shown[way].append((len(read.memories), len(read.messages)))
                stats = model.stats()
                actions = events.actions()
            finally:
                await events.close()
    return {
        "people": len(group),
        "messages": sum(len(s) for p in group for s in p.sessions),
        "by_way": {way: tally(marks) for way, marks in scored.items()},
        "shown": {
            way: {
                "memory_items": round(sum(m for m, _ in sizes) / max(len(sizes), 1), 1),
                "messages": round(sum(n for _, n in sizes) / max(len(sizes), 1), 1),
            }
            for way, sizes in shown.items()
        },
        "decisions": dict(actions),
        "model": stats,
        "errors": dict(errors),
        "unsettled_sessions": unsettled,
    }


async def read_three(
    context: context_pb2_grpc.ContextServiceAsyncStub,
    account: Account,
    workspace: str,
    conversation: str,
    question: str,
) -> dict[str, Read]:
    """The question read with forming's window, the window's message retrieval (memory
    left out), and message search over the workspace."""
    window = await context.GetContextWindow(
        cpb.GetContextWindowRequest(
            conversation=conversation, token_budget=WINDOW_TOKENS, query=question
        ),
        metadata=account.metadata,
        timeout=60,
    )
    retrieving = await context.GetContextWindow(
        cpb.GetContextWindowRequest(
            conversation=conversation,
            token_budget=WINDOW_TOKENS,
            query=question,
            retrieval=cpb.RetrievalOptions(
                top_k=TOP_K, token_budget=RETRIEVAL_TOKENS, filter="source = message"
            ),
        ),
        metadata=account.metadata,
        timeout=60,
    )
    searched = await context.SearchContext(
        cpb.SearchContextRequest(
            parent=workspace, query=question, filter="source = message", page_size=TOP_K
        ),
        metadata=account.metadata,
        timeout=60,
    )
    forming = _window_read(window.window)
    plain = _window_read(retrieving.window)
    return {
        "forming": forming,
        "window retrieval": Read((), plain.messages),
        "workspace search": Read(
            (),
            tuple(
                _text(r.message) for r in searched.results if r.WhichOneof("source") == "message"
            ),
        ),
    }


def _text(message: cpb.Message) -> str:
    return " ".join(part.text for part in message.parts if part.text)


def _window_read(window: cpb.ContextWindow) -> Read:
    memories: list[str] = []
    messages: list[str] = []
    for item in window.included:
        which = item.WhichOneof("item")
        if which == "memory_item":
            memories.append(item.memory_item.content)
        elif which == "message":
            messages.append(_text(item.message))
        elif which == "retrieved":
            source = item.retrieved.WhichOneof("source")
            if source == "message":
                messages.append(_text(item.retrieved.message))
            elif source == "memory_item":
                memories.append(item.retrieved.memory_item.content)
    return Read(tuple(memories), tuple(messages))


# ---------------------------------------------------------------------------------
# lag and cost


_PLACE_START: Final = ("Ar", "Bel", "Cor", "Dun", "El", "Fen", "Gal", "Hal", "Ist", "Kel")
_PLACE_END: Final = ("ford", "mouth", "wick", "ton", "by", "stead", "holm", "vale", "dale", "mere")


def place(index: int) -> str:
    """A made-up town for exchange ``index``: each exchange states a fact of its own."""
    first, rest = _PLACE_START[index % 10], index // 10
    middle = _PLACE_END[rest % 10]
    tail = "" if rest < 10 else _PLACE_START[(rest // 10) % 10].lower()
    return f"{first}{middle}{tail}"


def exchange(index: int) -> str:
    return f"I am going to {place(index)} on {DATES[index % len(DATES)]}. Can you remind me?"


async def lag(sizes: Sizes, directory: Path, model: Model) -> dict[str, Any]:
    """The lag at one conversation and at many, and forming's cost at many."""
    url = f"sqlite+aiosqlite:///{directory / 'lag.db'}"
    out: dict[str, Any] = {}
    with serve(directory, url, settings_for(model)) as server:
        async with dedicated_channel(server.address) as channel:
            account = await register(channel, "lag@example.com")
            count = sizes.conversations
            workspaces = [
                await create_workspace(channel, account, f"lag-{w:03d}", f"Lag {w}")
                for w in range((count + PER_WORKSPACE - 1) // PER_WORKSPACE)
            ]
            roles = [await assistants(channel, account, w) for w in workspaces]
            parents = [workspaces[i // PER_WORKSPACE] for i in range(count)]
            events = Events()
            await events.follow(channel, account, workspaces)
            try:
                one = await create_conversations(channel, account, [workspaces[0]])
                out["one"] = await _one_conversation(
                    sizes, channel, account, one[0], roles[0], events, model
                )
                for role in (PLAIN, FORMING):
                    names = await create_conversations(channel, account, parents)
                    out[role] = await _many(
                        sizes,
                        server.address,
                        account,
                        names,
                        [roles[i // PER_WORKSPACE][role] for i in range(count)],
                        events,
                        model,
                        server.pid,
                        offset=100_000 if role == FORMING else 200_000,
                    )
            finally:
                await events.close()
    plain, forming = out[PLAIN], out[FORMING]
    exchanges = max(forming["exchanges"], 1)
    out["forming_cpu_ms_per_exchange"] = round(
        forming["server_cpu_ms_per_exchange"] - plain["server_cpu_ms_per_exchange"], 2
    )
    out["tokens_per_exchange"] = {
        "prompt": round(forming["forming_prompt_tokens"] / exchanges, 1),
        "completion": round(forming["forming_completion_tokens"] / exchanges, 1),
    }
    return out


async def _one_conversation(
    sizes: Sizes,
    channel: aio.Channel,
    account: Account,
    conversation: str,
    roles: dict[str, str],
    events: Events,
    model: Model,
) -> dict[str, Any]:
    stub = dispatcher_pb2_grpc.DispatcherServiceStub(channel)
    runs, errors = [], Counter[str]()
    model.stats(reset=True)
    stalled = 0
    for index in range(sizes.lag_one):
        sent = await send(stub, account, conversation, roles[FORMING], exchange(index))
        if sent.error:
            errors[sent.error] += 1
        if sent.run:
            runs.append(sent.run)
            if not await events.settled([sent.run], [sent.run], sizes.settle_s):
                stalled += 1
                if stalled >= 2:
                    break  # forming is not answering: say so rather than wait on
    lags = events.lags(runs)
    return {
        "exchanges": len(runs),
        "decided": len(lags),
        **_lag_figures(lags),
        "actions": dict(events.actions(runs)),
        "model": model.stats(),
        "errors": dict(errors),
        "unsettled": stalled,
    }


def _lag_figures(lags: Sequence[float]) -> dict[str, float]:
    return {
        "lag_p50_ms": round(percentile(lags, 0.5) * 1000, 1),
        "lag_p95_ms": round(percentile(lags, 0.95) * 1000, 1),
        "lag_max_ms": round(max(lags, default=float("nan")) * 1000, 1),
    }


async def _many(
    sizes: Sizes,
    address: str,
    account: Account,
    names: list[str],
    assistants_of: list[str],
    events: Events,
    model: Model,
    server_pid: int,
    offset: int,
) -> dict[str, Any]:
    """Every conversation at once, each sending its exchanges back to back; the server's
    CPU from the first send until forming settled, less its idle CPU over as long.

    A connection admits 100 concurrent streams: the conversations share several."""
    channels = [
        dedicated_channel(address) for _ in range(max(1, len(names) // CONVERSATIONS_PER_CHANNEL))
    ]
    stubs = [dispatcher_pb2_grpc.DispatcherServiceStub(c) for c in channels]
    waited = await wait_quiet(sizes.quiet_wait_s)
    idle_before = process_cpu_s(server_pid)
    idle_started = time.monotonic()
    await asyncio.sleep(2.0)  # the server's own idle CPU, over a known time
    idle_rate = (process_cpu_s(server_pid) - idle_before) / (time.monotonic() - idle_started)
    model.stats(reset=True)
    runs: list[str] = []
    errors: Counter[str] = Counter()
    forming = assistants_of and assistants_of[0].endswith(f"/{FORMING}")

    async def loop(i: int) -> None:
        for k in range(sizes.per_conversation):
            text = exchange(offset + i * sizes.per_conversation + k)
            stub = stubs[i % len(stubs)]
            sent = await send(stub, account, names[i], assistants_of[i], text)
            if sent.error:
                errors[sent.error] += 1
            if sent.run:
                runs.append(sent.run)

    meter = CpuMeter(server_pid, model.process.pid)
    meter.start()
    started = time.monotonic()
    await asyncio.gather(*(loop(i) for i in range(len(names))))
    runs_done = time.monotonic() - started
    settled = await events.settled(runs, runs, sizes.settle_s) if forming else True
    wall = time.monotonic() - started
    meter.stop()
    for each in channels:
        await each.close(None)
    cpu = meter.used[0] - idle_rate * wall
    stats = model.stats()
    exchanges = max(len(runs), 1)
    lags = events.lags(runs) if forming else []
    figures: dict[str, Any] = {
        "conversations": len(names),
        "exchanges": len(runs),
        "runs_wall_s": round(runs_done, 2),
        "wall_s": round(wall, 2),
        "settled": settled,
        "idle_cpu_ms_per_s": round(idle_rate * 1000, 1),
        "server_cpu_ms_per_exchange": round(cpu * 1000 / exchanges, 2),
        "forming_prompt_tokens": sum(v for k, v in stats["prompt_tokens"].items() if k != "chat"),
        "forming_completion_tokens": sum(
            v for k, v in stats["completion_tokens"].items() if k != "chat"
        ),
        "model": stats,
        "errors": dict(errors),
        "quiet_wait_s": waited,
        # Everything else on the machine meanwhile (this client and the model apart).
        "other_cores": round(meter.others() / max(meter.wall, 1e-9), 2),
    }
    if forming:
        figures.update(decided=len(lags), **_lag_figures(lags), actions=dict(events.actions(runs)))
    return figures


# ---------------------------------------------------------------------------------
# first-token


async def first_token(sizes: Sizes, directory: Path, model: Model) -> dict[str, Any]:
    url = f"sqlite+aiosqlite:///{directory / 'first.db'}"
    samples: dict[str, list[float]] = {FORMING: [], PLAIN: []}
    errors: Counter[str] = Counter()
    with serve(directory, url, settings_for(model)) as server:
        async with dedicated_channel(server.address) as channel:
            account = await register(channel, "first@example.com")
            workspace = await create_workspace(channel, account, "first", "First token")
            roles = await assistants(channel, account, workspace)
            names = await create_conversations(channel, account, [workspace] * (2 * sizes.loops))
            stub = dispatcher_pb2_grpc.DispatcherServiceStub(channel)
            waited = await wait_quiet(sizes.quiet_wait_s)
            per_loop = sizes.pairs // sizes.loops

            async def loop(i: int) -> None:
                for k in range(per_loop):
                    # Alternating, and which goes first alternating too: drift and the
                    # other one's forming fall on both alike.
                    order = (FORMING, PLAIN) if k % 2 == 0 else (PLAIN, FORMING)
                    for role in order:
                        conversation = names[2 * i + (0 if role == FORMING else 1)]
                        text = exchange(300_000 + (i * per_loop + k) * 2 + (role == FORMING))
                        sent = await send(stub, account, conversation, roles[role], text)
                        if sent.error:
                            errors[sent.error] += 1
                        elif k > 0:  # the first pair of each loop warms it up
                            samples[role].append(sent.first_s)

            meter = CpuMeter(server.pid, model.process.pid)
            with meter.measure():
                await asyncio.gather(*(loop(i) for i in range(sizes.loops)))
    figures: dict[str, Any] = {
        "errors": dict(errors),
        "quiet_wait_s": waited,
        "loops": sizes.loops,
        "server_cores": meter.cores(0),
        "other_cores": round(meter.others() / max(meter.wall, 1e-9), 2),
    }
    for role, values in samples.items():
        figures[role] = {
            "runs": len(values),
            "p50_ms": round(percentile(values, 0.5) * 1000, 2),
            "p95_ms": round(percentile(values, 0.95) * 1000, 2),
        }
    figures["ratio_p50"] = round(
        figures[FORMING]["p50_ms"] / max(figures[PLAIN]["p50_ms"], 1e-9), 3
    )
    figures["ratio_p95"] = round(
        figures[FORMING]["p95_ms"] / max(figures[PLAIN]["p95_ms"], 1e-9), 3
    )
    low, high = ratio_interval(samples[FORMING], samples[PLAIN])
    figures["ratio_p50_interval"] = [round(low, 3), round(high, 3)]
    return figures


def ratio_interval(
    on: Sequence[float], off: Sequence[float], rounds: int = 2000
) -> tuple[float, float]:
    """The 95% bootstrap interval of p50(on) / p50(off): each resamples its own runs."""
    if not on or not off:
        return math.nan, math.nan
    rng = random.Random(0)  # noqa: S311 - a reproducible resampling
    ratios = []
    for _ in range(rounds):
        a = [rng.choice(on) for _ in on]
        b = [rng.choice(off) for _ in off]
        ratios.append(percentile(a, 0.5) / max(percentile(b, 0.5), 1e-12))
    return percentile(ratios, 0.025), percentile(ratios, 0.975)


# ---------------------------------------------------------------------------------
# The report.


def _share(part: dict[str, Any], key: str = "right") -> str:
    total = part["questions"]
    return f"{part[key]} of {total} ({part[key] / max(total, 1):.0%})"


def render(results: dict[str, Any], command: str, sizes: Sizes) -> str:
    model = results["model"]
    lines = [
        SECTION,
        "",
        *provenance(command, took_s=results.get("seconds")),
        host_speed_line(results["host"]),
        "- the model: "
        + (
            f"`{model['upstream']}` (model `{model['name']}`) through `bench/memory_model.py`'s "
            "counting pass-through"
            if model["upstream"]
            else "`bench/memory_model.py`'s SCRIPTED model: rules over the text, not a language "
            "model (its docstring): first-person statement rules give the candidates, the "
            "similar memories' subjects give the decisions, so these figures measure "
            "Switchboard's forming path and window, not a model's judgement; `--model-url` "
            "runs the same bench against any OpenAI-compatible endpoint"
        ),
        "- the server: a fresh `switchboard serve --dev` per part (embedded SQLite, in-memory "
        "event log, no embeddings endpoint: search ranks by full text), the `llm` handler "
        "at the model; "
        + settings_text(SERVER_SETTINGS)
        + "; an assistant with `MemoryPolicy{mode: USER}` (forming after each run) and, "
        "where a part compares, one with `mode: OFF` in the same workspace",
        "",
    ]
    if "quality" in results:
        lines += _quality_lines(results["quality"])
    if "lag" in results:
        lines += _lag_lines(results["lag"], sizes)
    if "first-token" in results:
        lines += _first_lines(results["first-token"])
    return "\n".join(lines).rstrip() + "\n"


_WAYS: Final = ("forming", "window retrieval", "workspace search")
_WAY_WORDS: Final = {
    "forming": "forming on: the window (its memory items and messages)",
    "window retrieval": "forming off: the window's message retrieval (`source = message`, top 5)",
    "workspace search": "forming off: message search over the workspace (top 5)",
}


def _quality_lines(q: dict[str, Any]) -> list[str]:
    lines = [
        "### Retrieval quality on the multi-session set",
        "",
        f"{q['people']} people, {q['messages']} messages over three sessions each (facts "
        "stated, changed and retracted, small talk and distractors), then one question per "
        "fact in a fourth conversation; bench/memory.py's docstring has the set and the "
        "scoring. Decisions stored: "
        + (", ".join(f"{k} {v}" for k, v in sorted(q["decisions"].items())) or "none")
        + f"; errors: {errors_text(q['errors'])}; sessions whose forming did not settle in "
        f"time: {q['unsettled_sessions']}.",
        "",
        "| read | current fact there (stands or changed) | a superseded value there too | "
        "stands | changed | retracted, not shown as current | memory items / messages read, "
        "mean |",
        "|---|---|---|---|---|---|---|",
    ]
    for way in _WAYS:
        t = q["by_way"].get(way)
        if t is None:
            continue
        empty = {"questions": 0, "right": 0, "stale": 0}
        lines.append(
            f"| {_WAY_WORDS[way]} | {_share(t['current'])} | {_share(t['current'], 'stale')} "
            f"| {_share(t.get('stated', empty))} | {_share(t.get('changed', empty))} "
            f"| {_share(t.get('retracted', empty))} | {_shown(q, way)} |"
        )
    lines += [
        "",
        "The window's message retrieval searches its own conversation (the fourth, which "
        "holds none of the facts): nothing said in earlier sessions reaches it, so it finds "
        "no current fact and, trivially, shows no retracted one. Message search over the "
        "workspace finds the statements but not which one is current: a superseded value "
        "comes with the current one where a fact changed.",
    ]
    forming = q["by_way"].get("forming")
    searched = q["by_way"].get("workspace search")
    if forming and searched:
        f_share = forming["current"]["right"] / max(forming["current"]["questions"], 1)
        s_share = searched["current"]["right"] / max(searched["current"]["questions"], 1)
        lines += [
            "",
            f"- current fact in the window with forming on, against message search over the "
            f"workspace: {f_share:.0%} / {s_share:.0%}: {verdict(f_share >= s_share)}",
        ]
    return [*lines, ""]


def _shown(q: dict[str, Any], way: str) -> str:
    sizes = q.get("shown", {}).get(way)
    return "-" if sizes is None else f"{sizes['memory_items']} / {sizes['messages']}"


def _tokens_text(stats: dict[str, Any], kind: str) -> str:
    return (
        f"{kind}: {stats['requests'].get(kind, 0)} calls, "
        f"{stats['prompt_tokens'].get(kind, 0)} prompt / "
        f"{stats['completion_tokens'].get(kind, 0)} completion tokens"
    )


def _lag_lines(lag_: dict[str, Any], sizes: Sizes) -> list[str]:
    one, plain, forming = lag_["one"], lag_[PLAIN], lag_[FORMING]
    lines = [
        "### Forming's lag and cost",
        "",
        'Each exchange states one new fact ("I am going to Arford on 3 May. Can you remind '
        "me?\"). Lag: the run's SUCCEEDED event to its last MEMORY_DECIDED event (the server's "
        "times).",
        "",
        "| conversations | exchanges | decided | lag p50 ms | lag p95 ms | lag max ms "
        "| decisions | errors |",
        "|---|---|---|---|---|---|---|---|",
        f"| 1 (the next sent after the last decision) | {one['exchanges']} | {one['decided']} "
        f"| {one['lag_p50_ms']} | {one['lag_p95_ms']} | {one['lag_max_ms']} "
        f"| {errors_text(one['actions'])} | {errors_text(one['errors'])} |",
        f"| {forming['conversations']} at once, {sizes.per_conversation} back to back each "
        f"| {forming['exchanges']} | {forming['decided']} | {forming['lag_p50_ms']} "
        f"| {forming['lag_p95_ms']} | {forming['lag_max_ms']} "
        f"| {errors_text(forming['actions'])} | {errors_text(forming['errors'])} |",
        "",
        f"Cost, {forming['conversations']} conversations at once: the server's CPU per exchange "
        "(from the first send until every decision was stored, or every run ended without "
        "forming, less the server's idle CPU over as long; consolidation, a job per workspace "
        "60 s after its rounds (`SWITCHBOARD_MEMORY_CONSOLIDATE_DELAY_S`), falls outside it):",
        "",
        "| assistant | exchanges | runs ended in s | settled in s | server CPU ms per exchange "
        "| model calls and tokens (forming) | others' cores | errors |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for role, f in ((PLAIN, plain), (FORMING, forming)):
        stats = f["model"]
        calls = "; ".join(_tokens_text(stats, kind) for kind in ("candidates", "decisions"))
        lines.append(
            f"| {'forming (USER)' if role == FORMING else 'not forming (OFF)'} | {f['exchanges']} "
            f"| {f['runs_wall_s']} | {f['wall_s']} | {f['server_cpu_ms_per_exchange']} "
            f"| {calls if role == FORMING else '-'} | {f.get('other_cores', '-')} "
            f"| {errors_text(f['errors'])} |"
        )
    tokens = lag_["tokens_per_exchange"]
    lines += [
        "",
        f"- forming's server CPU per exchange (forming less not forming): "
        f"**{lag_['forming_cpu_ms_per_exchange']} ms** (a run's own, not forming: "
        f"{plain['server_cpu_ms_per_exchange']} ms); model tokens per exchange for forming: "
        f"{tokens['prompt']} prompt + {tokens['completion']} completion",
        f"- the worker behind {forming['conversations']} conversations: the last decision "
        f"{round(forming['wall_s'] - forming['runs_wall_s'], 2)} s after the last run ended "
        f"({round(forming['exchanges'] / max(forming['wall_s'], 1e-9), 1)} exchanges formed a "
        "second, runs included); the runs themselves took "
        f"{forming['runs_wall_s']} s with forming and {plain['runs_wall_s']} s without: on "
        "two cores the worker and the runs share the CPU",
        "",
    ]
    return lines


def _first_lines(f: dict[str, Any]) -> list[str]:
    on, off = f[FORMING], f[PLAIN]
    low, high = f["ratio_p50_interval"]
    within = low <= 1.0 <= high or f["ratio_p50"] <= FIRST_TOKEN_RATIO_GOAL
    return [
        "### First token with forming on and off",
        "",
        f"{f['loops']} loops at once in one server, each alternating a run on the forming "
        "assistant and one on the other (each in its own conversation; which goes first "
        "alternates), the first pair of each loop left out; from SendMessage to the "
        f"answer's first text. Errors: {errors_text(f['errors'])}; the server used "
        f"{f.get('server_cores', '-')} cores, everything else on the machine "
        f"{f.get('other_cores', '-')}.",
        "",
        "| assistant | runs | first token p50 ms | p95 ms |",
        "|---|---|---|---|",
        f"| forming (USER) | {on['runs']} | {on['p50_ms']} | {on['p95_ms']} |",
        f"| not forming (OFF) | {off['runs']} | {off['p50_ms']} | {off['p95_ms']} |",
        "",
        f"- first token with forming on / off within noise (the 95% bootstrap interval of "
        f"the p50 ratio holds 1, or the ratio is at most {FIRST_TOKEN_RATIO_GOAL}): p50 "
        f"{f['ratio_p50']} ({low} to {high}; p95 {f['ratio_p95']}): {verdict(within)}",
        "",
    ]


# ---------------------------------------------------------------------------------
# The driver.


async def drive(args: argparse.Namespace) -> int:
    sizes = QUICK if args.quick else FULL
    if args.people is not None:
        sizes = dataclasses.replace(sizes, people=args.people)
    if args.conversations is not None:
        sizes = dataclasses.replace(sizes, conversations=args.conversations)
    if args.pairs is not None:
        sizes = dataclasses.replace(sizes, pairs=args.pairs)
    parts = args.only or list(PARTS)
    results: dict[str, Any] = {
        "sizes": dataclasses.asdict(sizes),
        "model": {"upstream": args.model_url or "", "name": args.model or MODEL},
    }
    async with session(results, "bench-memory-") as directory:
        with model_server(args) as model:
            if "quality" in parts:
                say("quality: the multi-session set")
                results["quality"] = await quality(sizes, directory, model, args.seed)
            if "lag" in parts:
                say(f"lag: 1 conversation, then {sizes.conversations}")
                results["lag"] = await lag(sizes, directory, model)
            if "first-token" in parts:
                say("first-token: forming on and off, alternating")
                results["first-token"] = await first_token(sizes, directory, model)
    text = render(results, command_line("bench/memory.py"), sizes)
    report(results, text, args)
    return 0


def options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--only", nargs="+", choices=PARTS, help="run only these parts")
    parser.add_argument("--seed", type=int, default=82, help="the multi-session set's seed")
    parser.add_argument("--people", type=int, help="people in the multi-session set")
    parser.add_argument("--conversations", type=int, help="conversations at once (lag)")
    parser.add_argument("--pairs", type=int, help="pairs of runs (first-token)")
    parser.add_argument(
        "--model-url",
        help="an OpenAI-compatible endpoint (its /v1 URL) instead of the scripted model",
    )
    parser.add_argument("--api-key", help="the endpoint's bearer key")
    parser.add_argument("--model", help=f"the model's name at the endpoint ({MODEL} if unset)")


def main() -> int:
    return section_main(
        __doc__,
        drive,
        quick="8 people, 10 + 100 exchanges, 100 pairs (under a minute)",
        options=options,
    )


if __name__ == "__main__":
    raise SystemExit(main())
