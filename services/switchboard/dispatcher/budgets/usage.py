"""QueryUsage: what a workspace's runs spent, summed from the usage each run's end stores.

Runs store their tokens, cost, model, assistant, API key and the UTC day they
ended (``runs/core/store.py``); this groups them by the dimensions asked, filtered,
over whole UTC days: a day is counted if any of it lies in
[``start_time``, ``end_time``). Pages are offsets into the ordered groups,
signed with the days the first page resolved (so a page read after midnight
continues the same range). Members of the workspace may read it (the access
table). This module does not import grpc.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable
from typing import Final

from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.dispatcher.budgets.resources import mapping as budget_mapping
from switchboard.dispatcher.budgets.resources.store import UsageQuery, UsageStore
from switchboard.platform.errors import Violations
from switchboard.platform.store import pagination
from switchboard.platform.store.pagination import PageTokens
from switchboard.platform.values import timefields
from switchboard.platform.values.resources import ApiKeyName, AssistantName, WorkspaceName

DIMENSIONS: Final = {
    pb.USAGE_DIMENSION_DAY: "day",
    pb.USAGE_DIMENSION_ASSISTANT: "assistant",
    pb.USAGE_DIMENSION_API_KEY: "api_key",
    pb.USAGE_DIMENSION_MODEL: "model",
}
MAX_DAYS: Final = 400
DEFAULT_DAYS: Final = 30
DEFAULT_PAGE: Final = 500
MAX_PAGE: Final = 1_000
#: The ``runs.model`` column's width.
MAX_MODEL: Final = 256
_DAY: Final = pagination.Text(re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}"))
_FIRST_INSTANT: Final = dt.datetime(1, 1, 1, tzinfo=dt.UTC)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class Usage:
    def __init__(self, store: UsageStore, page_tokens: PageTokens) -> None:
        self._store = store
        self._pages = page_tokens
        #: What "now" is for a query without ``end_time`` (tests move it).
        self.clock: Callable[[], dt.datetime] = _now

    def _days(self, request: pb.QueryUsageRequest, violations: Violations) -> tuple[str, str]:
        """The first and last UTC day of the request's range (inclusive)."""
        end = (
            timefields.timestamp(request.end_time, "end_time")
            if request.HasField("end_time")
            else self.clock()
        )
        if request.HasField("start_time"):
            start = timefields.timestamp(request.start_time, "start_time")
        else:
            span = dt.timedelta(days=DEFAULT_DAYS)
            start = end - span if end - _FIRST_INSTANT >= span else _FIRST_INSTANT
        if end <= start:
            violations.add("end_time", "must be after start_time")
            return "", ""
        if end - start > dt.timedelta(days=MAX_DAYS):
            violations.add("end_time", f"must be at most {MAX_DAYS} days after start_time")
            return "", ""
        # end_time is exclusive: a range ending at midnight does not take that day.
        last = (end - dt.timedelta(microseconds=1)).date()
        return start.date().isoformat(), last.isoformat()

    def _query(self, request: pb.QueryUsageRequest) -> tuple[UsageQuery, Violations]:
        workspace = WorkspaceName.parse(request.parent, "parent")
        workspace_id = workspace.workspace
        violations = Violations()
        group_by: list[str] = []
        for index, dimension in enumerate(request.group_by):
            name = DIMENSIONS.get(dimension)
            if name is None:
                violations.add(f"group_by[{index}]", "must be DAY, ASSISTANT, API_KEY or MODEL")
            elif name in group_by:
                violations.add(f"group_by[{index}]", "repeats an earlier dimension")
            else:
                group_by.append(name)
        assistant_id: str | None = None
        if request.assistant:
            assistant = AssistantName.parse_or_none(request.assistant)
            if assistant is None:
                violations.add("assistant", "must be workspaces/{w}/assistants/{a}")
            elif assistant.parent != workspace:
                violations.add("assistant", f"must be an assistant of {workspace}")
            else:
                assistant_id = assistant.assistant
        api_key: tuple[str, str] | None = None
        if request.api_key:
            key = ApiKeyName.parse_or_none(request.api_key)
            if key is None:
                violations.add("api_key", "must be users/{u}/apiKeys/{k}")
            else:
                api_key = (key.user, key.key)
        if len(request.model) > MAX_MODEL:
            violations.add("model", f"is longer than {MAX_MODEL} characters")
        first_day, last_day = self._days(request, violations)
        query = UsageQuery(
            workspace_id=workspace_id,
            group_by=tuple(group_by),
            first_day=first_day,
            last_day=last_day,
            assistant_id=assistant_id,
            api_key=api_key,
            model=request.model or None,
        )
        return query, violations

    async def query(self, request: pb.QueryUsageRequest) -> pb.QueryUsageResponse:
        query, violations = self._query(request)
        size = pagination.page_size(request.page_size, default=DEFAULT_PAGE, maximum=MAX_PAGE)
        violations.check()
        # The filters as asked (not the days they resolve to: those travel in the token).
        fingerprint = pagination.fingerprint(
            "usage",
            query.workspace_id,
            query.group_by,
            query.assistant_id,
            query.api_key,
            query.model,
            request.start_time.SerializeToString(deterministic=True),
            request.end_time.SerializeToString(deterministic=True),
        )
        offset = 0
        if request.page_token:
            decoded = self._pages.decode(
                request.page_token, fingerprint, (pagination.COUNT, _DAY, _DAY)
            )
            offset = int(decoded[0])
            query = UsageQuery(
                workspace_id=query.workspace_id,
                group_by=query.group_by,
                first_day=str(decoded[1]),
                last_day=str(decoded[2]),
                assistant_id=query.assistant_id,
                api_key=query.api_key,
                model=query.model,
            )
        found = await self._store.sums(query, offset, size + 1)
        response = pb.QueryUsageResponse(
            rows=[budget_mapping.usage_row(query.workspace_id, row) for row in found[:size]]
        )
        if len(found) > size:
            response.next_page_token = self._pages.encode(
                [offset + size, query.first_day, query.last_day], fingerprint
            )
        return response
