"""A workspace's quotas: messages per minute and concurrent runs, for the
workspace and per API key (docs/budgets.md, "Quotas").

Members read them (GetWorkspaceQuota), owners change them
(UpdateWorkspaceQuota, FieldMask and etag; the access table checks the role
before any of this runs). A value of 0 is "unset": the workspace's falls back
to the server's default (``SWITCHBOARD_DISPATCHER_MAX_MESSAGES_PER_MINUTE_PER_WORKSPACE``,
``SWITCHBOARD_DISPATCHER_MAX_ACTIVE_RUNS_PER_WORKSPACE``), an API key's to the
workspace's (which bounds the key's messages anyway, so a key is only counted
on its own when it has a value of its own).

Admission (``runs/intake/admission.py``) asks ``limits`` on every SendMessage: a
per-workspace cache kept ``CACHE_TTL_S``, dropped at once on this replica when
the quota changes here; another replica sees a change within ``CACHE_TTL_S``.
``check_active`` counts the workspace's queued and running runs in the
database (all replicas') and refuses past a concurrent-run quota. The count is
kept ``COUNT_TTL_S`` and every admission here adds one to it, so a busy
workspace far below its quota costs one count a second, not one a message; a
count that reaches the quota is always read again (a run that ended frees its
place at once), and runs admitted by other replicas meanwhile are seen at the
next count.

This module does not import grpc; the servicer is transport only.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

from google.protobuf import field_mask_pb2

from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.dispatcher.budgets.quotastore import QuotaRecord, QuotaStore
from switchboard.platform.errors import QuotaExceeded, Violations
from switchboard.platform.security.policy import Principal
from switchboard.platform.values import names
from switchboard.platform.values.fieldmask import update_paths
from switchboard.platform.values.resources import ApiKeyName, QuotaName

#: What UpdateWorkspaceQuota may change, in the contract's order.
MUTABLE: Final = (
    "messages_per_minute",
    "max_concurrent_runs",
    "api_keys",
    "max_concurrent_calls",
    "call_minutes_per_day",
)
#: API keys one quota may name.
MAX_API_KEYS: Final = 100
#: Ceilings of the values (the settings' own ceilings).
MAX_MESSAGES_PER_MINUTE: Final = 10_000_000
MAX_CONCURRENT_RUNS: Final = 1_000_000
MAX_CONCURRENT_CALLS: Final = 100_000
#: A day's minutes for 100,000 calls at once.
MAX_CALL_MINUTES_PER_DAY: Final = 144_000_000
#: How long a workspace's quota is cached in each process (a change made on
#: another replica applies within this time).
CACHE_TTL_S: Final = 5.0
#: Workspaces kept in the cache; the least recently used beyond it are dropped.
MAX_CACHED_WORKSPACES: Final = 10_000
#: How long a count of active runs stands in for the database's (plus this
#: replica's admissions since): the concurrent-run check's own cost on the hot path.
COUNT_TTL_S: Final = 1.0
#: Counts kept; past it they are all dropped (each is read again when needed).
MAX_COUNTS: Final = 10_000
#: The RetryInfo of a concurrent-run refusal: a run's end cannot be foreseen, so
#: the caller is told to try again shortly.
ACTIVE_RETRY_S: Final = 1.0


@dataclass(frozen=True)
class QuotaDefaults:
    """The server's values for a workspace whose quota sets none."""

    messages_per_minute: int
    max_concurrent_runs: int


@dataclass(frozen=True)
class KeyLimits:
    """An API key's own limits; 0: none of its own (the workspace's bound it)."""

    messages_per_minute: int
    max_concurrent_runs: int


@dataclass(frozen=True)
class Limits:
    """What applies to a workspace's messages now: its values, defaults filled in."""

    messages_per_minute: int
    max_concurrent_runs: int
    #: By API key name (``users/{u}/apiKeys/{k}``).
    keys: Mapping[str, KeyLimits] = field(default_factory=dict)
    #: Phone calls (``talk/phone/``): live at once, and minutes a day; 0: no limit.
    max_concurrent_calls: int = 0
    call_minutes_per_day: int = 0


@dataclass(frozen=True)
class _Cached:
    limits: Limits
    #: When its read started (monotonic): what it shows is at least that recent.
    loaded_at: float


