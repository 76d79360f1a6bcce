"""The model behind bench/memory.py: a SCRIPTED OpenAI-compatible server (rules over the
text, not a language model), or a counting pass-through to a real endpoint.

    python bench/memory_model.py                              the scripted model
    python bench/memory_model.py --upstream URL [--api-key K] a pass-through to URL

It prints one JSON line, ``{"url": ...}`` (its base URL, ``http://127.0.0.1:PORT/v1``),
then answers one JSON line per command line on stdin: ``{"stats": true}`` gives what it
has counted (requests, tokens and failures, by kind of call), ``{"reset": true}`` zeroes
the counts; closing stdin stops it.

**The scripted model is not a language model.** It is ``tests/fakes/openai_server.py``'s
``FakeOpenAI`` (the test kit's faithful local server of the Chat Completions API: the
same request checks, streamed and whole answers) answering by rules, so that the bench's
quality figure measures Switchboard's forming path (the worker, the decisions applied,
the window), not a model's judgement:

- a request without ``response_format`` (a run's own call) gets a short fixed answer;
- a forming call is one with ``response_format: {"type": "json_schema", ...}``. The
  first (candidate facts) is told apart from the second (one decision per candidate)
  by its schema: the decisions' schema has an ``action`` enum holding ``invalidate``.
- candidates: the latest exchange's user text is split into sentences and each is
  matched against first-person statement rules (``RULES``): "I live in X" / "I moved to
  X" (where the person lives), "I work at X" / "I no longer work at X", "My favourite T
  is X", "I have a T called X" / "I no longer have a T", "I am learning X" / "I stopped
  learning X", "My trip to C is on D" / "I cancelled my trip to C". Each match is one
  candidate whose content is written in one fixed form per subject ("Lives in Berlin",
  "Favourite colour is green", "No longer has a dog"); anything else (small talk, what a
  sister or a friend does, wishes) gives none.
- decisions: each candidate's subject (read back from its content) is compared with the
  subjects of the similar memories the prompt lists (read back from their contents the
  same way): no memory of that subject: add; one with the same value: none ("known");
  one with another value: update, replacing it; a retraction: invalidate it (none if
  there is nothing to retract).
- usage: tokens counted with the context service's ``ApproxTokenCounter`` (cl100k-like):
  every message's text plus 4, and the request's ``response_format`` (a real API
  charges the schema as prompt); the completion is the answer's text.

``--upstream``: every request is sent on to that OpenAI-compatible endpoint (with
``--api-key`` as its bearer key) and its answer passed back as it comes; only the counts
are taken (the ``usage`` the endpoint reports, and whether a forming answer parses as
JSON). This is how the same bench runs against any model.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository: tests.*

from switchboard.context.text.tokencount import MESSAGE_OVERHEAD, ApproxTokenCounter
from tests.fakes.openai_server import FakeOpenAI, Received, Reply

#: The run's own answer (a request without a response format).
CHAT_ANSWER: Final = "Noted, thank you for telling me."
#: The kinds of call the counts are kept by.
CHAT, CANDIDATES, DECISIONS = "chat", "candidates", "decisions"
#: How sure the scripted model says it is of each candidate.
CONFIDENCE: Final = 0.9
_COUNTER: Final = ApproxTokenCounter()

# ---------------------------------------------------------------------------------
# Facts: the subjects the rules know, each with its one written form.

_NAME: Final = r"[A-Z][\w'-]*(?: [A-Z][\w'-]*)*"
_WORD: Final = r"[a-z]+"
_DATE: Final = r"\d{1,2} [A-Z][a-z]+"


@dataclass(frozen=True)
class Slot:
    """A kind of fact: its written form (``{t}``: the subject's qualifier, ``{v}``: the
    value) and the category a forming schema names it by."""

    kind: str
    form: str
    category: str
    retracted: str = ""

    def pattern(self) -> re.Pattern[str]:
        """The written form read back (its ``t`` and ``v``)."""
        text = re.escape(self.form).replace(r"\{t\}", "(?P<t>.+?)").replace(r"\{v\}", "(?P<v>.+)")
        return re.compile(f"^{text}$", re.IGNORECASE)

    def retraction_pattern(self) -> re.Pattern[str]:
        text = re.escape(self.retracted).replace(r"\{t\}", "(?P<t>.+?)")
        text = text.replace(r"\{v\}", "(?P<v>.+)")
        return re.compile(f"^{text}$", re.IGNORECASE)


SLOTS: Final = {
    slot.kind: slot
    for slot in (
        Slot("home", "Lives in {v}", "person_fact"),
        Slot("employer", "Works at {v}", "person_fact", "No longer works at {v}"),
        Slot("favourite", "Favourite {t} is {v}", "preference"),
        Slot("has", "Has a {t} called {v}", "person_fact", "No longer has a {t}"),
        Slot("learning", "Is learning {v}", "person_fact", "No longer learning {v}"),
        Slot("trip", "Trip to {t} is on {v}", "plan", "Trip to {t} is cancelled"),
    )
}
#: Kinds with one value per person whatever the retraction names (a new employer
#: replaces the old, and retracting "at Acme" retracts the employer).
_SINGLE: Final = frozenset({"home", "employer", "learning"})


@dataclass(frozen=True)
class Fact:
    """One candidate fact: ``kind`` (a ``SLOTS`` key), ``topic`` (the qualifier: which
    favourite, which pet, which trip; "" for the rest), ``value`` ("" for a retraction
    of a whole subject)."""

    kind: str
    topic: str
    value: str
    retracts: bool = False

    @property
    def subject(self) -> str:
        """What one current memory holds at most one value of."""
        return f"{self.kind}:{self.topic.lower()}"

    @property
    def slot(self) -> Slot:
        return SLOTS[self.kind]

    @property
    def content(self) -> str:
        form = self.slot.retracted if self.retracts else self.slot.form
        return form.format(t=self.topic, v=self.value)


#: First-person statements (matched per sentence, first rule first): the fact each says.
RULES: Final[tuple[tuple[re.Pattern[str], str, bool], ...]] = tuple(
    (re.compile(pattern), kind, retracts)
    for pattern, kind, retracts in (
        (rf"^I (?:no longer|don't|do not) work (?:at|for) (?P<v>{_NAME})", "employer", True),
        (rf"^I (?:left|quit) my job at (?P<v>{_NAME})", "employer", True),
        (rf"^I (?:no longer|don't|do not) have an? (?P<t>{_WORD})\b", "has", True),
        (rf"^I (?:stopped|gave up|quit) learning (?P<v>{_NAME})", "learning", True),
        (rf"^I cancelled my trip to (?P<t>{_NAME})", "trip", True),
        (rf"^I (?:now )?live in (?P<v>{_NAME})", "home", False),
        (rf"^I (?:have |just |recently )?moved to (?P<v>{_NAME})", "home", False),
        (rf"^I (?:now )?work (?:at|for) (?P<v>{_NAME})", "employer", False),
        (rf"^I (?:have )?(?:started|joined) (?:working at |at )?(?P<v>{_NAME})", "employer", False),
        (rf"^[Mm]y favou?rite (?P<t>{_WORD}) is (?:now )?(?P<v>[\w' -]+?)$", "favourite", False),
        (rf"^I have an? (?P<t>{_WORD}) (?:called|named) (?P<v>{_NAME})", "has", False),
        (rf"^I(?: am|'m) (?:now )?learning (?P<v>{_NAME})", "learning", False),
        (rf"^[Mm]y trip to (?P<t>{_NAME}) is (?:now )?on (?P<v>{_DATE})", "trip", False),
        (rf"^I(?: am|'m) going to (?P<t>{_NAME}) on (?P<v>{_DATE})", "trip", False),
    )
)
_SENTENCE_END: Final = re.compile(r"(?<=[.!?;])\s+|\n+")


def sentences(text: str) -> list[str]:
    return [s.strip().rstrip(".!?;").strip() for s in _SENTENCE_END.split(text) if s.strip()]


def facts_said(text: str) -> list[Fact]:
    """The facts a person's text states, by ``RULES``, in order, each subject once."""
    found: dict[str, Fact] = {}
    for sentence in sentences(text):
        for pattern, kind, retracts in RULES:
            match = pattern.search(sentence)
            if match is None:
                continue
            groups = match.groupdict()
            fact = Fact(kind, groups.get("t") or "", groups.get("v") or "", retracts)
            found[fact.subject] = fact
            break
    return list(found.values())


