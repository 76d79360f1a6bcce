"""Reading a Chat Completions response: server-sent events, chunks, tool calls.

What one attempt at a provider produced is an ``Outcome``: the text pieces,
the finish reason, the reported usage and the tool calls as their fragments
arrive. Anything a well-behaved server would not send raises ``AttemptFailed``
(retryable: another attempt, or another provider, may answer properly).

No HTTP here: the client hands in the body's bytes through a reader that
already bounds each read by the run's deadline, so the parsing is the same for
every transport and testable on its own.
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Final

from switchboard.dispatcher.llm.usage import read_usage
from switchboard.platform.values import jsonbounds
from switchboard.platform.values.jsonbounds import JsonRejected

# Provider error messages are relayed for diagnosis, but only this much of them:
# an HTML error page from a proxy is noise, and long bodies can echo the prompt.
MAX_DETAIL_CHARS: Final = 200
# More calls than this in one answer is a broken stream, not a plan: the
# dispatcher's own per-step limit is far lower and answers the extra ones.
MAX_TOOL_CALLS: Final = 128


class AttemptFailed(Exception):
    """One attempt at one provider failed; says whether another attempt may help."""

    def __init__(
        self,
        summary: str,
        *,
        retryable: bool,
        counts: bool = True,
        retry_after: float | None = None,
        deadline: bool = False,
    ) -> None:
        super().__init__(summary)
        self.summary = summary
        self.retryable = retryable
        #: Whether it counts against the provider's circuit breaker.
        self.counts = counts
        self.retry_after = retry_after
        #: The run's deadline passed: no provider can help any more.
        self.deadline = deadline


def deadline_failure() -> AttemptFailed:
    return AttemptFailed("run deadline reached", retryable=False, counts=False, deadline=True)


def malformed(what: str) -> AttemptFailed:
    return AttemptFailed(f"malformed stream ({what})", retryable=True)


@dataclass
class _CallParts:
    """One tool call of an answer, as its fragments arrive."""

    id: str = ""
    name: str = ""
    arguments: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ModelCall:
    """A complete tool call as the model made it."""

    id: str
    name: str
    #: The arguments' JSON text, as sent.
    arguments: str


@dataclass
class Outcome:
    """What one attempt produced so far."""

    pieces: list[str] = field(default_factory=list)
    finish_reason: str = ""
    #: ``(prompt_tokens, completion_tokens)`` as the provider reported them.
    usage: tuple[int, int] | None = None
    done: bool = False
    #: Tool calls by the stream's ``index``.
    calls: dict[int, _CallParts] = field(default_factory=dict)
    argument_chars: int = 0
    #: The provider's id of the response (``chatcmpl-...``), if it gave one:
    #: journaled with the step it made (docs/dispatcher.md, "Durable runs").
    response_id: str = ""

    def tool_calls(self) -> list[ModelCall]:
        return [
            ModelCall(parts.id, parts.name, "".join(parts.arguments))
            for _, parts in sorted(self.calls.items())
        ]


def scrub(text: str, secrets: tuple[str, ...]) -> str:
    """One line, at most ``MAX_DETAIL_CHARS``, with every secret replaced."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "[redacted]")
    line = " ".join(text.split())
    if len(line) > MAX_DETAIL_CHARS:
        line = line[: MAX_DETAIL_CHARS - 3] + "..."
    return line


def error_detail(body: bytes) -> tuple[str, str]:
    """``(message, code)`` of an OpenAI-style error body, or its raw text."""
    text = body.decode("utf-8", errors="replace")
    try:
        # Callers bound the body (an error body's first bytes, a chunk of the stream):
        # only its depth is checked here (a character is at most 4 bytes).
        data = jsonbounds.loads(text, max_bytes=4 * len(text))
    except JsonRejected:
        return text, ""
    error = data.get("error") if isinstance(data, dict) else None
    if isinstance(error, dict):
        message = error.get("message")
        code = error.get("code") or error.get("type") or ""
        return (message if isinstance(message, str) else text), str(code)
    if isinstance(error, str):
        return error, ""
    return text, ""


def _rejected(rejected: JsonRejected, not_json: str, what: str) -> str:
    """What was wrong with a piece of the answer, in words ("a chunk nested deeper
    than 24 levels"); the piece itself is never quoted."""
    return not_json if rejected.problem == "syntax" else f"{what} {rejected}"


def _optional_string(data: dict[str, Any], key: str, what: str) -> str:
    value = data.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise malformed(f"{what} is not a string")
    return value


