"""ListEvents: the retained log of some scopes, page by page.

A page token is bound to the request's scopes and types and names the log
position to go on after. One call reads at most ``MAX_SCAN`` log entries,
matching or not, so a sparse scope cannot make it scan the whole log; a page
that stopped short still carries a token.
"""

from __future__ import annotations

from typing import Final

from switchboard.api.events.v1 import events_pb2
from switchboard.events.subscriptions import Limits, authorize, matches, parse_spec
from switchboard.platform.events.bus import EventBus
from switchboard.platform.events.eventlog import format_cursor, logged_part
from switchboard.platform.security.policy import Policy, Principal
from switchboard.platform.store import pagination

DEFAULT_PAGE_SIZE: Final = 100
MAX_PAGE_SIZE: Final = 500
#: ListEvents reads at most this many log entries per call, matching or not,
#: so a sparse scope cannot make one call scan the whole log.
MAX_SCAN: Final = 5_000


class History:
    """Pages through the bus's log for a caller who may read every scope asked for."""

    def __init__(
        self, *, bus: EventBus, policy: Policy, limits: Limits, page_tokens: pagination.PageTokens
    ) -> None:
        self._bus = bus
        self._policy = policy
        self._limits = limits
        self._pages = page_tokens

    async def list_events(
        self, principal: Principal, request: events_pb2.ListEventsRequest
    ) -> events_pb2.ListEventsResponse:
        page_size = pagination.page_size(
            request.page_size, default=DEFAULT_PAGE_SIZE, maximum=MAX_PAGE_SIZE
        )
        spec = parse_spec(request.scopes, request.after_cursor, request.types, self._limits)
        fingerprint = pagination.fingerprint("events", spec.scopes, sorted(spec.types))
        await authorize(self._policy, principal, spec)
        start = spec.after
        if request.page_token:
            major, minor = self._pages.decode(
                request.page_token, fingerprint, (pagination.U64, pagination.U64)
            )
            start = (int(major), int(minor))
        if start is None:
            start = await self._bus.horizon()
        # The log's history: tokens are not in it (a token's cursor reads from the event before).
        start = logged_part(start)
        await self._bus.check_cursor(start)
        upto = logged_part(await self._bus.newest())
        keys = frozenset(spec.keys)
        events: list[events_pb2.Event] = []
        position, scanned = start, 0
        while len(events) < page_size and scanned < MAX_SCAN and position < upto:
            page = await self._bus.read(position, upto, min(500, MAX_SCAN - scanned))
            if not page:
                position = upto
                break
            for item in page:
                scanned += 1
                position = item.position
                if matches(item, keys, spec.types):
                    events.append(item.event)
                    if len(events) == page_size:
                        break
        response = events_pb2.ListEventsResponse(
            events=events, oldest_cursor=format_cursor(await self._bus.horizon())
        )
        if position < upto:
            response.next_page_token = self._pages.encode(position, fingerprint)
        return response