def fact_of(content: str) -> Fact | None:
    """A fact written in one of the slots' forms, read back (None: not one of them)."""
    text = content.strip().rstrip(".").strip()
    for slot in SLOTS.values():
        for pattern, retracts in (
            (slot.pattern(), False),
            *(((slot.retraction_pattern(), True),) if slot.retracted else ()),
        ):
            match = pattern.match(text)
            if match is not None:
                groups = match.groupdict()
                return Fact(slot.kind, groups.get("t") or "", groups.get("v") or "", retracts)
    return None


def decide(candidate: Fact, memories: list[tuple[str, str]]) -> tuple[str, str, str]:
    """(action, the memory it replaces or retires, reason) for ``candidate`` against the
    similar ``memories`` ((reference, content) pairs)."""
    for reference, content in memories:
        known = fact_of(content)
        if known is None or known.retracts or known.subject != candidate.subject:
            continue
        if candidate.retracts:
            if candidate.kind in _SINGLE or not candidate.value or candidate.value == known.value:
                return "invalidate", reference, "the person said it is no longer true"
            continue
        if known.value.lower() == candidate.value.lower():
            return "none", "", "known already"
        return "update", reference, "the person said it changed"
    if candidate.retracts:
        return "none", "", "nothing to retract"
    return "add", "", "new"


