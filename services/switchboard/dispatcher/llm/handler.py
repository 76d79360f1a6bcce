"""The ``llm`` handler: answers with an OpenAI-compatible Chat Completions provider.

A run is one or more model calls. Deltas are relayed as they arrive and the
run ends with one ``result`` that carries the last call's whole answer, the
token usage summed over every call and its price from the configured table.

This module composes the handler from parts that each do one job:

- ``config``: the providers, prices and limits, parsed from settings;
- ``conversation/``: ``messages``, the run's context as Chat Completions
  messages, and ``images`` the image files in it for vision models (notes for
  the others); ``tools``, the tools offered, each tool step of the run and the
  messages it adds to the conversation;
- ``client``: one model call along the provider chain, with retries,
  fallback and a circuit breaker per provider (``stream`` parses the
  responses: server-sent events, chunks, tool call fragments);
- ``usage``: usage (reported or estimated) and cost.

What only the handler uses stays here: the provider chain, the run's sampling
and the request body. A run reads top to bottom: the chain, the sampling, the
conversation, the tool steps already taken, then model calls until an answer
without tool calls.

The settings' names stay importable from here, the handler's public module.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any

from google.protobuf import struct_pb2

from switchboard.api.context.v1 import context_pb2
from switchboard.api.dispatcher.v1 import dispatcher_pb2
from switchboard.api.handler.v1 import handler_pb2
from switchboard.dispatcher.handlers.base import (
    Frame,
    HandleCall,
    HandlerFailure,
    StepBudget,
    capabilities,
)
from switchboard.dispatcher.llm.client import Answer, ProviderClient
from switchboard.dispatcher.llm.config import LlmConfig, Provider, parse_prices, parse_providers
from switchboard.dispatcher.llm.conversation.images import check_policy, load
from switchboard.dispatcher.llm.conversation.messages import build_messages, user_message
from switchboard.dispatcher.llm.conversation.tools import ToolLoop
from switchboard.dispatcher.llm.stream import ModelCall, Outcome
from switchboard.dispatcher.llm.usage import INT32_MAX, Price, Tally, estimate_tokens
from switchboard.platform.errors import ModelNotPriced

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

    @property
    def client(self) -> ProviderClient:
        """The provider client runs ask through: memory forming's calls share its
        connection pool, chain and breakers."""
        return self._client

    def available(self) -> bool:
        return self._client.available()

    def breaker_state(self, provider_name: str) -> str:
        """``closed``, ``open`` or ``half-open``; ``KeyError`` for an unknown provider."""
        return self._client.breaker_state(provider_name)

    async def aclose(self) -> None:
        """Close the connection pool; later calls fail."""
        await self._client.aclose()

    async def handle(self, call: HandleCall) -> AsyncGenerator[Frame, None]:
        run = await self._prepare(call)
        steering, tools, messages = run.steering, run.tools, run.messages
        while True:
            # The step boundary: steers sent since the last model call go in now,
            # after the step's tool results (docs/dispatcher.md, "Steering a live run").
            await steering.take(tools.steps + 1)
            extra = tools.offer()
            hold, asked, notice = await run.budget.reserve(
                run.usage.prompt_tokens(messages, extra.get("tools")), run.sampling
            )
            if notice is not None:
                yield notice
            answer = Answer(shown=run.shown)
            said: list[str] = []
            async with contextlib.aclosing(
                self._client.ask(
                    run.chain, request_body(messages, asked, extra), call.remaining, answer
                )
            ) as texts:
                # The steer race only for a run that restarts its stream: a plain run's
                # tokens pass no extra generator (one hop per token, issue 53's budget).
                source = steering.until_steered(texts) if steering.restarts else texts
                async for text in source:
                    # Set in place: a ``TextDelta`` passed in is built, then copied, at
                    # three to five times the CPU (measured), once per token.
                    frame = Frame()
                    frame.delta.text = text
                    said.append(text)
                    yield frame
            run.shown = answer.shown
            if steering.was_cut:
                # RESTART_STREAM: the call was cut for a steer, and is made again with
                # the steer, at the top of the loop.
                await self._charge_cut(run, answer, extra, "".join(said), hold)
                continue
            made = answer.outcome.tool_calls()
            provider = await self._settle(run, answer, extra, made, hold)
            if not made:
                yield Frame(result=_result(run, answer.outcome, provider))
                return
            await tools.step(messages, "".join(answer.outcome.pieces), made)

    async def _prepare(self, call: HandleCall) -> _Run:
        """The run before its first model call: the provider chain, the sampling, the
        conversation (its images read, its steers placed) and the tool steps already
        taken, replayed from the journal without asking the model again."""
        request = call.request
        chain = self._chain(request.model)
        sampling = sampling_of(request, self._config.max_output_tokens)
        window: dict[str, dict[str, Any]] = {}
        messages = build_messages(request, window)
        steering = _Steering(call, messages, window)
        # Images: refused here under the refuse policy, else read once for the run's calls.
        chain, images = check_policy(messages, chain, self._config)
        await load(images, call.files, self._config)
        tools = ToolLoop(call)
        budget = _CallBudget(
            call.budget, self._prices(chain, call.budget), self._config.min_output_tokens
        )
        await tools.resume(messages, steering.journaled_before)
        steering.journaled_before(tools.steps + 1)
        return _Run(
            call=call,
            chain=chain,
            sampling=sampling,
            messages=messages,
            steering=steering,
            tools=tools,
            budget=budget,
            usage=Tally(self._count),
            # Text shown before a restart counts as shown: the run's answer has begun.
            shown=any(step.text for step in request.steps),
        )

    async def _charge_cut(
        self, run: _Run, answer: Answer, extra: dict[str, Any], said: str, hold: str
    ) -> None:
        """A call cut for a steer: what it used is charged, estimated (a cut stream
        reports no usage)."""
        spent = run.usage.add(
            reported=None,
            price=self._config.price_of(answer.provider or run.chain[0]),
            messages=run.messages,
            tools=extra.get("tools"),
            text=said,
            calls=(),
        )
        await run.budget.settle(hold, spent)

    async def _settle(
        self,
        run: _Run,
        answer: Answer,
        extra: dict[str, Any],
        made: list[ModelCall],
        hold: str,
    ) -> Provider:
        """A model call that ended: its usage counted and charged, and told to the
        run's journal (``HandleCall.model_call``). Returns the provider that answered."""
        outcome, provider = answer.outcome, answer.provider
        if provider is None:
            raise RuntimeError("a model call ended without an answer or a failure")
        price = self._config.price_of(provider)
        spent = run.usage.add(
            reported=outcome.usage,
            price=price,
            messages=run.messages,
            tools=extra.get("tools"),
            text="".join(outcome.pieces),
            calls=((call_made.name, call_made.arguments) for call_made in made),
        )
        input_tokens, output_tokens, micros = spent
        await run.budget.settle(hold, spent)
        model_call = run.call.model_call
        if model_call is not None:
            model_call(
                handler_pb2.Usage(
                    input_tokens=min(input_tokens, INT32_MAX),
                    output_tokens=min(output_tokens, INT32_MAX),
                    cost_micros=micros,
                    estimated_cost_usd=micros / 1e6,
                    model=provider.label,
                    estimated=outcome.usage is None,
                    unpriced_calls=int(price is None),
                ),
                outcome.response_id,
            )
        return provider

    def _prices(self, chain: tuple[Provider, ...], budget: StepBudget | None) -> tuple[Price, ...]:
        """The chain's prices, when a budget applies. Under a cost cap every
        provider of the chain must have one: a fallback without a price could
        spend what nothing counts (``ModelNotPriced``, before any call)."""
        if budget is None:
            return ()
        prices = tuple(self._config.price_of(provider) for provider in chain)
        if budget.caps_cost:
            unpriced = [p.label for p, price in zip(chain, prices, strict=True) if price is None]
            if unpriced:
                raise ModelNotPriced(
                    f"a cost budget applies and {', '.join(unpriced)} has no price "
                    "(SWITCHBOARD_LLM_PRICES)"
                )
        return tuple(price for price in prices if price is not None)

    def priced(self, settings: handler_pb2.ModelSettings | None) -> bool:
        """Whether every provider a run with these settings may call has a price."""
        try:
            chain = self._chain(settings or handler_pb2.ModelSettings())
        except HandlerFailure:
            return True  # the run fails for that reason, not for its price
        return all(self._config.price_of(provider) is not None for provider in chain)

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


