"""Persistence of webhook deliveries: the delivery rows (the feeder's cursor and lease,
``webhook_cursor``, are the leased feeder's: ``platform/events/feedstore.py``).

The store owns the SQL and the dialect choices; ``delivery.py`` owns what the
rows mean. Two rules keep deliveries exactly-once recorded and ordered:

* The deliveries of a batch of events are inserted in the transaction that
  moves the feeder's cursor past them (``recording``, run by the feeder's
  compare-and-set), so an event becomes deliveries once whichever replica
  reads it; the unique (workspace, integration, event) constraint makes any
  repeat harmless.
* A delivery is claimed (``claimed_by``/``claimed_until``) only while it is
  the oldest pending one of its endpoint and no live claim holds it, under
  ``FOR UPDATE SKIP LOCKED`` on PostgreSQL (SQLite has one writer), so at
  most one attempt per endpoint is in flight across every replica.

An endpoint is a webhook integration or an A2A push config (written by
``a2a/push/store.py``): deliveries name it by ``integration_id`` (a push
config's holds a ``.``), and the queries join both tables.

Nothing here raises a request-field error or builds a resource name.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, TypeVar

from sqlalchemy import and_, case, delete, exists, func, or_, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session, aliased

from switchboard.api.integration.v1 import integration_pb2
from switchboard.platform.store.db import Database
from switchboard.platform.store.models import (
    IntegrationRow,
    PushConfigRow,
    WebhookDeliveryRow,
)
from switchboard.platform.store.storage import transaction
from switchboard.platform.values.names import now

log = logging.getLogger("switchboard.integration.webhooks.delivery")

_T = TypeVar("_T")

WEBHOOK: Final = integration_pb2.INTEGRATION_KIND_WEBHOOK
PENDING: Final = integration_pb2.DELIVERY_STATE_PENDING
SUCCEEDED: Final = integration_pb2.DELIVERY_STATE_SUCCEEDED
FAILED: Final = integration_pb2.DELIVERY_STATE_FAILED


@dataclass(frozen=True)
class Subscriber:
    """A webhook integration as the feeder matches events against it."""

    workspace_id: str
    integration_id: str
    #: Subscribed ``EventType`` names without the prefix; empty means all.
    event_types: frozenset[str]
    created_at: dt.datetime
    #: A push config's task, ``(conversation id, run id)``: only its status changes,
    #: from whenever the feeder reads them (the config records what came before).
    task: tuple[str, str] | None = None


@dataclass(frozen=True)
class NewDelivery:
    """A delivery the feeder records."""

    id: str
    workspace_id: str
    integration_id: str
    seq: int
    event_id: str
    event_type: str
    data: bytes
    #: The task's final status, to a push config (its pruning clock starts).
    ends_task: bool = False


@dataclass(frozen=True)
class PushTarget:
    """What sending to a push config needs beyond a webhook's (secrets still sealed)."""

    conversation_id: str
    run_id: str
    token: bytes | None
    auth_scheme: str
    credentials: bytes | None


@dataclass(frozen=True)
class Claimed:
    """A delivery this replica holds, with what sending it needs."""

    id: str
    workspace_id: str
    integration_id: str
    seq: int
    event_id: str
    data: bytes
    attempts: int
    created_at: dt.datetime
    endpoint: str
    credential: bytes | None
    previous_credential: bytes | None
    previous_until: dt.datetime | None
    #: The endpoint's last change (a re-enable or an edit restarts its failure clock).
    endpoint_updated_at: dt.datetime
    #: Set when the endpoint is a push config.
    push: PushTarget | None = None


@dataclass(frozen=True)
class Outcome:
    """One attempt's result, as recorded."""

    succeeded: bool
    http_status: int
    error: str
    #: None: the delivery is failed for good; else when to try again.
    next_attempt_at: dt.datetime | None
    #: Whether the attempt counts (a refusal by an open circuit does not).
    counted: bool = True


_Delivery = aliased(WebhookDeliveryRow, name="earlier")


