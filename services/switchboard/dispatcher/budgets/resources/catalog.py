"""Budgets as resources: a workspace's caps on cost and tokens (docs/budgets.md).

Owners create, update and delete them (the access table checks the role before
any of this runs), members read them with the usage of their current period
(read from ``budget_windows``, which the ledger writes). Every change is
written with its BUDGET_CHANGED event (the outbox), scoped to the workspace so
only its members see it. An update or a delete calls ``on_change`` with the
workspace's id: runs paused at a cap there may go on.

A scope names the workspace itself, one of its assistants (which must exist)
or an API key (``users/{u}/apiKeys/{k}``): the dispatcher cannot read the auth
service's keys, so a well-formed name is accepted as it is.

This module does not import grpc; the servicer is transport only.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Final

from google.protobuf import field_mask_pb2

from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.api.events.v1 import events_pb2
from switchboard.dispatcher.budgets.resources import mapping as budget_mapping
from switchboard.dispatcher.budgets.resources import periods
from switchboard.dispatcher.budgets.resources.store import (
    API_KEY,
    ASSISTANT,
    WORKSPACE,
    BudgetRecord,
    BudgetStore,
    NewBudget,
    Window,
)
from switchboard.platform.errors import FieldViolation, InvalidArgument, Violations
from switchboard.platform.events.bus import EventBus
from switchboard.platform.security.policy import Principal
from switchboard.platform.store.keyed import Catalog
from switchboard.platform.store.pagination import PageTokens
from switchboard.platform.store.storage import idempotency
from switchboard.platform.values import names, timefields
from switchboard.platform.values.fieldmask import update_paths
from switchboard.platform.values.resources import (
    ApiKeyName,
    AssistantName,
    BudgetName,
    WorkspaceName,
)

log = logging.getLogger("switchboard.dispatcher.budgets.resources.catalog")

#: The caps, each optional (unset: no cap); at least one is set.
CAPS: Final = ("cost_limit_micros", "input_token_limit", "output_token_limit", "total_token_limit")
#: What UpdateBudget may change, in the contract's order (the scope cannot change).
MUTABLE: Final = ("display_name", "period", "time_zone", *CAPS, "alert_thresholds")
PERIODS: Final = frozenset(
    {
        pb.BUDGET_PERIOD_RUN,
        pb.BUDGET_PERIOD_DAY,
        pb.BUDGET_PERIOD_WEEK,
        pb.BUDGET_PERIOD_MONTH,
        pb.BUDGET_PERIOD_TOTAL,
    }
)
MAX_DISPLAY_NAME: Final = 200
MAX_THRESHOLDS: Final = 10
#: Budgets one workspace may hold: every run reads those that apply to it.
MAX_PER_WORKSPACE: Final = 100
_SCOPES: Final = (
    "workspaces/{w} (this workspace), workspaces/{w}/assistants/{a} or users/{u}/apiKeys/{k}"
)


def _thresholds(thresholds: Sequence[int], violations: Violations) -> list[int]:
    """The alert thresholds as stored: ascending, the order in which usage reaches them."""
    if len(thresholds) > MAX_THRESHOLDS:
        violations.add("budget.alert_thresholds", f"may hold at most {MAX_THRESHOLDS} percentages")
    seen: set[int] = set()
    for index, percent in enumerate(thresholds):
        field = f"budget.alert_thresholds[{index}]"
        if not 1 <= percent <= 100:
            violations.add(field, "must be a percentage from 1 to 100")
        elif percent in seen:
            violations.add(field, f"repeats {percent}")
        seen.add(percent)
    return sorted(seen)


def _nothing(workspace_id: str) -> None:
    """The default ``on_change``: nobody waits for budgets to change."""


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class Budgets:
    def __init__(
        self,
        store: BudgetStore,
        bus: EventBus,
        page_tokens: PageTokens,
        *,
        assistant_exists: Callable[[str, str], Awaitable[bool]],
        max_per_workspace: int = MAX_PER_WORKSPACE,
        on_change: Callable[[str], None] = _nothing,
    ) -> None:
        self._store = store
        self._catalog = Catalog(store, bus, page_tokens)
        self._assistant_exists = assistant_exists
        self.max_per_workspace = max_per_workspace
        #: Called with the workspace's id after a budget of it was updated or deleted
        #: (in this process; other processes see the BUDGET_CHANGED event).
        self.on_change = on_change
        #: What "now" is for a budget's current period (tests move it).
        self.clock: Callable[[], dt.datetime] = _now

    # -- validation -----------------------------------------------------------------------

    @staticmethod
    def _check(
        given: pb.Budget, paths: Sequence[str], fallback_name: str, violations: Violations
    ) -> pb.Budget:
        """The stored form of ``given``'s ``paths``, each bad one a violation (an empty
        display name is ``fallback_name``, the budget's id, as for assistants)."""
        clean = pb.Budget()
        if "display_name" in paths:
            display_name = given.display_name.strip()
            if len(display_name) > MAX_DISPLAY_NAME:
                violations.add(
                    "budget.display_name", f"is longer than {MAX_DISPLAY_NAME} characters"
                )
            clean.display_name = display_name or fallback_name
        if "period" in paths:
            if given.period not in PERIODS:
                violations.add("budget.period", "must be RUN, DAY, WEEK, MONTH or TOTAL")
            clean.period = given.period
        if "time_zone" in paths:
            if timefields.zone(given.time_zone) is None:
                violations.add(
                    "budget.time_zone",
                    "is not a known IANA time zone (for example Europe/Paris); empty for UTC",
                )
            clean.time_zone = given.time_zone
        for cap in CAPS:
            if cap in paths and given.HasField(cap):
                value = getattr(given, cap)
                if value <= 0:
                    violations.add(f"budget.{cap}", "must be positive (unset for no cap)")
                setattr(clean, cap, value)
        if "alert_thresholds" in paths:
            clean.alert_thresholds.extend(_thresholds(given.alert_thresholds, violations))
        return clean

    @staticmethod
    def _has_cap(budget: pb.Budget) -> bool:
        return any(budget.HasField(cap) for cap in CAPS)

    @staticmethod
    def _no_cap() -> InvalidArgument:
        description = "sets no cap: set at least one of " + ", ".join(CAPS)
        return InvalidArgument(f"budget {description}", [FieldViolation("budget", description)])

    @staticmethod
    def _scope(workspace_id: str, scope: str, violations: Violations) -> tuple[str, str]:
        """The scope's (kind, id); ("", "") with its violation added if it is bad."""
        field = "budget.scope"
        if not scope:
            violations.add(field, f"is required: {_SCOPES}")
            return "", ""
        workspace = WorkspaceName(workspace_id)
        if (whole := WorkspaceName.parse_or_none(scope)) is not None:
            if whole != workspace:
                violations.add(field, f"must be this workspace ({workspace})")
                return "", ""
            return WORKSPACE, ""
        if (assistant := AssistantName.parse_or_none(scope)) is not None:
            if assistant.parent != workspace:
                violations.add(field, f"must be an assistant of {workspace}")
                return "", ""
            # Checked last (``create`` refuses the cheap faults first).
            return ASSISTANT, assistant.assistant
        if (key := ApiKeyName.parse_or_none(scope)) is not None:
            # API key ids are unique: the id alone finds the key's runs (runs.api_key_id).
            return API_KEY, key.key
        violations.add(field, f"must be {_SCOPES}")
        return "", ""

    # -- usage ----------------------------------------------------------------------------

    async def _shown(self, records: Sequence[BudgetRecord]) -> list[pb.Budget]:
        """The budgets as the contract shows them, each with its current period's usage
        (one read for all of them)."""
        at = self.clock()
        shown = [budget_mapping.message(record) for record in records]
        current: dict[str, periods.Period] = {}
        for budget in shown:
            if budget.period == pb.BUDGET_PERIOD_RUN:
                continue  # each run is its own period: no usage to show
            try:
                current[budget.name] = periods.period_of(budget.period, budget.time_zone, at)
            except ValueError:
                log.warning("budget %s has an unknown period or time zone", budget.name)
        if not records:
            return shown
        workspace_id = records[0].workspace_id
        keys = [
            (record.id, current[budget.name].window)
            for record, budget in zip(records, shown, strict=True)
            if budget.name in current
        ]
        windows = await self._store.windows(workspace_id, keys)
        for record, budget in zip(records, shown, strict=True):
            period = current.get(budget.name)
            if period is not None:
                window = windows.get((record.id, period.window), Window())
                budget.usage.CopyFrom(budget_mapping.usage(period, window))
        return shown

    # -- CRUD -----------------------------------------------------------------------------

    async def create(self, principal: Principal, request: pb.CreateBudgetRequest) -> pb.Budget:
        workspace_id = WorkspaceName.parse(request.parent, "parent").workspace
        violations = Violations()
        if request.budget_id and not names.CLIENT_ID.fullmatch(request.budget_id):
            violations.add("budget_id", names.CLIENT_ID_RULE.must)
        key = idempotency(principal.user_id, "CreateBudget", request)
        budget_id = request.budget_id or names.new_id()
        given = request.budget
        clean = self._check(given, MUTABLE, budget_id, violations)
        scope = self._scope(workspace_id, given.scope, violations)
        if not self._has_cap(given):
            violations.add("budget", "sets no cap: set at least one of " + ", ".join(CAPS))
        violations.check()
        kind, scope_id = scope
        if kind == ASSISTANT and not await self._assistant_exists(workspace_id, scope_id):
            violations.add("budget.scope", f"names no assistant of this workspace ({given.scope})")
            violations.check()
        clean.scope = given.scope
        record = NewBudget(
            workspace_id=workspace_id,
            id=budget_id,
            scope_kind=kind,
            scope_id=scope_id,
            data=clean.SerializeToString(deterministic=True),
            creator=principal.user_name,
        )
        created = await self._catalog.created(
            str(BudgetName(workspace_id, budget_id)),
            key,
            lambda done: [
                budget_mapping.event(principal, events_pb2.CHANGE_KIND_CREATED, done.record)
            ],
            lambda staged: self._store.create(
                record, idempotency=key, max_per_workspace=self.max_per_workspace, staged=staged
            ),
        )
        (shown,) = await self._shown([created.record])
        return shown

    async def get(self, name: str) -> pb.Budget:
        budget = BudgetName.parse(name, "name")
        record = await self._catalog.found(name, budget.workspace, budget.budget)
        (shown,) = await self._shown([record])
        return shown

    async def list_budgets(self, request: pb.ListBudgetsRequest) -> pb.ListBudgetsResponse:
        records, token = await self._catalog.listed(
            request.parent, request.page_size, request.page_token, default=50
        )
        return pb.ListBudgetsResponse(budgets=await self._shown(records), next_page_token=token)

    @staticmethod
    def _paths(request: pb.UpdateBudgetRequest) -> list[str]:
        given = request.budget
        if not request.update_mask.paths:
            # No mask: the fields the request sets (AIP-134); a cap is set when present,
            # so a zero cap is refused rather than ignored.
            present = {cap for cap in CAPS if given.HasField(cap)}
            return [path for path in MUTABLE if path in present or bool(getattr(given, path))]
        return update_paths(request.update_mask, given, MUTABLE)

    async def update(self, principal: Principal, request: pb.UpdateBudgetRequest) -> pb.Budget:
        given = request.budget
        budget = BudgetName.parse(given.name, "budget.name")
        workspace_id, budget_id = budget.workspace, budget.budget
        paths = self._paths(request)
        names.checked_etag(given.etag, "budget.etag")
        violations = Violations()
        clean = self._check(given, paths, budget_id, violations)
        violations.check()
        mask = field_mask_pb2.FieldMask(paths=[p for p in paths if p not in CAPS])

        def edit(data: bytes) -> bytes:
            stored = pb.Budget.FromString(data)
            mask.MergeMessage(clean, stored, replace_repeated_field=True)
            for cap in CAPS:
                if cap in paths:
                    # In the mask but unset: the cap is removed.
                    if clean.HasField(cap):
                        setattr(stored, cap, getattr(clean, cap))
                    else:
                        stored.ClearField(cap)
            if not self._has_cap(stored):
                raise self._no_cap()  # inside the transaction: nothing is written
            return stored.SerializeToString(deterministic=True)

        record = await self._catalog.changed(
            given.name,
            lambda done: [budget_mapping.event(principal, events_pb2.CHANGE_KIND_UPDATED, done)],
            lambda staged: self._store.update(workspace_id, budget_id, given.etag, edit, staged),
        )
        self.on_change(workspace_id)
        (shown,) = await self._shown([record])
        return shown

    async def delete(self, principal: Principal, name: str, etag: str) -> None:
        budget = BudgetName.parse(name, "name")
        names.checked_etag(etag, "etag")
        await self._catalog.changed(
            name,
            lambda done: [budget_mapping.event(principal, events_pb2.CHANGE_KIND_DELETED, done)],
            lambda staged: self._store.delete(budget.workspace, budget.budget, etag, staged),
        )
        self.on_change(budget.workspace)