# ---------------------------------------------------------------------------------
# Reading a forming prompt.


def message_text(message: dict[str, Any]) -> str:
    content = message.get("content")
    if isinstance(content, list):
        return "\n".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
    return content if isinstance(content, str) else ""


def _json_values(text: str) -> Iterator[Any]:
    """Every JSON object or array that starts somewhere in ``text`` (a prompt may embed
    its data as JSON among its words)."""
    decoder = json.JSONDecoder()
    position = 0
    while True:
        starts = [i for i in (text.find("{", position), text.find("[", position)) if i >= 0]
        if not starts:
            return
        start = min(starts)
        try:
            value, end = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            position = start + 1
            continue
        yield value
        position = end


def _walk(value: Any) -> Iterator[dict[str, Any]]:
    if isinstance(value, dict):
        yield value
        for inner in value.values():
            yield from _walk(inner)
    elif isinstance(value, list):
        for inner in value:
            yield from _walk(inner)


_CONTENT_KEYS: Final = ("content", "fact", "text", "statement", "memory")
_HANDLE_KEYS: Final = ("handle", "name", "id", "memory_item", "ref", "key")
_MEMORY_LISTS: Final = ("existing", "memories", "similar", "known")


@dataclass
class Asked:
    """One candidate a decisions prompt asks about: its index as the prompt numbers it,
    its fact (None: not in a form the rules write), the memories shown with it."""

    index: int
    fact: Fact | None
    memories: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class Prompt:
    """What a forming prompt holds, as the scripted model reads it: the exchange's user
    text (candidates), or the candidates with the memories shown with each (decisions)."""

    exchange: str = ""
    asked: list[Asked] = field(default_factory=list)


def _string(entry: dict[str, Any], keys: Sequence[str]) -> str:
    for key in keys:
        value = entry.get(key)
        if isinstance(value, str) and value:
            return value
    return ""


def read_prompt(body: dict[str, Any]) -> Prompt:
    """The forming worker's prompt (``dispatcher/memory/forming.py``): the last user
    message is JSON; for candidates it holds ``exchange``, the exchange's turns
    (``role``, ``text``): its user turns are read, not ``recent`` nor ``summary``; for
    decisions, ``candidates``, each with ``candidate`` (its index), ``content`` and
    ``existing`` (the similar memories shown with it: ``handle``, ``content``).

    Another shape is read as well as can be: the JSON objects anywhere in the user
    messages whose content is written in a slot's form, those with a handle taken for
    memories (shown with every candidate); the exchange, the last user message's text."""
    messages: list[dict[str, Any]] = body.get("messages") or []
    users = [message_text(m) for m in messages if m.get("role") == "user"]
    last = users[-1] if users else ""
    try:
        data = json.loads(last)
    except ValueError:
        data = None
    if isinstance(data, dict) and isinstance(data.get("exchange"), list):
        turns = [t for t in data["exchange"] if isinstance(t, dict)]
        said = [_string(t, _CONTENT_KEYS) for t in turns if t.get("role") == "user"]
        return Prompt(exchange="\n".join(said))
    if isinstance(data, dict) and isinstance(data.get("candidates"), list):
        prompt = Prompt()
        for position, entry in enumerate(data["candidates"]):
            if not isinstance(entry, dict):
                continue
            index = entry.get("candidate", position)
            shown: list[Any] = next(
                (entry[k] for k in _MEMORY_LISTS if isinstance(entry.get(k), list)), []
            )
            memories = [
                (_string(m, _HANDLE_KEYS), _string(m, _CONTENT_KEYS))
                for m in shown
                if isinstance(m, dict)
            ]
            prompt.asked.append(
                Asked(
                    int(index) if isinstance(index, int) else position,
                    fact_of(_string(entry, _CONTENT_KEYS)),
                    memories,
                )
            )
        return prompt
    return _read_any(users)


