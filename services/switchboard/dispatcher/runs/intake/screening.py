"""Screening: the checks a SendMessageRequest passes before anything is stored.

In order: the fields (``validated``), the call's idempotency key, the rate
limits, the filters (size, content policy, the workspace's concurrent runs;
each refusal, or a flag, is published as MESSAGE_FILTERED) and last the
assistant and the handler (``choose``: a named assistant, a forced handler,
the message's own choice, the workspace's default). What passes is a
``Screened`` request, which admission (``admission.py``) stores and queues.

The order is written once, in ``Screening.screen``. A message with ``speech``
fills one slot in it (``SpeechStep``, ``speech.py``): its options' fields join
the others, the server's speech is required once the fields pass, and after the
rate limits the assistant is chosen on the message as sent (its voice settings
transcribe; a transcript picks no handler), the recording is transcribed, and
the filters read the transcript.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final, Protocol

from switchboard.api.context.v1 import context_pb2 as cpb
from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.dispatcher import mapping
from switchboard.dispatcher.assistants.catalog import Assistants
from switchboard.dispatcher.budgets.quotas import Limits, Quotas
from switchboard.dispatcher.handlers.base import Handler, text_of
from switchboard.dispatcher.handlers.router import Choice, Router
from switchboard.dispatcher.runs.core.active.lifecycle import Active
from switchboard.dispatcher.runs.core.active.live import RunLimits
from switchboard.dispatcher.runs.intake.content import ContentPolicy
from switchboard.platform.cache import Cache, hash_tag
from switchboard.platform.errors import (
    ContentBlocked,
    FieldViolation,
    InvalidArgument,
    NotFound,
    QuotaExceeded,
    RateLimited,
    RequestTooLarge,
    SwitchboardError,
)
from switchboard.platform.events.bus import EventBus
from switchboard.platform.security.policy import Principal
from switchboard.platform.store.storage import Idempotency, idempotency
from switchboard.platform.values import names, timefields
from switchboard.platform.values.resources import ConversationName, MessageName

log = logging.getLogger("switchboard.dispatcher")

HANDLER: Final = re.compile(rf"(handlers/)?{names.CLIENT_ID.pattern}")
_POLICIES: Final = frozenset(pb.ConcurrencyPolicy.values())
_STEER_MODES: Final = frozenset(pb.SteerMode.values())
#: Parameters of one run, serialized.
_MAX_PARAMETER_BYTES: Final = 16 * 1024


@dataclass(frozen=True)
class Steered:
    """A message admitted as a steer of ``target`` (``steering.py``): the run it makes
    uses the target's assistant and handler, and waits behind it."""

    target: Active
    #: The idempotency key of the call that sent it (SteerRun's, or SendMessage's).
    key: Idempotency | None
    #: Told once the steer's run is admitted (the target takes it from there).
    accepted: Callable[[Active], None]


@dataclass(frozen=True)
class Screened:
    """A request that passed every check: what admission stores and runs."""

    #: The request as the run takes it (a spoken one's holds its transcript).
    request: pb.SendMessageRequest
    #: The run's timeout, in seconds.
    timeout: float
    #: The call's idempotency key, of the request as it was sent (None: no request_id).
    key: Idempotency | None
    #: What the content policy flagged (the run keeps them).
    flags: list[str]
    assistant: pb.Assistant | None
    choice: Choice
    #: The speech options the run keeps (None: it answers in text alone).
    speech: pb.SpeechOptions | None = None


def steer_mode_violations(mode: int) -> list[FieldViolation]:
    """``SendMessageRequest.steer_mode``: a known mode."""
    if mode not in _STEER_MODES:
        return [FieldViolation("steer_mode", "is not a known mode")]
    return []