@dataclass
class _Run:
    """One run's parts, as its model calls use them."""

    call: HandleCall
    chain: tuple[Provider, ...]
    sampling: Sampling
    #: The conversation as the model reads it (Chat Completions messages).
    messages: list[dict[str, Any]]
    steering: _Steering
    tools: ToolLoop
    budget: _CallBudget
    usage: Tally
    #: Some of the answer was shown (this attempt's, or one before a restart).
    shown: bool


def _result(run: _Run, outcome: Outcome, provider: Provider) -> handler_pb2.HandleResult:
    """The run's result: the last call's whole answer, the usage of every call."""
    result = handler_pb2.HandleResult(
        parts=[context_pb2.ContentPart(text="".join(outcome.pieces))],
        usage=run.usage.usage(provider.label),
        finish_reason=outcome.finish_reason or "stop",
    )
    run.budget.show(result.usage)
    return result


class _Steering:
    """A run's steers (``HandleCall.steers``) into its model's messages, each once, in
    order, where the run took it: a steer whose message the window already holds (it
    was stored before the window was read) is moved from there."""

    def __init__(
        self, call: HandleCall, messages: list[dict[str, Any]], window: dict[str, dict[str, Any]]
    ) -> None:
        self._steers = call.steers
        self._messages = messages
        self._window = window
        self._journaled: dict[int, list[context_pb2.Message]] = {}
        #: The last model call was cut for a steer (RESTART_STREAM).
        self.was_cut = False
        if self._steers is not None:
            for step, message in self._steers.journaled():
                self._journaled.setdefault(step, []).append(message)
                self._drop(message.name)

    @property
    def restarts(self) -> bool:
        """The run cuts a model call in progress for a steer (STEER_MODE_RESTART_STREAM)."""
        return self._steers is not None and self._steers.restart

    def _drop(self, name: str) -> None:
        found = self._window.pop(name, None) if name else None
        if found is not None:
            self._messages[:] = [m for m in self._messages if m is not found]

    def _give(self, taken: list[context_pb2.Message]) -> None:
        for message in taken:
            self._drop(message.name)
            self._messages.append(user_message(message))

    def journaled_before(self, step: int) -> None:
        """A resumed run: the steers its journal says model call ``step`` read."""
        self._give(self._journaled.pop(step, []))

    async def take(self, step: int) -> None:
        self.was_cut = False
        if self._steers is not None:
            self._give(await self._steers.take(step))

    async def until_steered(self, texts: AsyncIterator[str]) -> AsyncIterator[str]:
        """``texts``, cut short (``was_cut``) when a steer arrives, if the run asked
        for STEER_MODE_RESTART_STREAM; else ``texts`` as they are."""
        steers = self._steers
        if steers is None or not steers.restart:
            async for text in texts:
                yield text
            return
        arrival = asyncio.ensure_future(steers.arrival())
        following: asyncio.Future[str] | None = None
        try:
            while True:
                following = asyncio.ensure_future(anext(texts))
                await asyncio.wait({following, arrival}, return_when=asyncio.FIRST_COMPLETED)
                if following.done():
                    try:
                        text = following.result()
                    except StopAsyncIteration:
                        return
                    yield text
                    continue
                self.was_cut = True
                steers.cut()
                return
        finally:
            arrival.cancel()
            if following is not None and not following.done():
                # Cut, or the run cancelled: the stream's read ends here, before the
                # stream itself is closed (it cannot be closed while it is read).
                following.cancel()
                with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                    await following