def _add_call_fragment(entry: object, position: int | None, outcome: Outcome, limit: int) -> None:
    """Merge one ``tool_calls`` entry into the answer's calls.

    Streamed entries are keyed by ``index``: the first fragment of a call has
    its ``id`` and ``function.name``, later ones add pieces of
    ``function.arguments``. A whole message's entries (``position`` given) are
    complete calls. As the official SDKs do, ``id`` and ``name`` replace and
    ``arguments`` append, so servers that repeat the id on every fragment work too.
    """
    if not isinstance(entry, dict):
        raise malformed("a tool call is not an object")
    index = entry.get("index") if position is None else position
    if not isinstance(index, int) or isinstance(index, bool) or index < 0:
        raise malformed("a tool call without an index")
    parts = outcome.calls.get(index)
    if parts is None:
        if len(outcome.calls) >= MAX_TOOL_CALLS:
            raise malformed(f"more than {MAX_TOOL_CALLS} tool calls in one answer")
        parts = outcome.calls[index] = _CallParts()
    parts.id = _optional_string(entry, "id", "a tool call id") or parts.id
    function = entry.get("function")
    if function is None:
        return
    if not isinstance(function, dict):
        raise malformed("a tool call's function is not an object")
    parts.name = _optional_string(function, "name", "a function name") or parts.name
    arguments = function.get("arguments")
    if isinstance(arguments, dict):
        # Some compatible servers send the object itself instead of its JSON text.
        function = {"arguments": json.dumps(arguments, ensure_ascii=False)}
    arguments = _optional_string(function, "arguments", "function arguments")
    outcome.argument_chars += len(arguments)
    if outcome.argument_chars > limit:
        raise AttemptFailed(f"tool call arguments larger than {limit} bytes", retryable=True)
    if arguments:
        parts.arguments.append(arguments)


def check_calls(outcome: Outcome) -> None:
    """A finished answer's calls must each name a function: nothing can run a nameless one."""
    if any(not parts.name for parts in outcome.calls.values()):
        raise malformed("a tool call without a function name")


def _choice_text(choice: object, outcome: Outcome, limit: int) -> str:
    """The text of one streamed choice (only the first choice is used); records its
    tool call fragments and its finish."""
    if not isinstance(choice, dict):
        raise malformed("a choice is not an object")
    if choice.get("index", 0) != 0:
        return ""
    delta = choice.get("delta") or {}
    if not isinstance(delta, dict):
        raise malformed("a delta is not an object")
    fragments = delta.get("tool_calls")
    if fragments is not None:
        if not isinstance(fragments, list):
            raise malformed("tool_calls is not a list")
        for entry in fragments:
            _add_call_fragment(entry, None, outcome, limit)
    text = delta.get("content")
    if text is None:
        # A refusal is the model's answer too; without it the user sees nothing.
        text = delta.get("refusal")
    if text is not None and not isinstance(text, str):
        raise malformed("content is not a string")
    reason = choice.get("finish_reason")
    if isinstance(reason, str) and reason:
        outcome.finish_reason = reason
    return text or ""


def parse_completion(body: bytes, outcome: Outcome, limit: int) -> str:
    """The text of a whole (not streamed) ``chat.completion``; records its
    calls, finish and usage in ``outcome``."""
    try:
        data = jsonbounds.loads(body, max_bytes=limit)
    except JsonRejected as rejected:
        raise malformed(_rejected(rejected, "not a chat completion", "the answer")) from None
    try:
        choice = data["choices"][0]
        text = choice["message"].get("content") or ""
        reason = choice.get("finish_reason") or ""
        calls = choice["message"].get("tool_calls") or []
    except (KeyError, IndexError, TypeError, AttributeError):
        raise malformed("not a chat completion") from None
    if not isinstance(text, str) or not isinstance(reason, str) or not isinstance(calls, list):
        raise malformed("not a chat completion")
    for position, entry in enumerate(calls):
        _add_call_fragment(entry, position, outcome, limit)
    outcome.finish_reason = reason
    outcome.usage = read_usage(data.get("usage"))
    outcome.response_id = _response_id(data)
    outcome.done = True
    return text