def _claimable(now_: dt.datetime) -> Any:
    """Pending, due, not held by a live claim, and the oldest pending one of its endpoint."""
    return and_(
        WebhookDeliveryRow.state == PENDING,
        WebhookDeliveryRow.next_attempt_at <= now_,
        or_(WebhookDeliveryRow.claimed_until.is_(None), WebhookDeliveryRow.claimed_until < now_),
        ~exists().where(
            _Delivery.workspace_id == WebhookDeliveryRow.workspace_id,
            _Delivery.integration_id == WebhookDeliveryRow.integration_id,
            _Delivery.state == PENDING,
            _Delivery.seq < WebhookDeliveryRow.seq,
        ),
    )


def _endpoints(query: Any) -> Any:
    """``query`` over deliveries, joined to their endpoint: a webhook or a push config."""
    return query.outerjoin(
        IntegrationRow,
        and_(
            IntegrationRow.workspace_id == WebhookDeliveryRow.workspace_id,
            IntegrationRow.id == WebhookDeliveryRow.integration_id,
        ),
    ).outerjoin(
        PushConfigRow,
        and_(
            PushConfigRow.workspace_id == WebhookDeliveryRow.workspace_id,
            PushConfigRow.endpoint_id == WebhookDeliveryRow.integration_id,
        ),
    )


#: The endpoint exists and may be sent to (a push config once its earlier status is in).
_SENDABLE: Final = or_(
    IntegrationRow.disabled.is_(False),
    and_(PushConfigRow.ready.is_(True), PushConfigRow.disabled.is_(False)),
)


def _claim_query(now_: dt.datetime) -> Any:
    return (
        _endpoints(
            select(
                WebhookDeliveryRow,
                func.coalesce(IntegrationRow.endpoint, PushConfigRow.url),
                IntegrationRow.credential,
                IntegrationRow.previous_credential,
                IntegrationRow.previous_until,
                func.coalesce(IntegrationRow.updated_at, PushConfigRow.created_at),
                PushConfigRow.endpoint_id,
                PushConfigRow.conversation_id,
                PushConfigRow.run_id,
                PushConfigRow.token,
                PushConfigRow.auth_scheme,
                PushConfigRow.credentials,
            )
        )
        .where(_claimable(now_), _SENDABLE)
        .with_for_update(skip_locked=True, of=WebhookDeliveryRow)
    )


def _claim(db: Session, rows: Sequence[Any], holder: str, until: dt.datetime) -> list[Claimed]:
    claimed: list[Claimed] = []
    for (
        row,
        endpoint,
        credential,
        previous,
        previous_until,
        updated_at,
        push_endpoint,
        conversation_id,
        run_id,
        token,
        auth_scheme,
        credentials,
    ) in rows:
        row.claimed_by = holder
        row.claimed_until = until
        push = None
        if push_endpoint is not None:
            push = PushTarget(conversation_id, run_id, token, auth_scheme, credentials)
        claimed.append(
            Claimed(
                id=row.id,
                workspace_id=row.workspace_id,
                integration_id=row.integration_id,
                seq=row.seq,
                event_id=row.event_id,
                data=row.data,
                attempts=row.attempts,
                created_at=row.created_at,
                endpoint=endpoint,
                credential=credential,
                previous_credential=previous,
                previous_until=previous_until,
                endpoint_updated_at=updated_at,
                push=push,
            )
        )
    db.flush()
    return claimed