def _worst_cost(prices: tuple[Price, ...]) -> Callable[[int, int], int]:
    """What a model call of so many prompt and answer tokens may cost at most: at the
    highest price of the chain (a fallback may answer)."""

    def cost(prompt_tokens: int, answer_tokens: int) -> int:
        return max((price.cost_micros(prompt_tokens, answer_tokens) for price in prices), default=0)

    return cost


class _CallBudget:
    """The run's budget as its model calls use it (nothing to do without one), and
    the calls made with ``max_tokens`` lowered to fit it."""

    def __init__(self, budget: StepBudget | None, prices: tuple[Price, ...], least: int) -> None:
        self._budget = budget
        self._cost = _worst_cost(prices)
        #: The fewest answer tokens a call is lowered to (``LlmConfig.min_output_tokens``).
        self._least = least
        self.lowered = 0
        self.lowest = 0

    async def reserve(
        self, prompt_tokens: int, sampling: Sampling
    ) -> tuple[str, Sampling, Frame | None]:
        """Hold a call: the hold's id, the call's sampling (``max_tokens`` lowered near a
        budget's cap) and, when lowered, the progress frame that says so on the run."""
        if self._budget is None:
            return "", sampling, None
        held = await self._budget.reserve_call(
            prompt_tokens, sampling.max_tokens, self._least, self._cost
        )
        if held.max_tokens >= sampling.max_tokens:
            return held.hold, sampling, None
        self.lowered += 1
        self.lowest = min(self.lowest, held.max_tokens) if self.lowest else held.max_tokens
        frame = Frame()
        frame.progress.stage = (
            held.note or f"max_tokens lowered to {held.max_tokens} to fit the budget"
        )
        frame.progress.fraction = -1
        return held.hold, replace(sampling, max_tokens=held.max_tokens), frame

    async def settle(self, hold: str, spent: tuple[int, int, int]) -> None:
        """Charge a call ``spent`` (input tokens, output tokens, micro-units)."""
        if self._budget is not None:
            input_tokens, output_tokens, micros = spent
            await self._budget.settle(hold, micros, input_tokens, output_tokens)

    def show(self, usage: handler_pb2.Usage) -> None:
        """The lowered calls on the run's usage."""
        usage.budget_lowered_calls = min(self.lowered, INT32_MAX)
        usage.lowest_max_tokens = self.lowest


