"""Pruning: how many of a conversation's oldest live messages to archive, and doing it.

The plans are pure (``plan_prune``): the store passes token counts of the
live messages, oldest first, and archives the prefix they return under a
summary of it (``Pruning``). Archived messages leave the live history (and so
every future context window); they are not deleted.

Automatic pruning has hysteresis: it triggers when a conversation goes over
its maximum and then prunes down to a fraction (by default 75%) of it, so it
runs once per many appends instead of on every append at the limit.

Maintenance runs here too: soft-deleted workspaces and conversations are
purged once their recovery window has passed, and old idempotency keys with them.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import math
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

from google.protobuf import struct_pb2

from switchboard.api.context.v1 import context_pb2 as pb
from switchboard.api.events.v1 import events_pb2
from switchboard.context.common import (
    Common,
    Domain,
    conversation_event,
    memory_event,
    stored,
    write,
)
from switchboard.context.conversations.store import ConversationStore
from switchboard.context.mapping import memory_proto, message_proto, struct
from switchboard.context.pruning.store import PruneStore
from switchboard.context.records import ConversationRecord, MemoryRecord, MessageRecord
from switchboard.context.text.summarizer import Summarizer, SummaryInput
from switchboard.platform.background import cancel_all
from switchboard.platform.errors import FailedPrecondition, NotFound, Violations
from switchboard.platform.security.policy import Principal
from switchboard.platform.values.names import new_id, now
from switchboard.platform.values.resources import ConversationName, HandlerName
from switchboard.shared.parttext import render_parts_briefly

log = logging.getLogger("switchboard.context")

DEFAULT_AUTO_PRUNE_TARGET: Final = 0.75
#: A prune plans again when a concurrent write changed what it planned on; this often.
_PRUNE_ATTEMPTS: Final = 5
#: How often maintenance purges what is past its recovery window.
_MAINTAIN_EVERY_S: Final = 3600


@dataclass(frozen=True)
class PruneLimits:
    """What to keep: at most this many newest messages and tokens; 0 means no limit."""

    keep_last_messages: int = 0
    max_tokens: int = 0

    def __post_init__(self) -> None:
        if self.keep_last_messages < 0 or self.max_tokens < 0:
            raise ValueError(f"prune limits must not be negative: {self}")


def plan_prune(tokens_oldest_first: Sequence[int], limits: PruneLimits) -> int:
    """Return how many of the oldest messages to archive.

    What is kept is the longest run of newest messages within both limits,
    except that the newest message is never archived, even when it alone is
    over ``max_tokens``: a conversation must keep the turn being answered.
    The plan is idempotent: pruning what is kept again archives nothing.
    """
    if any(tokens < 0 for tokens in tokens_oldest_first):
        raise ValueError("message token counts must not be negative")
    count = len(tokens_oldest_first)
    if count == 0:
        return 0
    max_messages = limits.keep_last_messages or count
    max_tokens = limits.max_tokens or math.inf
    kept = 1
    kept_tokens = tokens_oldest_first[-1]
    # Walk back from the newest; stop at the first message that breaks a limit,
    # since what is kept must be a suffix (no holes in a conversation).
    while kept < min(count, max_messages):
        tokens = tokens_oldest_first[count - 1 - kept]
        if kept_tokens + tokens > max_tokens:
            break
        kept += 1
        kept_tokens += tokens
    return count - kept


def needs_auto_prune(count: int, tokens: int, max_messages: int, max_tokens: int) -> bool:
    """Whether a conversation of ``count`` live messages and ``tokens`` is over a
    configured maximum (0 means that axis has no maximum)."""
    return (0 < max_messages < count) or (0 < max_tokens < tokens)


def auto_prune_limits(
    max_messages: int, max_tokens: int, target: float = DEFAULT_AUTO_PRUNE_TARGET
) -> PruneLimits:
    """Limits that prune a conversation to ``target`` of each configured maximum.

    Pruning down to exactly the maximum would trigger again on the next append;
    the gap between ``target`` and the maximum is how many appends (or tokens)
    pass before the next automatic prune. Each non-zero maximum gives a limit of
    at least 1, because a limit of 0 would mean "no limit".
    """
    if max_messages < 0 or max_tokens < 0:
        raise ValueError("maximums must not be negative")
    # `not (0 < x <= 1)` also refuses NaN.
    if not (0.0 < target <= 1.0):
        raise ValueError(f"target must be within (0, 1], got {target}")
    return PruneLimits(
        keep_last_messages=max(1, math.floor(max_messages * target)) if max_messages else 0,
        max_tokens=max(1, math.floor(max_tokens * target)) if max_tokens else 0,
    )


class Pruning(Domain):
    """Prunes conversations on request and automatically, and maintains the database."""

    def __init__(
        self,
        common: Common,
        store: PruneStore,
        conversations: ConversationStore,
        *,
        summarizer: Summarizer,
    ) -> None:
        super().__init__(common)
        self._store = store
        self._conversations = conversations
        self._summarizer = summarizer
        self._pruning: dict[str, asyncio.Task[pb.PruneConversationResponse]] = {}
        # Weak: a conversation's lock lives only while a prune holds or awaits it.
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()
        self._maintenance: asyncio.Task[None] | None = None
        self._closed = False

    @write
    async def prune(
        self, principal: Principal, request: pb.PruneConversationRequest
    ) -> pb.PruneConversationResponse:
        conversation = ConversationName.parse(request.conversation, "conversation")
        violations = Violations()
        if request.keep_last_messages < 0:
            violations.add("keep_last_messages", "must not be negative")
        if request.max_tokens < 0:
            violations.add("max_tokens", "must not be negative")
        if not request.keep_last_messages and not request.max_tokens:
            violations.add("keep_last_messages", "or max_tokens is required")
        violations.check()
        limits = PruneLimits(
            keep_last_messages=request.keep_last_messages, max_tokens=request.max_tokens
        )
        return await self._prune(
            principal,
            conversation.workspace,
            conversation.conversation,
            limits,
            validate_only=request.validate_only,
        )

    async def _prune(
        self,
        principal: Principal | None,
        workspace_id: str,
        conversation_id: str,
        limits: PruneLimits,
        *,
        validate_only: bool = False,
    ) -> pb.PruneConversationResponse:
        conversation = await stored(
            self._conversations.get_conversation(workspace_id, conversation_id)
        )
        name = ConversationName(workspace_id, conversation_id)
        if conversation.deleted_at is not None:
            raise NotFound(f"{name} not found")
        if conversation.archived:
            # Read-only, as for appends (the archive step re-checks under the lock).
            raise FailedPrecondition(f"{name} is archived; unarchive it to change it")
        lock = self._locks.get(conversation_id)
        if lock is None:
            lock = self._locks[conversation_id] = asyncio.Lock()
        async with lock:
            for _ in range(_PRUNE_ATTEMPTS):
                live = await stored(self._store.live_tokens(workspace_id, conversation_id))
                count = plan_prune([tokens for _, tokens in live], limits)
                if count == 0 or validate_only:
                    return pb.PruneConversationResponse(
                        pruned_message_count=count, kept_message_count=len(live) - count
                    )
                upto = live[count - 1][0]
                summary = await self._fold(principal, workspace_id, conversation_id, upto, count)
                if summary is not None:
                    return pb.PruneConversationResponse(
                        summary=memory_proto(summary),
                        pruned_message_count=count,
                        kept_message_count=len(live) - count,
                    )
        raise FailedPrecondition("the conversation kept changing while pruning; retry")

    async def _fold(
        self,
        principal: Principal | None,
        workspace_id: str,
        conversation_id: str,
        upto: int,
        count: int,
    ) -> MemoryRecord | None:
        """Archive ``count`` messages up to ``upto`` under a new summary; None if they changed."""
        messages, previous = await self._store.prune_inputs(conversation_id, upto)
        if len(messages) != count:
            return None
        summary = await self._summary(workspace_id, conversation_id, messages, previous)
        staged = self.common.staged(
            lambda done: (
                [
                    memory_event(principal, events_pb2.CHANGE_KIND_CREATED, summary),
                    conversation_event(principal, events_pb2.CHANGE_KIND_UPDATED, done[0]),
                ]
                if done is not None
                else []
            )
        )
        done = await stored(
            self._store.archive(
                workspace_id,
                conversation_id,
                upto_seq=upto,
                expected_summary=previous.id if previous is not None else None,
                expected_count=count,
                summary=summary,
                staged=staged,
            )
        )
        if done is None:
            return None
        await self.common.announce(staged)
        return summary

    async def _summary(
        self,
        workspace_id: str,
        conversation_id: str,
        messages: list[MessageRecord],
        previous: MemoryRecord | None,
    ) -> MemoryRecord:
        """The summary of ``messages`` (folding in ``previous``), a new conversation memory item."""
        inputs = [
            SummaryInput(
                role=row.role,
                author=proto.author,
                # Tool calls and results as one line each: what happened, not the payloads.
                text=render_parts_briefly(proto.parts),
            )
            for row in messages
            for proto in (message_proto(row, workspace_id),)
        ]
        counter = self.common.counter
        text = await self._summarizer.summarize(
            previous.content if previous is not None else None,
            inputs,
            max_tokens=self.limits.summary_tokens,
            counter=counter,
        )
        meta = struct_pb2.Struct()
        meta.update(
            {
                "first_sequence": _previous_first(previous) or messages[0].seq,
                "last_sequence": messages[-1].seq,
                "summarizer": self._summarizer.name,
            }
        )
        stamp = now()
        return MemoryRecord(
            id=new_id(),
            scope=str(ConversationName(workspace_id, conversation_id)),
            workspace_id=workspace_id,
            conversation_id=conversation_id,
            user_id=None,
            kind="summary",
            content=text or "(no text content)",
            pinned=False,
            meta=meta.SerializeToString(deterministic=True),
            sources="",
            creator=str(HandlerName(self._summarizer.name)),
            created_at=stamp,
            updated_at=stamp,
            expires_at=None,
            token_count=counter.count(text or "(no text content)"),
            version=1,
        )

    def appended(self, conversation: ConversationRecord) -> None:
        """Prune ``conversation`` in the background if an append took it over its limits."""
        limits = self.limits
        if not needs_auto_prune(
            conversation.message_count,
            conversation.token_count,
            limits.auto_prune_messages,
            limits.auto_prune_tokens,
        ):
            return
        if conversation.id in self._pruning:
            return
        task = asyncio.create_task(
            self._prune(
                None,  # the service's own doing: its events name the actor "system"
                conversation.workspace_id,
                conversation.id,
                auto_prune_limits(limits.auto_prune_messages, limits.auto_prune_tokens),
            ),
            name=f"auto-prune-{conversation.id}",
        )
        self._pruning[conversation.id] = task
        task.add_done_callback(lambda t: self._pruning.pop(conversation.id, None))
        task.add_done_callback(_keep_alive)

    # -- maintenance -------------------------------------------------------------------

    def start(self, *, maintain: bool) -> None:
        """Start maintenance; only in processes serving ContextService."""
        if maintain:
            self._maintenance = asyncio.create_task(self._maintain(), name="context-maintenance")

    async def close(self) -> None:
        self._closed = True
        maintenance = [self._maintenance] if self._maintenance is not None else []
        await cancel_all([*self._pruning.values(), *maintenance])

    async def _maintain(self) -> None:
        """Purge soft-deleted workspaces and conversations past their recovery window."""
        while not self._closed:
            try:
                cutoff = now() - dt.timedelta(seconds=self.limits.purge_after_s)
                await self._store.purge_workspaces(cutoff)
                await self._store.purge_conversations(cutoff)
                await self._store.purge_idempotency()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.warning("context maintenance failed; retrying later", exc_info=True)
            await asyncio.sleep(_MAINTAIN_EVERY_S)


def _previous_first(previous: MemoryRecord | None) -> int | None:
    """The first sequence an earlier summary covered (a new one covers it too)."""
    if previous is None:
        return None
    meta = struct(previous.meta)
    if meta is None or "first_sequence" not in meta:
        return None
    first = meta["first_sequence"]
    return int(first) if isinstance(first, int | float) else None


def _keep_alive(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("context background task failed", exc_info=task.exception())