class Quotas:
    def __init__(self, store: QuotaStore, defaults: QuotaDefaults) -> None:
        self._store = store
        self.defaults = defaults
        self._cache: OrderedDict[str, _Cached] = OrderedDict()
        #: The read in flight per workspace; a change drops it from here, and a
        #: read no longer here does not fill the cache (it may predate the change).
        self._loading: dict[str, asyncio.Task[_Cached]] = {}
        #: The cache's clock (tests move it instead of sleeping).
        self.clock: Callable[[], float] = time.monotonic
        #: Active runs by (workspace, API key id or ""): when counted, and how many
        #: since (the count plus this replica's admissions after it).
        self._counts: dict[tuple[str, str], _Count] = {}

    async def close(self) -> None:
        loading = list(self._loading.values())
        self._loading.clear()
        for task in loading:
            task.cancel()
        if loading:
            await asyncio.gather(*loading, return_exceptions=True)
        self._cache.clear()

    # -- the RPCs -------------------------------------------------------------------------

    async def get(self, name: str) -> pb.WorkspaceQuota:
        workspace_id = QuotaName.parse(name, "name").workspace
        return self._message(await self._store.get(workspace_id))

    async def update(
        self, principal: Principal, request: pb.UpdateWorkspaceQuotaRequest
    ) -> pb.WorkspaceQuota:
        given = request.quota
        workspace_id = QuotaName.parse(given.name, "quota.name").workspace
        paths = update_paths(request.update_mask, given, MUTABLE)
        names.checked_etag(given.etag, "quota.etag")
        self._validate(given, paths)
        clean = pb.WorkspaceQuota(
            messages_per_minute=given.messages_per_minute,
            max_concurrent_runs=given.max_concurrent_runs,
            api_keys=given.api_keys,
            max_concurrent_calls=given.max_concurrent_calls,
            call_minutes_per_day=given.call_minutes_per_day,
        )
        mask = field_mask_pb2.FieldMask(paths=paths)

        def edit(data: bytes | None) -> bytes:
            stored = pb.WorkspaceQuota.FromString(data or b"")
            mask.MergeMessage(clean, stored, replace_repeated_field=True)
            return stored.SerializeToString(deterministic=True)

        record = await self._store.update(workspace_id, given.etag, edit)
        # This replica applies the change at once; the others within CACHE_TTL_S.
        self._forget(workspace_id)
        return self._message(record)

    @staticmethod
    def _validate(given: pb.WorkspaceQuota, paths: Sequence[str]) -> None:
        violations = Violations()
        if "messages_per_minute" in paths:
            _bounded(
                violations,
                "quota.messages_per_minute",
                given.messages_per_minute,
                MAX_MESSAGES_PER_MINUTE,
                "the server's default",
            )
        if "max_concurrent_runs" in paths:
            _bounded(
                violations,
                "quota.max_concurrent_runs",
                given.max_concurrent_runs,
                MAX_CONCURRENT_RUNS,
                "the server's default",
            )
        if "max_concurrent_calls" in paths:
            _bounded(
                violations,
                "quota.max_concurrent_calls",
                given.max_concurrent_calls,
                MAX_CONCURRENT_CALLS,
                "no limit of its own",
            )
        if "call_minutes_per_day" in paths:
            _bounded(
                violations,
                "quota.call_minutes_per_day",
                given.call_minutes_per_day,
                MAX_CALL_MINUTES_PER_DAY,
                "no limit",
            )
        if "api_keys" in paths:
            if len(given.api_keys) > MAX_API_KEYS:
                violations.add("quota.api_keys", f"may name at most {MAX_API_KEYS} API keys")
                violations.check()
            seen: set[str] = set()
            for index, key in enumerate(given.api_keys):
                prefix = f"quota.api_keys[{index}]"
                if ApiKeyName.parse_or_none(key.api_key) is None:
                    violations.add(
                        f"{prefix}.api_key",
                        "must be users/{user}/apiKeys/{key}" if key.api_key else "is required",
                    )
                elif key.api_key in seen:
                    violations.add(f"{prefix}.api_key", "is named by an earlier entry")
                seen.add(key.api_key)
                _bounded(
                    violations,
                    f"{prefix}.messages_per_minute",
                    key.messages_per_minute,
                    MAX_MESSAGES_PER_MINUTE,
                    "the workspace's",
                )
                _bounded(
                    violations,
                    f"{prefix}.max_concurrent_runs",
                    key.max_concurrent_runs,
                    MAX_CONCURRENT_RUNS,
                    "the workspace's",
                )
        violations.check()

    def _message(self, record: QuotaRecord) -> pb.WorkspaceQuota:
        shown = pb.WorkspaceQuota.FromString(record.data or b"")
        shown.name = str(QuotaName(record.workspace_id))
        shown.messages_per_minute = shown.messages_per_minute or self.defaults.messages_per_minute
        shown.max_concurrent_runs = shown.max_concurrent_runs or self.defaults.max_concurrent_runs
        shown.etag = names.etag_of(record.version)
        if record.updated_at is not None:
            shown.update_time.FromDatetime(record.updated_at)
        return shown

    def _limits(self, record: QuotaRecord) -> Limits:
        stored = pb.WorkspaceQuota.FromString(record.data or b"")
        return Limits(
            messages_per_minute=stored.messages_per_minute or self.defaults.messages_per_minute,
            max_concurrent_runs=stored.max_concurrent_runs or self.defaults.max_concurrent_runs,
            keys={
                key.api_key: KeyLimits(key.messages_per_minute, key.max_concurrent_runs)
                for key in stored.api_keys
            },
            max_concurrent_calls=stored.max_concurrent_calls,
            call_minutes_per_day=stored.call_minutes_per_day,
        )

    # -- admission (the hot path) -------------------------------------------------------

    async def limits(self, workspace_id: str) -> Limits:
        """What applies to the workspace's messages, cached ``CACHE_TTL_S``."""
        cached = self._cache.get(workspace_id)
        if cached is not None and self.clock() - cached.loaded_at < CACHE_TTL_S:
            self._cache.move_to_end(workspace_id)
            return cached.limits
        task = self._loading.get(workspace_id)
        if task is None:
            # One read per workspace however many messages wait for it.
            task = asyncio.get_running_loop().create_task(
                self._load(workspace_id), name=f"quota-{workspace_id}"
            )
            self._loading[workspace_id] = task
            task.add_done_callback(functools.partial(self._loaded, workspace_id))
        # Shielded: a caller that gives up does not cancel the others' read.
        return (await asyncio.shield(task)).limits

    async def check_active(self, principal: Principal, workspace_id: str, limits: Limits) -> None:
        """QUOTA_EXCEEDED (with RetryInfo) if one more active run would pass the
        workspace's concurrent-run quota or the caller's API key's."""
        key_limit = 0
        key_name = principal.api_key_name
        if key_name:
            own = limits.keys.get(key_name)
            key_limit = own.max_concurrent_runs if own is not None else 0
        counted_key = principal.api_key_id if key_limit else ""
        known = self._counts.get((workspace_id, counted_key))
        now = self.clock()
        if (
            known is not None
            and now - known.at < COUNT_TTL_S
            and known.workspace < limits.max_concurrent_runs
            and (not key_limit or known.api_key < key_limit)
        ):
            known.workspace += 1
            known.api_key += 1
            return
        active = await self._store.active_runs(workspace_id, counted_key)
        over: list[tuple[str, str]] = []
        if active.workspace >= limits.max_concurrent_runs:
            over.append(
                (
                    str(QuotaName(workspace_id)),
                    f"the workspace has {active.workspace} runs queued or running; "
                    f"its quota is {limits.max_concurrent_runs}",
                )
            )
        if key_limit and active.api_key >= key_limit:
            over.append(
                (
                    key_name,
                    f"this API key has {active.api_key} runs queued or running in the "
                    f"workspace; its quota is {key_limit}",
                )
            )
        if over:
            raise QuotaExceeded(
                f"{over[0][1]}; retry when one ends",
                subject=over[0][0],
                subjects=over,
                retry_after_s=ACTIVE_RETRY_S,
            )
        if len(self._counts) >= MAX_COUNTS:
            self._counts.clear()
        # This message's run counts from now on.
        self._counts[workspace_id, counted_key] = _Count(
            now, active.workspace + 1, active.api_key + 1
        )

    async def _load(self, workspace_id: str) -> _Cached:
        started = self.clock()
        return _Cached(self._limits(await self._store.get(workspace_id)), started)

    def _loaded(self, workspace_id: str, task: asyncio.Task[_Cached]) -> None:
        if task.cancelled():
            return
        failed = task.exception()  # retrieved even if every waiter gave up
        if self._loading.get(workspace_id) is not task:
            return  # a change came during the read: the next lookup reads again
        del self._loading[workspace_id]
        if failed is not None:
            return
        self._cache[workspace_id] = task.result()
        self._cache.move_to_end(workspace_id)
        while len(self._cache) > MAX_CACHED_WORKSPACES:
            self._cache.popitem(last=False)

    def _forget(self, workspace_id: str) -> None:
        self._cache.pop(workspace_id, None)
        self._loading.pop(workspace_id, None)
        for counted in [c for c in self._counts if c[0] == workspace_id]:
            del self._counts[counted]


@dataclass
class _Count:
    """A count of active runs (``at``: when it was read), plus this replica's
    admissions since."""

    at: float
    workspace: int
    api_key: int


def _bounded(violations: Violations, path: str, value: int, ceiling: int, zero: str) -> None:
    if not 0 <= value <= ceiling:
        violations.add(path, f"must be 0 ({zero}) to {ceiling:,}")
