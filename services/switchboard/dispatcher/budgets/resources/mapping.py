"""A budget's record as the contract shows it.

As ``pb.Budget`` (with the usage of its current period when the caller read
it), and as the BUDGET_CHANGED event of a change to it.
"""

from __future__ import annotations

from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.api.events.v1 import events_pb2
from switchboard.dispatcher import mapping
from switchboard.dispatcher.budgets.resources.periods import Period
from switchboard.dispatcher.budgets.resources.store import BudgetRecord, UsageSum, Window
from switchboard.platform.security.policy import Principal
from switchboard.platform.values import names
from switchboard.platform.values.resources import ApiKeyName, BudgetName


def message(record: BudgetRecord) -> pb.Budget:
    shown = pb.Budget.FromString(record.data)
    shown.name = str(BudgetName(record.workspace_id, record.id))
    shown.etag = names.etag_of(record.version)
    shown.create_time.FromDatetime(record.created_at)
    shown.update_time.FromDatetime(record.updated_at)
    return shown


def usage(period: Period, window: Window) -> pb.BudgetUsage:
    shown = pb.BudgetUsage(
        cost_micros=window.cost_used,
        input_tokens=window.input_used,
        output_tokens=window.output_used,
        reserved_cost_micros=window.cost_held,
        reserved_input_tokens=window.input_held,
        reserved_output_tokens=window.output_held,
    )
    if period.start is not None:
        shown.period_start_time.FromDatetime(period.start)
    if period.end is not None:
        shown.reset_time.FromDatetime(period.end)
    return shown


def event(
    principal: Principal, change: events_pb2.ChangeKind.ValueType, record: BudgetRecord
) -> events_pb2.Event:
    # The workspace is the event's scope: only its members see it.
    return events_pb2.Event(
        type=events_pb2.EVENT_TYPE_BUDGET_CHANGED,
        actor=mapping.actor(principal),
        workspace=mapping.workspace_name(record.workspace_id),
        budget_changed=events_pb2.BudgetChanged(change=change, budget=message(record)),
    )


def usage_row(workspace_id: str, found: UsageSum) -> pb.UsageRow:
    """One group's sums, its dimensions as the contract names them."""
    keys = found.keys
    row = pb.UsageRow(
        day=keys.get("day", ""),
        model=keys.get("model", ""),
        run_count=found.run_count,
        input_tokens=found.input_tokens,
        output_tokens=found.output_tokens,
        cost_micros=found.cost_micros,
        budget_lowered_runs=found.budget_lowered_runs,
        unpriced_runs=found.unpriced_runs,
        call_count=found.call_count,
        call_seconds=found.call_seconds,
    )
    assistant_id = keys.get("assistant", "")
    if assistant_id:
        row.assistant = mapping.assistant_name(workspace_id, assistant_id)
    key_id = keys.get("api_key", "")
    if key_id and found.key_user:
        row.api_key = str(ApiKeyName(found.key_user, key_id))
    return row
