"""The context window: what a handler is given of a conversation, within a token budget.

The store reads everything in one snapshot (``windows/store.py``), the planner
chooses within the budget (``planner.py``), and the answer is cached as the
serialized response (``windows/cache.py``) under the versions it was built from:
any write to the conversation or to the memory it draws on changes a version,
so a cached window is never stale; one is also dropped when a memory item in
it expires.

Files: each message's file parts get their file's text (``FileReference.text``:
a document's extracted text, a recording's transcript), counted in the
message's tokens, and the one message that does not fit whole may be shown
with its documents cut to fit (``planner.py`` rule 5, ``documents.py``). A
file's text is written once, when it becomes ready, so the cache key needs no
version of it: a window is not cached while a file it names may still get its
text (a document or recording whose text is not ready), and a window that
shows file text is kept at most ``FILE_TEXT_CACHE_S``, as deleting a file
changes no version the key holds.

Retrieval (``GetContextWindowRequest.retrieval``): search results for the
window's query (``semantic/retrieval/search.py``, in the conversation) go in as
RETRIEVED items within the retrieval's token budget (``planner.py`` rule 3b).
A window with retrieval is never cached nor served from the cache: what search
finds moves with the workspace's memory, other conversations, files and the
semantic index's progress, none of which has a version in the key.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Final, Protocol, overload

from switchboard.api.context.v1 import context_pb2 as pb
from switchboard.context.common import Common, Domain, check_branch, check_text, stored
from switchboard.context.files.reading.sniff import kind_of
from switchboard.context.mapping import (
    memory_name,
    memory_proto,
    message_proto,
)
from switchboard.context.records import MemoryRecord, MessageRecord, Unsearchable
from switchboard.context.semantic.retrieval.filters import ParsedFilter, parse_filter
from switchboard.context.semantic.retrieval.search import Ranking, Search, check_mode
from switchboard.context.windows.cache import WindowCache
from switchboard.context.windows.documents import Texts, cut, fill, measure
from switchboard.context.windows.planner import (
    Candidate,
    Choice,
    PinnedOverBudget,
    Reason,
    plan_window,
)
from switchboard.context.windows.store import WindowRows, WindowScopes, WindowStore
from switchboard.platform.cache import hash_tag
from switchboard.platform.errors import (
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    Violations,
)
from switchboard.platform.security.policy import Principal
from switchboard.platform.values import timefields
from switchboard.platform.values.names import now
from switchboard.platform.values.resources import ConversationName
from switchboard.shared.parttext import render_parts

# Bump when the cached window's shape or the planning rules change.
_WINDOW_FORMAT: Final = "w3"
#: How many windows ``Windows`` remembers as last served from the cache.
_POLLED: Final = 1024
#: Most results a window retrieves.
MAX_RETRIEVED: Final = 20
#: How long a cached window showing file text may be served (a deleted file's
#: text stops showing within this).
FILE_TEXT_CACHE_S: Final = 60.0
#: Why an item is in a window, as the contract says it.
_REASONS: Final = {
    Reason.PINNED: pb.CONTEXT_ITEM_REASON_PINNED,
    Reason.RELEVANT: pb.CONTEXT_ITEM_REASON_RELEVANT,
    Reason.SUMMARY: pb.CONTEXT_ITEM_REASON_SUMMARY,
    Reason.RECENT: pb.CONTEXT_ITEM_REASON_RECENT,
    Reason.OVER_BUDGET: pb.CONTEXT_ITEM_REASON_OVER_BUDGET,
    Reason.EXPIRED: pb.CONTEXT_ITEM_REASON_EXPIRED,
    Reason.RETRIEVED: pb.CONTEXT_ITEM_REASON_RETRIEVED,
}


class FileTexts(Protocol):
    """What a window needs of the files domain (``ContextDomain.files``)."""

    async def texts(self, names: Sequence[str]) -> dict[str, tuple[str, int]]: ...


def _check_retrieval(
    retrieval: pb.RetrievalOptions, token_budget: int, violations: Violations
) -> None:
    if not 1 <= retrieval.top_k <= MAX_RETRIEVED:
        violations.add("retrieval.top_k", f"must be between 1 and {MAX_RETRIEVED}")
    if retrieval.token_budget < 1 or retrieval.token_budget > max(token_budget, 1):
        violations.add("retrieval.token_budget", "must be between 1 and the window's token_budget")
    check_mode(retrieval.mode, "retrieval.mode", violations)


def _other_branch(result: pb.SearchResult, conversation: str, rows: WindowRows) -> bool:
    """Whether ``result`` is a message of this conversation that the window's branch
    does not hold (another version of the conversation)."""
    if result.WhichOneof("source") != "message" or rows.path.every:
        return False
    message = result.message
    if not message.name.startswith(conversation + "/"):
        return False
    return not rows.path.holds(message.branch or 1, message.sequence)


def _file_names(message: pb.Message) -> list[str]:
    return [part.file.file for part in message.parts if part.HasField("file") and part.file.file]


def _may_get_text(message: pb.Message, texts: Texts) -> bool:
    """Whether a file the message names may still get a text (not ready yet)."""
    return any(
        part.file.file not in texts and kind_of(part.file.mime_type) in _TEXT_KINDS
        for part in message.parts
        if part.HasField("file") and part.file.file
    )


_TEXT_KINDS: Final = frozenset({pb.FILE_KIND_DOCUMENT, pb.FILE_KIND_AUDIO})


def _tool_links(message: pb.Message) -> tuple[frozenset[str], frozenset[str]]:
    """The ids of the tool calls a message makes and of those it answers."""
    calls = frozenset(p.tool_call.id for p in message.parts if p.HasField("tool_call"))
    answers = frozenset(p.tool_result.id for p in message.parts if p.HasField("tool_result"))
    return calls, answers


@dataclass
class _Memories:
    """The memory candidates of one window, and until when the window stays valid."""

    stamp: float
    by_key: dict[str, MemoryRecord] = field(default_factory=dict)
    valid_until: float = float("inf")

    def candidate(self, row: MemoryRecord) -> Candidate:
        key = str(memory_name(row))
        self.by_key[key] = row
        expires = row.expires_at.timestamp() if row.expires_at is not None else None
        expired = expires is not None and expires <= self.stamp
        if expires is not None and not expired:
            self.valid_until = min(self.valid_until, expires)
        return Candidate(key=key, tokens=row.token_count, expired=expired)


class Windows(Domain):
    def __init__(
        self,
        common: Common,
        store: WindowStore,
        cache: WindowCache,
        files: FileTexts | None = None,
        search: Search | None = None,
    ) -> None:
        super().__init__(common)
        self._store = store
        self._search = search
        #: The windows already built, as served (bytes).
        self.cache = cache
        self._files = files
        #: The windows (all but their versions) last served from the cache, newest last:
        #: read again, they are likely to be served from it again.
        self._polled: OrderedDict[str, None] = OrderedDict()

    async def window(self, principal: Principal, request: pb.GetContextWindowRequest) -> bytes:
        """The serialized ``GetContextWindowResponse`` (cached as bytes, served as bytes)."""
        conversation = ConversationName.parse(request.conversation, "conversation")
        workspace_id, conversation_id = conversation.workspace, conversation.conversation
        violations = Violations()
        if request.token_budget <= 0:
            violations.add("token_budget", "must be positive")
        elif request.token_budget > self.limits.max_window_tokens:
            violations.add("token_budget", f"must be at most {self.limits.max_window_tokens}")
        check_text(request.query, "query", self.limits.max_query_chars, violations)
        retrieval = request.retrieval if request.HasField("retrieval") else None
        if retrieval is not None:
            _check_retrieval(retrieval, request.token_budget, violations)
        check_branch(request.branch, violations)
        violations.check()
        at = (
            timefields.timestamp(request.valid_at, "valid_at")
            if request.HasField("valid_at")
            else None
        )
        parsed = None
        if retrieval is not None:
            parsed = parse_filter(
                retrieval.filter, workspace_id=workspace_id, field="retrieval.filter"
            )
        scopes = WindowScopes(
            conversation=str(conversation),
            workspace=str(conversation.parent),
            user=principal.user_name,
        )
        # The conversation as a hash tag: on a Redis Cluster every window of one
        # conversation is in one slot (on one Redis the braces are characters).
        prefix = ("ctxwin", _WINDOW_FORMAT, self.common.counter.name, hash_tag(conversation_id))
        suffix = (
            str(request.token_budget),
            hashlib.sha256(request.query.encode()).hexdigest()[:16],
            # The active branch is the conversation's version's; another is the request's.
            *((f"b{request.branch}",) if request.branch else ()),
        )

        def key_of(versions: tuple[int, int, int]) -> str:
            version, workspace_version, user_version = versions
            return ":".join(
                (
                    *prefix,
                    str(version),
                    str(workspace_version),
                    principal.user_id,
                    str(user_version),
                    *suffix,
                )
            )

        if retrieval is not None or at is not None:
            return await self._retrieving(
                workspace_id, conversation_id, scopes, request, retrieval, parsed, at
            )
        rows: WindowRows | None = None
        polled = ":".join((*prefix, principal.user_id, *suffix))
        if self.cache.shared or polled in self._polled:
            # Redis may hold a window this process never built, and a window read
            # again without a write in between is served from the cache: read the
            # versions alone first (one statement, no transaction).
            versions = await stored(
                self._store.window_version(workspace_id, conversation_id, scopes)
            )
        else:
            # Whether this process caches the window is known in the database's
            # thread: a miss (a run's read, right after its append) reads the
            # versions and the rows in one snapshot and one thread hop.
            cache = self.cache
            versions, rows = await self._rows(
                workspace_id,
                conversation_id,
                scopes,
                request,
                lambda found: cache.holds(key_of(found)),
            )
        key = key_of(versions)
        cached = await self.cache.get(key)
        if cached is not None:
            self._polled[polled] = None
            self._polled.move_to_end(polled)
            if len(self._polled) > _POLLED:
                self._polled.popitem(last=False)
            return cached
        self._polled.pop(polled, None)
        if rows is None:
            rows = await self._rows(workspace_id, conversation_id, scopes, request)
        messages = {seq: pb.Message.FromString(rows.bodies[seq]) for seq, _ in rows.recent}
        texts = await self._texts(messages.values())
        payload, valid_until = self._build(
            scopes.conversation, rows, messages, texts, request.token_budget
        )
        settled = not any(_may_get_text(message, texts) for message in messages.values())
        if texts:
            valid_until = min(valid_until, now().timestamp() + FILE_TEXT_CACHE_S)
        if settled and (
            (rows.conversation.version, rows.workspace_version, rows.user_version) == versions
        ):
            # Only a window built from exactly the versions in the key is cached
            # under it; one that saw a newer write is served but not stored.
            await self.cache.put(key, payload, valid_until)
        return payload

    async def _retrieving(
        self,
        workspace_id: str,
        conversation_id: str,
        scopes: WindowScopes,
        request: pb.GetContextWindowRequest,
        retrieval: pb.RetrievalOptions | None,
        parsed: ParsedFilter | None,
        at: dt.datetime | None,
    ) -> bytes:
        """A window with retrieval or of a past time (``at``), built afresh (never
        cached, see the module docstring)."""
        asked: list[str] = []
        rows = await self._rows(workspace_id, conversation_id, scopes, request, asked=asked, at=at)
        # The latest user message may be longer than a query may be: its start is searched.
        query = (asked[0] if asked else request.query)[: self.limits.max_query_chars]
        ranking = None
        if (
            retrieval is not None
            and parsed is not None
            and query.strip()
            and self._search is not None
        ):
            ranking = await self._search.retrieve(
                workspace_id, conversation_id, query, retrieval, parsed
            )
        messages = {seq: pb.Message.FromString(rows.bodies[seq]) for seq, _ in rows.recent}
        texts = await self._texts(messages.values())
        payload, _ = self._build(
            scopes.conversation,
            rows,
            messages,
            texts,
            request.token_budget,
            ranking=ranking,
            retrieval_budget=retrieval.token_budget if retrieval is not None else 0,
            at=at,
        )
        return payload

    @overload
    async def _rows(
        self,
        workspace_id: str,
        conversation_id: str,
        scopes: WindowScopes,
        request: pb.GetContextWindowRequest,
        *,
        asked: list[str] | None = None,
        at: dt.datetime | None = None,
    ) -> WindowRows: ...

    @overload
    async def _rows(
        self,
        workspace_id: str,
        conversation_id: str,
        scopes: WindowScopes,
        request: pb.GetContextWindowRequest,
        cached: Callable[[tuple[int, int, int]], bool],
        *,
        asked: list[str] | None = None,
        at: dt.datetime | None = None,
    ) -> tuple[tuple[int, int, int], WindowRows | None]: ...

    async def _rows(
        self,
        workspace_id: str,
        conversation_id: str,
        scopes: WindowScopes,
        request: pb.GetContextWindowRequest,
        cached: Callable[[tuple[int, int, int]], bool] | None = None,
        *,
        asked: list[str] | None = None,
        at: dt.datetime | None = None,
    ) -> WindowRows | tuple[tuple[int, int, int], WindowRows | None]:
        """The window's rows; with ``cached``, its versions and its rows unless
        ``cached(versions)`` (``WindowStore.window_read``). ``asked`` gets the query
        the window ranked memory with."""

        def query(latest: MessageRecord | None) -> str:
            """The request's query, else the text of the latest user message."""
            if request.query or latest is None:
                text = request.query
            else:
                parts = message_proto(latest, workspace_id).parts
                text = render_parts(p for p in parts if p.HasField("text"))
            if asked is not None:
                asked[:] = [text]
            return text

        store = self._store
        limits = self.limits
        try:
            if cached is None:
                return await stored(
                    store.window_rows(
                        workspace_id,
                        conversation_id,
                        scopes,
                        budget=request.token_budget,
                        query=query,
                        relevant_limit=limits.relevant_limit,
                        max_pinned=limits.max_pinned,
                        at=at,
                        branch=request.branch,
                    )
                )
            return await stored(
                store.window_read(
                    workspace_id,
                    conversation_id,
                    scopes,
                    cached=cached,
                    budget=request.token_budget,
                    query=query,
                    relevant_limit=limits.relevant_limit,
                    max_pinned=limits.max_pinned,
                    branch=request.branch,
                )
            )
        except Unsearchable:
            raise InvalidArgument(
                "the query cannot be searched", [FieldViolation("query", "cannot be searched")]
            ) from None

    def _retrieved_key(
        self, result: pb.SearchResult, conversation: str, loaded: set[int]
    ) -> tuple[str, int]:
        """A retrieved result's key in the plan and its tokens; "" for a message
        the window considers anyway (one of its loaded recent messages)."""
        which = result.WhichOneof("source")
        if which == "memory_item":
            # The memory's key, as pinned and relevant ones have: it is shown once.
            return result.memory_item.name, result.memory_item.token_count
        if which == "message":
            message = result.message
            if message.name.startswith(conversation + "/") and message.sequence in loaded:
                return "", 0
            text = render_parts(p for p in message.parts if p.HasField("text"))
            return f"retrieved:{message.name}", self.common.counter.count(text)
        chunk = result.document_chunk
        key = f"retrieved:{chunk.file}#{chunk.chunk_index}"
        return key, self.common.counter.count(chunk.text)

    async def _texts(self, messages: Iterable[pb.Message]) -> Texts:
        """The ready texts of the files the messages name."""
        wanted = sorted({name for message in messages for name in _file_names(message)})
        if not wanted or self._files is None:
            return {}
        return await self._files.texts(wanted)

    def _build(
        self,
        conversation: str,
        rows: WindowRows,
        messages: dict[int, pb.Message],
        texts: Texts,
        budget: int,
        *,
        ranking: Ranking | None = None,
        retrieval_budget: int = 0,
        at: dt.datetime | None = None,
    ) -> tuple[bytes, float]:
        """The serialized response of the window planned from ``rows``, and until when it holds.

        ``messages``: every loaded body (most are shown, and the planner pairs
        tool calls with their results, planner.py rule 6); ``texts``: their files'."""
        memories = _Memories(stamp=(at or now()).timestamp())
        retrieved_tokens: dict[str, int] = {}
        counter, image_tokens = self.common.counter, self.limits.image_tokens
        recent = []
        for seq, stored_tokens in rows.recent:
            message = messages[seq]
            calls, answers = _tool_links(message)
            tokens, floor = stored_tokens, None
            if _file_names(message):
                # Counted with its files' text as it stands now, not as at append.
                measured = measure(counter, message.parts, texts, image_tokens)
                tokens, floor = measured.tokens, measured.floor
            recent.append(
                Candidate(key=str(seq), tokens=tokens, calls=calls, answers=answers, floor=floor)
            )
        retrieved: dict[str, pb.SearchResult] = {}
        loaded = set(messages)
        for result in ranking.results if ranking is not None else ():
            if _other_branch(result, conversation, rows):
                continue
            key, tokens = self._retrieved_key(result, conversation, loaded)
            if key and key not in retrieved:
                retrieved[key] = result
                retrieved_tokens[key] = tokens
        try:
            plan = plan_window(
                budget=budget,
                retrieved=[Candidate(key=k, tokens=retrieved_tokens[k]) for k in retrieved],
                retrieved_budget=retrieval_budget,
                pinned=[memories.candidate(r) for r in rows.pinned],
                relevant=[memories.candidate(r) for r, _ in rows.relevant],
                summary=memories.candidate(rows.summary) if rows.summary is not None else None,
                recent=recent,
                older_messages=max(
                    0,
                    (rows.conversation.message_count if rows.live is None else rows.live)
                    - len(recent),
                ),
            )
        except PinnedOverBudget as exc:
            raise FailedPrecondition(
                f"the pinned memory items need {exc.needed} tokens, more than the "
                f"token_budget of {budget}; raise the budget or unpin items",
                metadata={"pinned_tokens": str(exc.needed)},
            ) from None

        def item(choice: Choice, shown: bool) -> pb.ContextItem:
            entry = pb.ContextItem(reason=_REASONS[choice.reason], token_count=choice.tokens)
            found = retrieved.get(choice.candidate.key)
            if found is not None:
                entry.retrieved.CopyFrom(found)
                return entry
            memory = memories.by_key.get(choice.candidate.key)
            if memory is not None:
                entry.memory_item.CopyFrom(memory_proto(memory))
                return entry
            entry.message.CopyFrom(messages[int(choice.candidate.key)])
            if shown and texts and _file_names(entry.message):
                parts = entry.message.parts
                if choice.truncated:
                    filled, entry.token_count = cut(
                        counter, parts, texts, choice.tokens, image_tokens
                    )
                else:
                    filled = fill(parts, texts)
                del parts[:]
                parts.extend(filled)
            return entry

        included = [item(c, shown=True) for c in plan.included]
        window = pb.ContextWindow(
            conversation=conversation,
            conversation_version=rows.conversation.version,
            token_budget=budget,
            # What a cut message takes once cut (at most what the plan gave it).
            total_tokens=sum(entry.token_count for entry in included),
            included=included,
            excluded=[item(c, shown=False) for c in plan.excluded],
            tokenizer=self.common.counter.name,
            omitted_messages=plan.omitted_messages,
        )
        if ranking is not None:
            window.retrieval_mode = ranking.mode
            window.retrieval_fallback_reason = ranking.fallback
            window.retrieval_pending_index_count = ranking.pending
        return pb.GetContextWindowResponse(window=window).SerializeToString(), memories.valid_until