async def events(
    read: Callable[[], Awaitable[bytes | None]], limit: int
) -> AsyncGenerator[bytes, None]:
    """The ``data`` of each server-sent event of the body ``read`` returns piece
    by piece (``None`` at its end), bounded in total size by ``limit`` bytes.

    Bytes, not text: the JSON decoder reads UTF-8 itself (``parse_chunk``). A read
    that holds whole events, each one ``data:`` line (what providers send, a chunk
    an event), is cut into them by ``split`` without a Python step per line.
    """
    received = 0
    # The body after its last line break: a line not complete yet.
    partial = bytearray()
    # The ``data`` lines of an event not complete yet.
    data: list[bytes] = []
    while (chunk := await read()) is not None:
        received += len(chunk)
        if received > limit:
            raise AttemptFailed(f"response larger than {limit} bytes", retryable=True)
        chunk = _whole_lines(chunk, partial)
        if not data and chunk.endswith(b"\n\n") and b"\r" not in chunk:
            # Whole events: each one line is its data; any other goes line by line.
            for event in chunk[:-2].split(b"\n\n"):
                if event.startswith(b"data:") and b"\n" not in event:
                    yield _checked(event[5:].removeprefix(b" "))
                elif event:
                    _lines(event, data)
                    if data:
                        yield b"\n".join(data)
                        data = []
            continue
        for ended in chunk.split(b"\n")[:-1]:
            if line := ended.rstrip(b"\r"):
                _line(line, data)
            elif data:
                yield b"\n".join(data)
                data = []
    tail = bytes(partial).rstrip(b"\r")
    if tail.startswith(b"data:"):
        # A last event without its blank line: lenient servers end this way.
        value = tail[5:].removeprefix(b" ")
        data.append(value.decode("utf-8", errors="replace").encode("utf-8"))
    if data:
        yield b"\n".join(data)


def _whole_lines(chunk: bytes, partial: bytearray) -> bytes:
    """The whole lines of ``partial`` (a line not complete yet) and ``chunk`` after it,
    empty if none; what follows the last line break is kept in ``partial``."""
    if partial:
        partial += chunk
        if b"\n" not in chunk:
            return b""
        chunk = bytes(partial)
        partial.clear()
    end = chunk.rfind(b"\n") + 1
    if end < len(chunk):
        partial += chunk[end:]
        return chunk[:end]
    return chunk


def _checked(value: bytes) -> bytes:
    """An event's data, which must be UTF-8 (ASCII, as it is nearly always, needs no decoding)."""
    if not value.isascii():
        try:
            value.decode("utf-8")
        except UnicodeDecodeError:
            raise malformed("not UTF-8") from None
    return value


def _line(line: bytes, data: list[bytes]) -> None:
    """One line of an event (not blank, without its line break): its data kept in ``data``."""
    name, _, value = line.partition(b":")
    if name == b"data":
        data.append(_checked(value.removeprefix(b" ")))
    # Comments (":" keep-alives), "event", "id" and "retry" carry nothing this API uses.


def _lines(event: bytes, data: list[bytes]) -> None:
    """The lines of one event (without the blank line that ends it): their data kept in
    ``data``. A blank line here can only lead the event, after the one that ended the last."""
    for line in event.split(b"\n"):
        if line:
            _line(line, data)


def parse_chunk(
    data: bytes | str, outcome: Outcome, limit: int, secrets: tuple[str, ...]
) -> list[str]:
    """The text pieces of one ``chat.completion.chunk``; records finish and usage.

    ``secrets`` are scrubbed from an error the provider sends in the stream."""
    try:
        # A chunk a token: orjson, a fifth of json's CPU (jsonbounds.loads_fast).
        chunk = jsonbounds.loads_fast(data, max_bytes=limit)
    except JsonRejected as rejected:
        raise malformed(_rejected(rejected, "a chunk is not JSON", "a chunk")) from None
    if not isinstance(chunk, dict):
        raise malformed("a chunk is not an object")
    if "error" in chunk:
        message, _code = error_detail(json.dumps(chunk).encode())
        raise AttemptFailed(f"error in stream ({scrub(message, secrets)})", retryable=True)
    choices = chunk.get("choices") or []
    if not isinstance(choices, list):
        raise malformed("choices is not a list")
    texts = [text for choice in choices if (text := _choice_text(choice, outcome, limit))]
    usage = read_usage(chunk.get("usage"))
    if usage is not None:
        outcome.usage = usage
    if not outcome.response_id:
        outcome.response_id = _response_id(chunk)
    return texts


#: Longest response id kept (the journal stores it; providers use a few dozen characters).
_MAX_RESPONSE_ID_CHARS = 200


def _response_id(data: dict[str, object]) -> str:
    """The response's ``id`` if it is a string of sane length, else ''."""
    found = data.get("id")
    if isinstance(found, str) and len(found) <= _MAX_RESPONSE_ID_CHARS:
        return found
    return ""