def _read_any(users: Sequence[str]) -> Prompt:
    found: list[Fact] = []
    memories: list[tuple[str, str]] = []
    for text in users:
        for value in _json_values(text):
            for entry in _walk(value):
                content = next(
                    (
                        str(entry[k])
                        for k in _CONTENT_KEYS
                        if isinstance(entry.get(k), str) and fact_of(str(entry[k])) is not None
                    ),
                    "",
                )
                fact = fact_of(content) if content else None
                if fact is None:
                    continue
                handle = _string(entry, _HANDLE_KEYS)
                if handle:
                    memories.append((handle, content))
                else:
                    found.append(fact)
    return Prompt(
        exchange=users[-1] if users else "",
        asked=[Asked(i, fact, memories) for i, fact in enumerate(found)],
    )


# ---------------------------------------------------------------------------------
# Answering as a schema asks.


def _schema(body: dict[str, Any]) -> dict[str, Any] | None:
    response_format = body.get("response_format")
    if not isinstance(response_format, dict) or response_format.get("type") != "json_schema":
        return None
    wrapper = response_format.get("json_schema") or {}
    schema = wrapper.get("schema") if isinstance(wrapper, dict) else None
    return schema if isinstance(schema, dict) else {}


def kind_of_call(body: dict[str, Any]) -> str:
    schema = _schema(body)
    if schema is None:
        return CHAT
    return DECISIONS if '"invalidate"' in json.dumps(schema).lower() else CANDIDATES


def _resolve(schema: dict[str, Any], root: dict[str, Any]) -> dict[str, Any]:
    reference = schema.get("$ref")
    if isinstance(reference, str) and reference.startswith("#/"):
        target: Any = root
        for step in reference[2:].split("/"):
            target = target.get(step, {}) if isinstance(target, dict) else {}
        return _resolve(target, root) if isinstance(target, dict) else {}
    for key in ("anyOf", "oneOf"):
        options = schema.get(key)
        if isinstance(options, list):
            # The first option that is not null: what a value is filled as.
            for option in options:
                if isinstance(option, dict) and option.get("type") != "null":
                    return _resolve(option, root)
    return schema


def _types(schema: dict[str, Any]) -> list[str]:
    kind = schema.get("type")
    if isinstance(kind, list):
        return [str(k) for k in kind]
    return [str(kind)] if isinstance(kind, str) else []


def _nullable(schema: dict[str, Any]) -> bool:
    if "null" in _types(schema):
        return True
    options = schema.get("anyOf") or schema.get("oneOf") or []
    return any(isinstance(o, dict) and o.get("type") == "null" for o in options)


def _pick(enum: list[Any], wanted: str) -> Any:
    for option in enum:
        if str(option).lower() == wanted.lower():
            return option
    for option in enum:
        if wanted.lower() in str(option).lower() or str(option).lower() in wanted.lower():
            return option
    return enum[0]


def fill(schema: dict[str, Any], meaning: dict[str, Any], root: dict[str, Any]) -> Any:
    """A value of ``schema`` saying ``meaning`` (keys: a property's name or one of its
    usual synonyms); what the meaning does not say gets the type's plain value (null
    where allowed)."""
    schema = _resolve(schema, root)
    if "enum" in schema and isinstance(schema["enum"], list) and schema["enum"]:
        return _pick(schema["enum"], str(meaning.get("", "")))
    types = _types(schema)
    if "object" in types or "properties" in schema:
        out: dict[str, Any] = {}
        properties = schema.get("properties") or {}
        for name, inner in properties.items():
            said = _said(name, meaning)
            value_schema = inner if isinstance(inner, dict) else {}
            if said is _UNSAID:
                if _nullable(value_schema):
                    out[name] = None
                    continue
                said = None
            out[name] = fill(value_schema, {"": said} if not isinstance(said, dict) else said, root)
        return out
    said = meaning.get("")
    if "array" in types:
        items: dict[str, Any] = schema["items"] if isinstance(schema.get("items"), dict) else {}
        listed = said if isinstance(said, list) else []
        return [fill(items, m if isinstance(m, dict) else {"": m}, root) for m in listed]
    if "number" in types or "integer" in types:
        number = said if isinstance(said, int | float) and not isinstance(said, bool) else 0
        return int(number) if "integer" in types and "number" not in types else number
    if "boolean" in types:
        return bool(said)
    if said is None and _nullable(schema):
        return None
    return "" if said is None else str(said)