async def route(
    assistants: Assistants,
    router: Router,
    workspace_id: str,
    request: pb.SendMessageRequest | pb.DescribeConversationRequest,
    message: cpb.Message,
    pinned: Callable[[str], int] = lambda _assistant: 0,
) -> tuple[pb.Assistant | None, Choice]:
    """The message's assistant, if any, and the handler that answers it (the order
    of the rules: ``router.py``). A named assistant or a forced handler decides;
    otherwise the message's own choice (metadata, content type, a /command) comes
    before the assistant a handoff left holding the conversation, which comes before
    the workspace's default assistant; a run routed by the message has none.

    The assistant answers at the revision the request pins, else at the one the
    caller's API key pins it at (``pinned``), else at its current one."""
    local = await router.local(workspace_id)
    own = request.assistant_revision if isinstance(request, pb.SendMessageRequest) else 0
    if own and not request.assistant:
        raise InvalidArgument(
            "assistant_revision needs assistant",
            [FieldViolation("assistant", "must name the assistant whose revision is pinned")],
        )

    async def at_pin(assistant: pb.Assistant, reason: str) -> tuple[pb.Assistant, Choice]:
        revision = own or pinned(assistant.name)
        if revision and revision != assistant.revision:
            field = "assistant_revision" if own else "assistant"
            assistant = await assistants.resolve_revision(
                workspace_id, assistant.name, revision, field
            )
        if revision:
            reason = f"{reason}, at revision {revision}"
            if not own:
                reason += " (pinned by the API key)"
        return assistant, _assistant_choice(router, assistant, reason, local)

    if request.assistant:
        named = await assistants.resolve(workspace_id, request.assistant, "assistant")
        if named is None:  # resolve raises NOT_FOUND for a name it does not know
            raise NotFound(f"{request.assistant} not found")
        return await at_pin(named, f"the assistant {named.name}, named in the request")
    if request.handler:
        return None, router.choose(request.handler, workspace_id, message, local)
    chosen = router.by_message(message, local)
    if chosen is not None:
        return None, chosen
    conversation = ConversationName.parse_or_none(request.conversation)
    held = (
        await assistants.held(workspace_id, conversation.conversation)
        if conversation is not None
        else None
    )
    if held is not None:
        return await at_pin(
            held, f"the assistant {held.name}, which the conversation was handed over to"
        )
    assistant = await assistants.resolve(workspace_id, "", "assistant")
    if assistant is None:
        return None, router.by_default(workspace_id)
    return await at_pin(assistant, f"the workspace's default assistant {assistant.name}")


def _assistant_choice(
    router: Router, assistant: pb.Assistant, reason: str, local: Mapping[str, Handler]
) -> Choice:
    return router.named(handler_id(assistant.handler or "handlers/llm"), "assistant", reason, local)


def handler_id(handler: str) -> str:
    return handler.removeprefix("handlers/")


class Listener(Protocol):
    """Speech's part of a request's checks (``Screening.screen`` holds its slot)."""

    async def hear(
        self, principal: Principal, request: pb.SendMessageRequest, assistant: pb.Assistant | None
    ) -> tuple[pb.SendMessageRequest, pb.SpeechOptions]:
        """The request as the run takes it (with its recording's transcript, if asked)
        and the speech options the run keeps."""
        ...


class SpeechStep(Protocol):
    """The slot's checks before the rate limits, and the listener it hands on."""

    def violations(self, request: pb.SendMessageRequest, workspace_id: str) -> list[FieldViolation]:
        """The field checks of ``speech`` (refused with the others)."""
        ...

    def listener(self, request: pb.SendMessageRequest) -> Listener | None:
        """None when the options ask for nothing; SPEECH_NOT_CONFIGURED when they ask
        and this server cannot."""
        ...