class WebhookStore:
    """The webhook tables of one database."""

    def __init__(self, database: Database) -> None:
        self._database = database
        self._sqlite = database.dialect_name == "sqlite"

    async def _run(self, work: Callable[[Session], _T], *, write: bool) -> _T:
        return await transaction(self._database, work, write=write, log=log)

    # -- the feeder ----------------------------------------------------------------------

    async def subscribers(self, workspace_ids: Sequence[str]) -> list[Subscriber]:
        """The enabled webhooks of these workspaces."""

        def work(db: Session) -> list[Subscriber]:
            return _subscribers(db, workspace_ids)

        return await self._run(work, write=False)

    async def subscribed_workspaces(self) -> set[str]:
        """The workspaces with at least one enabled webhook or push config."""

        def work(db: Session) -> set[str]:
            webhooks = db.execute(
                select(IntegrationRow.workspace_id)
                .where(IntegrationRow.kind == WEBHOOK, IntegrationRow.disabled.is_(False))
                .distinct()
            ).scalars()
            pushed = db.execute(
                select(PushConfigRow.workspace_id)
                .where(PushConfigRow.disabled.is_(False))
                .distinct()
            ).scalars()
            return {*webhooks, *pushed}

        return await self._run(work, write=False)

    async def pushed_workspaces(self, workspace_ids: Sequence[str]) -> set[str]:
        """Which of ``workspace_ids`` have an enabled push config (one made since the
        feeder's cached set was read: configs come without an event)."""

        def work(db: Session) -> set[str]:
            return set(
                db.execute(
                    select(PushConfigRow.workspace_id)
                    .where(
                        PushConfigRow.workspace_id.in_(sorted(set(workspace_ids))),
                        PushConfigRow.disabled.is_(False),
                    )
                    .distinct()
                ).scalars()
            )

        return await self._run(work, write=False)

    def recording(
        self,
        deliveries: Callable[[list[Subscriber]], list[NewDelivery]],
        workspace_ids: Sequence[str],
    ) -> Callable[[Session], int]:
        """The deliveries of a batch of events, as the work of the feeder's transaction
        that moves the cursor past them.

        ``deliveries`` maps the enabled webhooks of ``workspace_ids`` (read in
        that transaction) to the rows to insert; the work returns the number of
        deliveries recorded (repeats are ignored).
        """

        def work(db: Session) -> int:
            rows = deliveries(_subscribers(db, workspace_ids)) if workspace_ids else []
            if not rows:
                return 0
            when = now()
            insert = sqlite_insert if self._sqlite else pg_insert
            ended = [row for row in rows if row.ends_task]
            for row in ended:
                db.execute(
                    update(PushConfigRow)
                    .where(
                        PushConfigRow.workspace_id == row.workspace_id,
                        PushConfigRow.endpoint_id == row.integration_id,
                        PushConfigRow.ended_at.is_(None),
                    )
                    .values(ended_at=when)
                )
            result = db.execute(
                insert(WebhookDeliveryRow)
                .values(
                    [
                        {
                            "id": row.id,
                            "workspace_id": row.workspace_id,
                            "integration_id": row.integration_id,
                            "seq": row.seq,
                            "event_id": row.event_id,
                            "event_type": row.event_type,
                            "data": row.data,
                            "state": PENDING,
                            "attempts": 0,
                            "last_http_status": 0,
                            "last_error": "",
                            "created_at": when,
                            "next_attempt_at": when,
                            "claimed_by": "",
                        }
                        for row in rows
                    ]
                )
                .on_conflict_do_nothing(
                    index_elements=[
                        WebhookDeliveryRow.workspace_id,
                        WebhookDeliveryRow.integration_id,
                        WebhookDeliveryRow.event_id,
                    ]
                )
            )
            return _count(result)

        return work

    # -- the sender --------------------------------------------------------------------

    async def claim(
        self, holder: str, until: dt.datetime, limit: int
    ) -> tuple[list[Claimed], dt.datetime | None]:
        """Claim up to ``limit`` due deliveries, each the head of its endpoint's queue.

        Also returns when the next pending delivery falls due (a hint for how
        long the sender may sleep), or None if none waits. A read transaction
        looks first, so an idle sender writes nothing.
        """

        def due(db: Session, current: dt.datetime) -> dt.datetime | None:
            return db.scalar(
                select(func.min(WebhookDeliveryRow.next_attempt_at)).where(
                    WebhookDeliveryRow.state == PENDING,
                    WebhookDeliveryRow.next_attempt_at > current,
                )
            )

        def look(db: Session) -> tuple[bool, dt.datetime | None]:
            current = now()
            found = db.execute(
                _endpoints(select(WebhookDeliveryRow.id))
                .where(_claimable(current), _SENDABLE)
                .limit(1)
            ).first()
            return found is not None, due(db, current)

        anything, next_due = await self._run(look, write=False)
        if not anything:
            return [], next_due

        def work(db: Session) -> tuple[list[Claimed], dt.datetime | None]:
            current = now()
            rows = db.execute(
                _claim_query(current)
                .order_by(WebhookDeliveryRow.next_attempt_at, WebhookDeliveryRow.seq)
                .limit(limit)
            ).all()
            return _claim(db, rows, holder, until), due(db, current)

        return await self._run(work, write=True)

    async def record(
        self, claimed: Claimed, holder: str, outcome: Outcome, until: dt.datetime
    ) -> tuple[bool, Claimed | None]:
        """Record an attempt's outcome; after a success, claim the endpoint's next delivery.

        Returns (recorded, the next delivery now claimed or None). Not
        recorded when this replica's claim was taken over meanwhile (the other
        replica's attempt decides).
        """

        def work(db: Session) -> tuple[bool, Claimed | None]:
            current = now()
            if outcome.succeeded:
                state = SUCCEEDED
            elif outcome.next_attempt_at is None:
                state = FAILED
            else:
                state = PENDING
            values: dict[str, Any] = {
                "state": state,
                "last_http_status": outcome.http_status,
                "last_error": outcome.error[:500],
                "next_attempt_at": outcome.next_attempt_at if state == PENDING else None,
                "claimed_by": "",
                "claimed_until": None,
            }
            if outcome.counted:
                values["attempts"] = WebhookDeliveryRow.attempts + 1
                values["last_attempt_at"] = current
            done = db.execute(
                update(WebhookDeliveryRow)
                .where(
                    WebhookDeliveryRow.id == claimed.id,
                    WebhookDeliveryRow.claimed_by == holder,
                    WebhookDeliveryRow.state == PENDING,
                )
                .values(**values)
            )
            if not _count(done):
                return False, None
            if state == PENDING:
                return True, None
            # The endpoint's queue moved on: its next delivery, if due, goes out
            # from here at once (one transaction, no claim round in between).
            rows = db.execute(
                _claim_query(current)
                .where(
                    WebhookDeliveryRow.workspace_id == claimed.workspace_id,
                    WebhookDeliveryRow.integration_id == claimed.integration_id,
                )
                .order_by(WebhookDeliveryRow.seq)
                .limit(1)
            ).all()
            following = _claim(db, rows, holder, until)
            return True, following[0] if following else None

        return await self._run(work, write=True)

    async def release(self, holder: str) -> int:
        """Drop this replica's claims (a clean shutdown): another replica sends them now."""

        def work(db: Session) -> int:
            result = db.execute(
                update(WebhookDeliveryRow)
                .where(
                    WebhookDeliveryRow.claimed_by == holder,
                    WebhookDeliveryRow.state == PENDING,
                )
                .values(claimed_by="", claimed_until=None)
            )
            return _count(result)

        return await self._run(work, write=True)

    async def failing_since(self, claimed: Claimed) -> dt.datetime:
        """When the endpoint's current run of failures began (after its last success).

        Deliveries go out in order, so the failures since the last success
        began when the first delivery attempted after it became due: at that
        success, or at its creation if the queue was empty then. An edit or a
        re-enable of the endpoint (its ``updated_at``) restarts the clock.
        """

        def work(db: Session) -> dt.datetime:
            mine = and_(
                WebhookDeliveryRow.workspace_id == claimed.workspace_id,
                WebhookDeliveryRow.integration_id == claimed.integration_id,
            )
            success = db.execute(
                select(WebhookDeliveryRow.seq, WebhookDeliveryRow.last_attempt_at)
                .where(mine, WebhookDeliveryRow.state == SUCCEEDED)
                .order_by(WebhookDeliveryRow.seq.desc())
                .limit(1)
            ).first()
            after = success.seq if success is not None else -1
            first = db.scalar(
                select(WebhookDeliveryRow.created_at)
                .where(mine, WebhookDeliveryRow.seq > after, WebhookDeliveryRow.attempts > 0)
                .order_by(WebhookDeliveryRow.seq)
                .limit(1)
            )
            candidates = [claimed.endpoint_updated_at, first or claimed.created_at]
            if success is not None and success.last_attempt_at is not None:
                candidates.append(success.last_attempt_at)
            return max(candidates)

        return await self._run(work, write=False)

    async def fail_disabled(self, message: str) -> int:
        """Fail the pending deliveries of disabled endpoints (they are not sent)."""

        def work(db: Session) -> int:
            disabled = (
                select(IntegrationRow.id)
                .where(
                    IntegrationRow.workspace_id == WebhookDeliveryRow.workspace_id,
                    IntegrationRow.id == WebhookDeliveryRow.integration_id,
                    IntegrationRow.disabled.is_(True),
                )
                .exists()
            )
            push_disabled = (
                select(PushConfigRow.endpoint_id)
                .where(
                    PushConfigRow.workspace_id == WebhookDeliveryRow.workspace_id,
                    PushConfigRow.endpoint_id == WebhookDeliveryRow.integration_id,
                    PushConfigRow.disabled.is_(True),
                )
                .exists()
            )
            result = db.execute(
                update(WebhookDeliveryRow)
                .where(WebhookDeliveryRow.state == PENDING, or_(disabled, push_disabled))
                .values(
                    state=FAILED,
                    # The attempt's own error stays readable after the reason.
                    last_error=case(
                        (WebhookDeliveryRow.last_error == "", message[:500]),
                        else_=func.substr(f"{message}; " + WebhookDeliveryRow.last_error, 1, 500),
                    ),
                    next_attempt_at=None,
                    claimed_by="",
                    claimed_until=None,
                )
                .execution_options(synchronize_session=False)
            )
            return _count(result)

        return await self._run(work, write=True)

    async def prune(self, before: dt.datetime, limit: int) -> int:
        """Delete up to ``limit`` finished deliveries recorded before ``before``."""

        def work(db: Session) -> int:
            ids = select(WebhookDeliveryRow.id).where(
                WebhookDeliveryRow.state.in_((SUCCEEDED, FAILED)),
                WebhookDeliveryRow.created_at < before,
            )
            result = db.execute(
                delete(WebhookDeliveryRow)
                .where(WebhookDeliveryRow.id.in_(ids.limit(limit).scalar_subquery()))
                .execution_options(synchronize_session=False)
            )
            return _count(result)

        return await self._run(work, write=True)

    async def prune_orphans(self, limit: int) -> int:
        """Delete up to ``limit`` deliveries whose endpoint is gone (its workspace was pruned:
        endpoints delete their own deliveries, a workspace's cascade does not reach them)."""

        def work(db: Session) -> int:
            ids = (
                _endpoints(select(WebhookDeliveryRow.id))
                .where(IntegrationRow.id.is_(None), PushConfigRow.endpoint_id.is_(None))
                .limit(limit)
            )
            result = db.execute(
                delete(WebhookDeliveryRow)
                .where(WebhookDeliveryRow.id.in_(ids.scalar_subquery()))
                .execution_options(synchronize_session=False)
            )
            return _count(result)

        return await self._run(work, write=True)

    # -- queries and commands for the service ---------------------------------------------

    async def webhook(self, workspace_id: str, integration_id: str) -> tuple[int, bool] | None:
        """(kind, disabled) of the integration, or None if there is none."""

        def work(db: Session) -> tuple[int, bool] | None:
            row = db.execute(
                select(IntegrationRow.kind, IntegrationRow.disabled).where(
                    IntegrationRow.workspace_id == workspace_id,
                    IntegrationRow.id == integration_id,
                )
            ).first()
            return (int(row.kind), bool(row.disabled)) if row is not None else None

        return await self._run(work, write=False)

    async def page(
        self,
        workspace_id: str,
        integration_id: str,
        size: int,
        before: tuple[int, str] | None,
    ) -> list[WebhookDeliveryRow]:
        """Up to ``size`` deliveries, newest (highest seq) first, strictly before ``before``."""

        def work(db: Session) -> list[WebhookDeliveryRow]:
            query = select(WebhookDeliveryRow).where(
                WebhookDeliveryRow.workspace_id == workspace_id,
                WebhookDeliveryRow.integration_id == integration_id,
            )
            if before is not None:
                seq, last = before
                query = query.where(
                    or_(
                        WebhookDeliveryRow.seq < seq,
                        and_(WebhookDeliveryRow.seq == seq, WebhookDeliveryRow.id < last),
                    )
                )
            query = query.order_by(WebhookDeliveryRow.seq.desc(), WebhookDeliveryRow.id.desc())
            return list(db.scalars(query.limit(size)))

        return await self._run(work, write=False)

    async def redeliver(
        self, workspace_id: str, integration_id: str, delivery_id: str
    ) -> WebhookDeliveryRow | None:
        """Make the delivery pending again as a new attempt series; None if unknown."""

        def work(db: Session) -> WebhookDeliveryRow | None:
            row = db.scalar(
                select(WebhookDeliveryRow)
                .where(
                    WebhookDeliveryRow.workspace_id == workspace_id,
                    WebhookDeliveryRow.integration_id == integration_id,
                    WebhookDeliveryRow.id == delivery_id,
                )
                .with_for_update()
            )
            if row is None:
                return None
            if row.state != PENDING:
                row.state = PENDING
                row.attempts = 0
                row.last_http_status = 0
                row.last_error = ""
                row.next_attempt_at = now()
                row.claimed_by = ""
                row.claimed_until = None
            db.flush()
            return row

        return await self._run(work, write=True)

    async def last_attempted(
        self, workspace_id: str, integration_id: str
    ) -> WebhookDeliveryRow | None:
        """The newest delivery that was attempted at least once, if any."""

        def work(db: Session) -> WebhookDeliveryRow | None:
            return db.scalar(
                select(WebhookDeliveryRow)
                .where(
                    WebhookDeliveryRow.workspace_id == workspace_id,
                    WebhookDeliveryRow.integration_id == integration_id,
                    WebhookDeliveryRow.attempts > 0,
                )
                .order_by(WebhookDeliveryRow.seq.desc())
                .limit(1)
            )

        return await self._run(work, write=False)