_UNSAID: Final = object()
#: What a property may be called for each thing the scripted model says.
SYNONYMS: Final[dict[str, tuple[str, ...]]] = {
    "content": ("content", "fact", "text", "statement", "memory", "candidate_text"),
    "category": ("category", "kind", "type"),
    "confidence": ("confidence", "certainty", "score"),
    "action": ("action", "decision", "operation", "op", "event"),
    "replaces": (
        "replaces",
        "target",
        "memory_item",
        "memory_id",
        "existing",
        "existing_id",
        "item",
        "memory_name",
        "id",
    ),
    "candidate": ("candidate", "candidate_index", "index", "candidate_id"),
    "reason": ("reason", "why", "rationale", "explanation"),
    "valid_time": ("valid_time", "valid_from", "since", "when"),
    "candidates": ("candidates", "facts", "memories", "items"),
    "decisions": ("decisions", "actions", "results", "items"),
}


def _said(name: str, meaning: dict[str, Any]) -> Any:
    if name in meaning:
        return meaning[name]
    lowered = name.lower()
    for said, names in SYNONYMS.items():
        if lowered in names and said in meaning:
            return meaning[said]
    return _UNSAID


def answer_forming(body: dict[str, Any]) -> str:
    """The JSON text the scripted model answers a forming call with."""
    schema = _schema(body) or {}
    prompt = read_prompt(body)
    if kind_of_call(body) == CANDIDATES:
        facts = facts_said(prompt.exchange)
        meaning: dict[str, Any] = {
            "candidates": [
                {
                    "content": fact.content,
                    "category": {"": fact.slot.category},
                    "confidence": CONFIDENCE,
                }
                for fact in facts
            ]
        }
    else:
        decisions = []
        for asked in prompt.asked:
            action, replaces, reason = (
                decide(asked.fact, asked.memories)
                if asked.fact is not None
                else ("none", "", "not a fact the rules know")
            )
            decisions.append(
                {
                    "candidate": asked.index,
                    "action": {"": action},
                    "replaces": replaces or None,
                    "reason": reason,
                }
            )
        meaning = {"decisions": decisions}
    return json.dumps(fill(schema, meaning, schema), separators=(",", ":"))


# ---------------------------------------------------------------------------------
# The servers and their counts.


@dataclass
class Counts:
    """What the model was asked, by kind of call."""

    requests: Counter[str] = field(default_factory=Counter)
    prompt_tokens: Counter[str] = field(default_factory=Counter)
    completion_tokens: Counter[str] = field(default_factory=Counter)
    #: Forming answers that did not parse as JSON (pass-through), or requests refused.
    failures: Counter[str] = field(default_factory=Counter)
    #: Seconds the upstream took to answer whole, by kind (pass-through).
    seconds: defaultdict[str, float] = field(default_factory=lambda: defaultdict(float))

    def as_json(self) -> dict[str, Any]:
        return {
            "requests": dict(self.requests),
            "prompt_tokens": dict(self.prompt_tokens),
            "completion_tokens": dict(self.completion_tokens),
            "failures": dict(self.failures),
            "seconds": {k: round(v, 3) for k, v in self.seconds.items()},
        }

    def add_usage(self, kind: str, usage: Any) -> None:
        if isinstance(usage, dict):
            self.prompt_tokens[kind] += int(usage.get("prompt_tokens") or 0)
            self.completion_tokens[kind] += int(usage.get("completion_tokens") or 0)


def prompt_tokens(body: dict[str, Any]) -> int:
    """The request's tokens as the scripted model charges them (see the module's doc)."""
    total = sum(
        _COUNTER.count(message_text(m)) + MESSAGE_OVERHEAD for m in body.get("messages") or []
    )
    if body.get("response_format"):
        total += _COUNTER.count(json.dumps(body["response_format"]))
    return total