class Screening:
    """Admission's checks, in their one order."""

    def __init__(
        self,
        *,
        limits: RunLimits,
        counters: Cache,
        content: ContentPolicy,
        assistants: Assistants,
        router: Router,
        quotas: Quotas,
        bus: EventBus,
        speech: SpeechStep,
    ) -> None:
        #: The slot a request with ``speech`` fills.
        self._speech = speech
        self._limits = limits
        self._counters = counters
        self._content = content
        self._assistants = assistants
        self._router = router
        self._quotas = quotas
        self._bus = bus

    async def screen(
        self,
        principal: Principal,
        request: pb.SendMessageRequest,
        workspace_id: str,
        steer: Steered | None,
    ) -> Screened:
        """Every check, in order: the fields; the rate limits (a flood of refused
        messages is still a flood); the filters, then the assistant and the handler.
        Speech moves the choice before the filters, which read its transcript."""
        step = self._speech if request.HasField("speech") else None
        more = step.violations(request, workspace_id) if step is not None else []
        timeout_s = self.validated(request, more)
        listener = step.listener(request) if step is not None else None
        # Of the request as sent: a retry matches it, whatever its transcript.
        key = self.key(principal, request, steer)
        limits = await self.limits(workspace_id)
        await self.rate_limit(principal, workspace_id, request.conversation, limits)
        chosen: tuple[pb.Assistant | None, Choice] | None = None
        kept: pb.SpeechOptions | None = None
        if listener is not None:
            chosen = await self.choose(workspace_id, request, steer, principal)
            request, kept = await listener.hear(principal, request, chosen[0])
        flags = await self.filters(principal, request, workspace_id, limits)
        assistant, choice = chosen or await self.choose(workspace_id, request, steer, principal)
        return Screened(request, timeout_s, key, flags, assistant, choice, kept)

    def validated(
        self, request: pb.SendMessageRequest, more: Sequence[FieldViolation] = ()
    ) -> float:
        """Field checks (with ``more``, a wrapper's, in the same refusal); returns the
        run's timeout in seconds."""
        message = request.message
        violations: list[FieldViolation] = []
        if message.role not in (cpb.MESSAGE_ROLE_UNSPECIFIED, cpb.MESSAGE_ROLE_USER):
            violations.append(FieldViolation("message.role", "must be USER or unset"))
        if not message.parts:
            violations.append(FieldViolation("message.parts", "needs at least one part"))
        if request.handler and not HANDLER.fullmatch(request.handler):
            violations.append(FieldViolation("handler", "must be handlers/{id}"))
        if request.request_id and not names.REQUEST_ID.fullmatch(request.request_id):
            violations.append(FieldViolation("request_id", "must be 1-64 of [A-Za-z0-9_-]"))
        if request.concurrency_policy not in _POLICIES:
            violations.append(FieldViolation("concurrency_policy", "is not a known policy"))
        violations += steer_mode_violations(request.steer_mode)
        violations += _replaces_violations(request)
        timeout = self._limits.default_timeout_s
        if request.HasField("timeout"):
            requested = timefields.seconds(request.timeout, "timeout")
            if requested <= 0:
                violations.append(FieldViolation("timeout", "must be positive"))
            timeout = min(requested, self._limits.max_timeout_s)
        if request.HasField("parameters") and request.parameters.ByteSize() > _MAX_PARAMETER_BYTES:
            violations.append(
                FieldViolation("parameters", f"is larger than {_MAX_PARAMETER_BYTES} bytes")
            )
        violations += more
        if violations:
            raise InvalidArgument("the request is invalid", violations)
        return timeout

    @staticmethod
    def key(
        principal: Principal, request: pb.SendMessageRequest, steer: Steered | None
    ) -> Idempotency | None:
        """The call's idempotency key: a steer's is its own call's (SteerRun's)."""
        if steer is not None:
            return steer.key
        return idempotency(principal.user_id, "SendMessage", request)

    async def limits(self, workspace_id: str) -> Limits:
        """The workspace's quotas, read once for the rate limits and the filters."""
        return await self._quotas.limits(workspace_id)

    async def choose(
        self,
        workspace_id: str,
        request: pb.SendMessageRequest,
        steer: Steered | None = None,
        principal: Principal | None = None,
    ) -> tuple[pb.Assistant | None, Choice]:
        """The message's assistant (if any) and the handler that answers it;
        ``principal``: the caller, whose API key may pin the assistant's revision."""
        if steer is not None:
            # The target's assistant and handler: the steer is its message.
            target = steer.target
            return target.assistant, Choice(target.handler, f"steers {target.run.name}")
        assistant, choice = await route(
            self._assistants,
            self._router,
            workspace_id,
            request,
            request.message,
            principal.pinned if principal is not None else lambda _assistant: 0,
        )
        if assistant is not None and request.handler:
            forced = assistant.handler or "handlers/llm"
            if handler_id(request.handler) != handler_id(forced):
                raise InvalidArgument(
                    "the handler is not the assistant's",
                    [FieldViolation("handler", f"must be empty or {forced} (the assistant's)")],
                )
        return assistant, choice

    async def filters(
        self,
        principal: Principal,
        request: pb.SendMessageRequest,
        workspace_id: str,
        limits: Limits,
    ) -> list[str]:
        """The filters after the rate limits: size, content policy, concurrent runs;
        returns the flags."""
        text = text_of(request.message)
        if len(text) > self._limits.max_input_chars:
            await self.filtered(principal, request.conversation, "size", RequestTooLarge.reason)
            raise RequestTooLarge(
                f"the message has {len(text)} characters; the limit is "
                f"{self._limits.max_input_chars}"
            )
        verdict = self._content.check(text)
        if verdict.blocked:
            await self.filtered(
                principal,
                request.conversation,
                "content",
                ContentBlocked.reason,
                flags=verdict.rules,
            )
            raise ContentBlocked(
                "the message was refused by the content policy",
                [FieldViolation("message.parts", "matched a blocked term")],
            )
        # Last, and counted in the database: the cheap refusals cost no query.
        try:
            await self._quotas.check_active(principal, workspace_id, limits)
        except QuotaExceeded:
            await self.filtered(
                principal, request.conversation, "active-runs", QuotaExceeded.reason
            )
            raise
        return list(verdict.flags)

    async def rate_limit(
        self, principal: Principal, workspace_id: str, conversation: str, limits: Limits
    ) -> None:
        # A workspace's counters carry its id as a hash tag: one slot on a Redis Cluster.
        checks = [
            (
                "rate-user",
                f"dispatch:user:{principal.user_id}",
                self._limits.messages_per_minute_per_user,
                "for you",
            ),
            (
                "rate-workspace",
                f"dispatch:workspace:{hash_tag(workspace_id)}",
                limits.messages_per_minute,
                "in this workspace",
            ),
        ]
        own = limits.keys.get(principal.api_key_name) if principal.api_key_id else None
        if own is not None and own.messages_per_minute:
            checks.append(
                (
                    "rate-api-key",
                    f"dispatch:apikey:{hash_tag(workspace_id)}:{principal.api_key_id}",
                    own.messages_per_minute,
                    "with this API key in this workspace",
                )
            )
        # One round trip for all of them; the first over its limit stops the count.
        over = await self._counters.first_over([(key, limit) for _, key, limit, _ in checks], 60)
        if over is not None:
            index, reset_s = over
            kind, _, limit, where = checks[index]
            await self.filtered(principal, conversation, kind, RateLimited.reason)
            raise RateLimited(
                f"more than {limit} messages in a minute ({where}); slow down",
                retry_after_s=max(reset_s, 1.0),
            )

    async def filtered(
        self,
        principal: Principal,
        conversation: str,
        filter_name: str,
        reason: str,
        *,
        flags: Sequence[str] = (),
        run: str = "",
    ) -> None:
        """The MESSAGE_FILTERED event: what a filter refused or flagged."""
        event = mapping.filtered_event(
            principal, conversation, filter_name, reason, list(flags), run
        )
        try:
            await self._bus.publish(event)
        except SwitchboardError:
            log.warning("filter event not published", extra={"filter": filter_name})


def _replaces_violations(request: pb.SendMessageRequest) -> list[FieldViolation]:
    """An edit names a message of the same conversation, and starts its own run (a
    steer would join another's)."""
    if not request.replaces:
        return []
    message = MessageName.parse_or_none(request.replaces)
    conversation = ConversationName.parse_or_none(request.conversation)
    if message is None or conversation is None or message.parent != conversation:
        return [FieldViolation("replaces", "must be a message of the conversation")]
    if request.concurrency_policy == pb.CONCURRENCY_POLICY_STEER:
        return [FieldViolation("concurrency_policy", "cannot be STEER for an edit")]
    return []
