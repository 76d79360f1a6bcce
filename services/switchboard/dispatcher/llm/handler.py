"""The ``llm`` handler: answers with an OpenAI-compatible Chat Completions provider.

A run is one or more model calls. Deltas are relayed as they arrive and the
run ends with one ``result`` that carries the last call's whole answer, the
token usage summed over every call and its price from the configured table.

This module composes the handler from parts that each do one job:

- ``llmconfig``: the providers, prices and limits, parsed from settings;
- ``llmrequest``: the run's context as Chat Completions messages, its sampling;
- ``llmclient``: one model call along the provider chain, with retries,
  fallback and a circuit breaker per provider (``llmstream`` parses the
  responses: server-sent events, chunks, tool call fragments);
- ``llmtools``: the tools offered and each tool step of the run;
- ``llmusage``: usage (reported or estimated) and cost.

The settings' names stay importable from here, the handler's public module.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import replace

from switchboard.api.context.v1 import context_pb2
from switchboard.api.dispatcher.v1 import dispatcher_pb2
from switchboard.api.handler.v1 import handler_pb2
from switchboard.dispatcher.handlers.base import Frame, HandleCall, HandlerFailure, capabilities
from switchboard.dispatcher.llm.client import Answer, ProviderClient
from switchboard.dispatcher.llm.config import LlmConfig, Provider, parse_prices, parse_providers
from switchboard.dispatcher.llm.request import (
    build_messages,
    parameters_schema,
    request_body,
    sampling_of,
)
from switchboard.dispatcher.llm.tools import ToolLoop
from switchboard.dispatcher.llm.usage import Price, Tally, estimate_tokens

__all__ = [
    "LlmConfig",
    "LlmHandler",
    "Price",
    "Provider",
    "build_messages",
    "estimate_tokens",
    "parse_prices",
    "parse_providers",
]


class LlmHandler:
    """Answers with the first provider of the chain that can.

    ``count`` is the offline token estimator used when a provider reports no
    usage (pass the context service's counter so estimates match budgets);
    ``clock``, ``sleep`` and ``rng`` exist so tests can drive time and jitter.
    """

    kind = dispatcher_pb2.HANDLER_KIND_LLM

    def __init__(
        self,
        config: LlmConfig,
        *,
        count: Callable[[str], int] = estimate_tokens,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rng: random.Random | None = None,
        max_context_tokens: int = 8000,
    ) -> None:
        self._config = config
        self._count = count
        self._client = ProviderClient(config, clock=clock, sleep=sleep, rng=rng)
        caps = capabilities(
            "llm",
            "Language model",
            "Answers in natural language with a hosted language model "
            f"({config.providers[0].label}).",
            topics=("general", "chat"),
            max_context_tokens=max_context_tokens,
        )
        caps.parameters_schema.CopyFrom(parameters_schema(config.max_output_tokens))
        self._capabilities = caps

    @property
    def capabilities(self) -> handler_pb2.HandlerCapabilities:
        return self._capabilities

    @property
    def config(self) -> LlmConfig:
        return self._config

    def available(self) -> bool:
        return self._client.available()

    def breaker_state(self, provider_name: str) -> str:
        """``closed``, ``open`` or ``half-open``; ``KeyError`` for an unknown provider."""
        return self._client.breaker_state(provider_name)

    async def aclose(self) -> None:
        """Close the connection pool; later calls fail."""
        await self._client.aclose()

    async def handle(self, call: HandleCall) -> AsyncGenerator[Frame, None]:
        request = call.request
        sampling = sampling_of(request, self._config.max_output_tokens)
        chain = self._chain(request.model)
        tools = ToolLoop(call)
        messages = build_messages(request)
        # Text shown before a restart counts as shown: the run's answer has begun.
        shown = any(step.text for step in request.steps)
        usage = Tally(self._count)
        await tools.resume(messages)
        while True:
            extra = tools.offer()
            answer = Answer(shown=shown)
            async with contextlib.aclosing(
                self._client.ask(
                    chain, request_body(messages, sampling, extra), call.remaining, answer
                )
            ) as texts:
                async for text in texts:
                    yield Frame(delta=handler_pb2.TextDelta(text=text))
            shown = answer.shown
            outcome, provider = answer.outcome, answer.provider
            if provider is None:
                raise RuntimeError("a model call ended without an answer or a failure")
            made = outcome.tool_calls()
            usage.add(
                reported=outcome.usage,
                price=self._config.price_of(provider),
                messages=messages,
                tools=extra.get("tools"),
                text="".join(outcome.pieces),
                calls=((call_made.name, call_made.arguments) for call_made in made),
            )
            if not made:
                yield Frame(
                    result=handler_pb2.HandleResult(
                        parts=[context_pb2.ContentPart(text="".join(outcome.pieces))],
                        usage=usage.usage(provider.label),
                        finish_reason=outcome.finish_reason or "stop",
                    )
                )
                return
            await tools.step(messages, "".join(outcome.pieces), made)

    def model_label(self, settings: handler_pb2.ModelSettings | None) -> str:
        """``provider/model`` a run with these settings asks first (DescribeConversation)."""
        try:
            return self._chain(settings or handler_pb2.ModelSettings())[0].label
        except HandlerFailure:
            return ""

    def _chain(self, settings: handler_pb2.ModelSettings) -> tuple[Provider, ...]:
        """The providers in the order to try: the assistant's choice first, with
        its model, then the rest of the configured chain as fallback."""
        providers = list(self._config.providers)
        if settings.provider:
            names = [provider.name for provider in providers]
            if settings.provider not in names:
                raise HandlerFailure(
                    f"the model provider {settings.provider[:100]!r} is not configured "
                    f"(configured: {', '.join(names)})"
                )
            providers.insert(0, providers.pop(names.index(settings.provider)))
        if settings.model:
            if len(settings.model) > 256 or not settings.model.strip():
                raise HandlerFailure("the assistant's model name must be 1 to 256 characters")
            providers[0] = replace(providers[0], model=settings.model)
        return tuple(providers)