def scripted(counts: Counts) -> FakeOpenAI:
    def answer(body: dict[str, Any]) -> Reply:
        kind = kind_of_call(body)
        text = CHAT_ANSWER if kind == CHAT else answer_forming(body)
        used = (prompt_tokens(body), _COUNTER.count(text))
        counts.prompt_tokens[kind] += used[0]
        counts.completion_tokens[kind] += used[1]
        # Whole JSON in one chunk when streamed: its spaces are the JSON's own.
        return Reply.text(text, usage=used, chunk_words=10_000 if kind != CHAT else 1)

    def arrived(request: Received) -> None:
        body = request.body if isinstance(request.body, dict) else {}
        counts.requests[kind_of_call(body)] += 1

    return FakeOpenAI(default=answer, on_request=arrived)


async def passthrough(counts: Counts, upstream: str, api_key: str) -> tuple[Any, int]:
    """An aiohttp server sending every request on to ``upstream``; (its runner, its port)."""
    import aiohttp
    from aiohttp import web

    session = aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=600, sock_connect=30),
        connector=aiohttp.TCPConnector(limit=1000),
    )
    target = upstream.rstrip("/")

    async def forward(request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        try:
            body = json.loads(raw)
        except ValueError:
            body = {}
        kind = kind_of_call(body if isinstance(body, dict) else {})
        counts.requests[kind] += 1
        headers = {"Content-Type": "application/json"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        started = time.monotonic()
        path = request.path.removeprefix("/v1")
        async with session.post(f"{target}{path}", data=raw, headers=headers) as upstream_answer:
            response = web.StreamResponse(status=upstream_answer.status)
            response.content_type = upstream_answer.content_type
            await response.prepare(request)
            streamed = b""
            async for piece in upstream_answer.content.iter_any():
                streamed += piece
                await response.write(piece)
            await response.write_eof()
        counts.seconds[kind] += time.monotonic() - started
        _count_answer(counts, kind, upstream_answer.status, streamed)
        return response

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/v1/chat/completions", forward)
    app.on_cleanup.append(lambda _app: session.close())
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    server = site._server  # aiohttp keeps the bound socket here
    assert server is not None
    port = int(server.sockets[0].getsockname()[1])  # type: ignore[attr-defined]
    return runner, port


def _count_answer(counts: Counts, kind: str, status: int, raw: bytes) -> None:
    """Usage and, for a forming call, whether its answer was JSON (from a whole answer or
    a stream of server-sent events)."""
    if status != 200:
        counts.failures[f"{kind} HTTP {status}"] += 1
        return
    text = raw.decode(errors="replace")
    content = ""
    if text.lstrip().startswith("{"):
        with contextlib.suppress(ValueError):
            whole = json.loads(text)
            counts.add_usage(kind, whole.get("usage"))
            choices = whole.get("choices") or [{}]
            content = str((choices[0].get("message") or {}).get("content") or "")
    else:
        for line in text.splitlines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            with contextlib.suppress(ValueError):
                chunk = json.loads(line[6:])
                counts.add_usage(kind, chunk.get("usage"))
                for choice in chunk.get("choices") or ():
                    content += str((choice.get("delta") or {}).get("content") or "")
    if kind != CHAT:
        try:
            json.loads(content)
        except ValueError:
            counts.failures[f"{kind} not JSON"] += 1


async def main_async(args: argparse.Namespace) -> None:
    counts = Counts()
    fake: FakeOpenAI | None = None
    runner: Any = None
    if args.upstream:
        runner, port = await passthrough(counts, args.upstream, args.api_key or "")
    else:
        fake = scripted(counts)
        await fake.start()
        port = fake.port
    print(json.dumps({"url": f"http://127.0.0.1:{port}/v1"}), flush=True)
    loop = asyncio.get_running_loop()
    try:
        while line := await loop.run_in_executor(None, sys.stdin.readline):
            command = json.loads(line)
            if command.get("reset"):
                counts = _reset(counts)
            print(json.dumps(counts.as_json()), flush=True)
    finally:
        if fake is not None:
            await fake.close()
        if runner is not None:
            await runner.cleanup()


def _reset(counts: Counts) -> Counts:
    for counter in (
        counts.requests,
        counts.prompt_tokens,
        counts.completion_tokens,
        counts.failures,
        counts.seconds,
    ):
        counter.clear()
    return counts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else "")
    parser.add_argument("--upstream", help="pass every request on to this OpenAI-compatible URL")
    parser.add_argument("--api-key", help="the upstream's bearer key")
    asyncio.run(main_async(parser.parse_args()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
