"""Usage and cost of the ``llm`` handler's model calls.

A run's usage is the sum over every model call it makes (a run with tools asks
the model several times). Each call counts what the provider reported in its
usage chunk; when it reported nothing, the offline estimator counts what was
sent and received instead, and the run's usage says it is an estimate. The
price table turns tokens into US dollars; a call of a model it has no price for
is counted as unpriced (a model priced at 0 is priced: it is free).

Pure: no I/O, no HTTP, so the counting can be checked without a provider.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Final

from switchboard.api.handler.v1 import handler_pb2

# Chat formats wrap each message in role markers; the estimate counts them as
# the context service's counter does, so estimates and window budgets agree.
MESSAGE_OVERHEAD: Final = 4
#: The tokens an image is estimated at: OpenAI's high-detail cost of a 1024x1024 image
#: (4 tiles of 170 plus 85 = 765), the same fixed cost the context window counts.
IMAGE_TOKENS: Final = 765
# Usage travels as int32 fields; a provider's absurd count is capped, not wrapped.
INT32_MAX: Final = 2**31 - 1


def estimate_tokens(text: str) -> int:
    """The four-characters-a-token rule: the fallback when no counter is given."""
    return -(-len(text) // 4)


@dataclass(frozen=True)
class Price:
    """US dollars per million tokens."""

    input_per_mtok: float
    output_per_mtok: float

    def __post_init__(self) -> None:
        for value in (self.input_per_mtok, self.output_per_mtok):
            if not (math.isfinite(value) and value >= 0):
                raise ValueError("prices must be finite and not negative")

    def cost_micros(self, input_tokens: int, output_tokens: int) -> int:
        """The cost in micro-dollars (dollars per million tokens times tokens),
        rounded up: budgets count integers, and a reservation never undercounts.
        Rounded to a millionth first, so a float's error (0.7 * 10 is
        7.000000000000001) does not add a micro-dollar."""
        exact = input_tokens * self.input_per_mtok + output_tokens * self.output_per_mtok
        return math.ceil(round(exact, 6))


def _int32(value: object) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return min(value, INT32_MAX)
    return None


def read_usage(data: object) -> tuple[int, int] | None:
    """``(prompt_tokens, completion_tokens)`` of a provider's ``usage`` object,
    or ``None`` when it is missing or not usable."""
    if not isinstance(data, dict):
        return None
    prompt, completion = _int32(data.get("prompt_tokens")), _int32(data.get("completion_tokens"))
    if prompt is None or completion is None:
        return None
    return prompt, completion


@dataclass
class Tally:
    """A run's usage and cost so far, over all its model calls."""

    #: The offline token counter (the context service's, so estimates match budgets).
    count: Callable[[str], int]
    input_tokens: int = 0
    output_tokens: int = 0
    #: Cost in micro-dollars, each call's rounded up (``Price.cost_micros``).
    cost_micros: int = 0
    estimated: bool = False
    #: Calls of a model the price table has no price for: their cost is not in
    #: ``cost_micros`` (``Usage.unpriced_calls``).
    unpriced_calls: int = 0

    def add(
        self,
        *,
        reported: tuple[int, int] | None,
        price: Price | None,
        messages: Iterable[dict[str, Any]],
        tools: object,
        text: str,
        calls: Iterable[tuple[str, str]],
    ) -> tuple[int, int, int]:
        """Add one model call: the provider's ``reported`` usage, else an estimate
        of the ``messages`` and ``tools`` sent and the ``text`` and
        ``(name, arguments)`` calls received, priced at ``price`` (None: the table
        has none, and the call is counted unpriced). Returns the call's own
        ``(input_tokens, output_tokens, cost_micros)`` (what its budget settles)."""
        if reported is not None:
            input_tokens, output_tokens = reported
        else:
            input_tokens = self.prompt_tokens(messages, tools)
            output_tokens = self.count(text) + sum(
                self.count(name) + self.count(arguments) for name, arguments in calls
            )
            self.estimated = True
        self.input_tokens += input_tokens
        self.output_tokens += output_tokens
        if price is None:
            micros = 0
            self.unpriced_calls += 1
        else:
            micros = price.cost_micros(input_tokens, output_tokens)
        self.cost_micros += micros
        return input_tokens, output_tokens, micros

    def prompt_tokens(self, messages: Iterable[dict[str, Any]], tools: object) -> int:
        """The estimated tokens of a request's ``messages`` and ``tools``."""
        tokens = sum(self._message_tokens(message) for message in messages)
        if tools is not None:
            tokens += self.count(json.dumps(tools, ensure_ascii=False))
        return tokens

    def usage(self, model: str) -> handler_pb2.Usage:
        """The run's usage as its result reports it, for ``model`` (``provider/model``)."""
        return handler_pb2.Usage(
            input_tokens=min(self.input_tokens, INT32_MAX),
            output_tokens=min(self.output_tokens, INT32_MAX),
            estimated_cost_usd=self.cost_micros / 1e6,
            cost_micros=self.cost_micros,
            model=model,
            estimated=self.estimated,
            unpriced_calls=min(self.unpriced_calls, INT32_MAX),
        )

    def _message_tokens(self, message: dict[str, Any]) -> int:
        content = message.get("content") or ""
        if isinstance(content, list):
            # A content array: its text parts, and each image at the fixed
            # estimate the context service counts it at (docs/files.md).
            tokens = MESSAGE_OVERHEAD
            for part in content:
                if part.get("type") == "image_url":
                    tokens += IMAGE_TOKENS
                else:
                    tokens += self.count(part.get("text") or "")
        else:
            tokens = self.count(content) + MESSAGE_OVERHEAD
        for tool_call in message.get("tool_calls", ()):
            function = tool_call["function"]
            tokens += self.count(function["name"]) + self.count(function["arguments"])
        return tokens