def _count(result: Any) -> int:
    """Rows an UPDATE, DELETE or INSERT touched."""
    return int(getattr(result, "rowcount", 0) or 0)


def _subscribers(db: Session, workspace_ids: Sequence[str]) -> list[Subscriber]:
    pushed = db.execute(
        select(
            PushConfigRow.workspace_id,
            PushConfigRow.endpoint_id,
            PushConfigRow.created_at,
            PushConfigRow.conversation_id,
            PushConfigRow.run_id,
        ).where(
            PushConfigRow.workspace_id.in_(sorted(set(workspace_ids))),
            PushConfigRow.disabled.is_(False),
        )
    ).all()
    rows = db.execute(
        select(
            IntegrationRow.workspace_id,
            IntegrationRow.id,
            IntegrationRow.event_types,
            IntegrationRow.created_at,
        ).where(
            IntegrationRow.workspace_id.in_(sorted(set(workspace_ids))),
            IntegrationRow.kind == WEBHOOK,
            IntegrationRow.disabled.is_(False),
        )
    ).all()
    return [
        Subscriber(
            workspace_id=row.workspace_id,
            integration_id=row.id,
            event_types=frozenset(row.event_types.split()),
            created_at=row.created_at,
        )
        for row in rows
    ] + [
        Subscriber(
            workspace_id=row.workspace_id,
            integration_id=row.endpoint_id,
            event_types=frozenset({"RUN_UPDATED"}),
            created_at=row.created_at,
            task=(row.conversation_id, row.run_id),
        )
        for row in pushed
    ]