@dataclass(frozen=True)
class Sampling:
    temperature: float | None
    top_p: float | None
    max_tokens: int


def sampling_of(request: handler_pb2.HandleRequest, ceiling: int) -> Sampling:
    """The run's sampling: its parameters, else its assistant's settings, else
    the defaults; ``max_tokens`` never above the ceiling. Bad values fail the run."""
    settings = request.model
    temperature: float | None = None
    if settings.HasField("temperature"):
        temperature = settings.temperature
        if not 0 <= temperature <= 2:
            raise HandlerFailure("the assistant's temperature must be a number from 0 to 2")
    top_p: float | None = None
    if settings.HasField("top_p"):
        top_p = settings.top_p
        if not 0 <= top_p <= 1:
            raise HandlerFailure("the assistant's top_p must be a number from 0 to 1")
    max_tokens = ceiling
    if settings.max_output_tokens > 0:
        max_tokens = min(settings.max_output_tokens, ceiling)
    given_temperature, given_max = _parameters(request.parameters, ceiling)
    return Sampling(
        temperature=given_temperature if given_temperature is not None else temperature,
        top_p=top_p,
        max_tokens=given_max if given_max is not None else max_tokens,
    )


def _parameters(parameters: struct_pb2.Struct, ceiling: int) -> tuple[float | None, int | None]:
    """``(temperature, max_tokens)`` given in the run's parameters (``None``
    where not given); bad values fail the run."""
    fields = parameters.fields
    temperature: float | None = None
    if "temperature" in fields:
        value = fields["temperature"]
        if value.WhichOneof("kind") != "number_value" or not 0 <= value.number_value <= 2:
            raise HandlerFailure("parameter 'temperature' must be a number from 0 to 2")
        temperature = value.number_value
    max_tokens: int | None = None
    if "max_tokens" in fields:
        value = fields["max_tokens"]
        number = value.number_value
        if (
            value.WhichOneof("kind") != "number_value"
            or not math.isfinite(number)
            or not number.is_integer()
            or number < 1
        ):
            raise HandlerFailure("parameter 'max_tokens' must be a whole number of at least 1")
        max_tokens = min(int(number), ceiling)
    return temperature, max_tokens


def parameters_schema(ceiling: int) -> struct_pb2.Struct:
    schema = struct_pb2.Struct()
    schema.update(
        {
            "type": "object",
            "properties": {
                "temperature": {"type": "number", "minimum": 0, "maximum": 2},
                "max_tokens": {"type": "integer", "minimum": 1, "maximum": ceiling},
            },
        }
    )
    return schema


def request_body(
    messages: list[dict[str, Any]], sampling: Sampling, extra: dict[str, Any]
) -> dict[str, Any]:
    """A streamed Chat Completions request's body, without ``model`` (the
    client names each provider's own)."""
    body: dict[str, Any] = {
        "messages": messages,
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": sampling.max_tokens,
        **extra,
    }
    if sampling.temperature is not None:
        body["temperature"] = sampling.temperature
    if sampling.top_p is not None:
        body["top_p"] = sampling.top_p
    return body
