"""What the webhook engine sends for an A2A push config, and how long a config lives.

The engine (``integration/webhooks/delivery.py``) feeds a config its task's status
changes, orders, retries and disables like any endpoint; it knows a config
only through ``shared.PushNotifications``, which ``PushDelivery`` is. Each
status change is one ``POST`` of A2A's ``StreamResponse`` (a ``statusUpdate``,
as ``SendStreamingMessage`` streams it) in protobuf's JSON mapping, with the
Standard Webhooks ``webhook-id`` and ``webhook-timestamp``, a
``webhook-signature`` when the config's scheme is ``StandardWebhooks`` (its
credentials the ``whsec_`` secret), else ``authorization: <scheme>
<credentials>`` when a scheme is set, and ``x-a2a-notification-token`` when it
has a token.
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Final

from switchboard.a2a import mapping
from switchboard.a2a.push.store import PushStore
from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.api.events.v1 import events_pb2
from switchboard.platform.security.credentials.secretbox import SecretBox
from switchboard.platform.store.db import Database
from switchboard.platform.values import structs

#: A push config is deleted this long after its task's final status was recorded,
#: and at the latest this long after its creation plus ``MAX_AGE``.
RETENTION: Final = dt.timedelta(days=7)
MAX_AGE: Final = dt.timedelta(days=30)
#: A config whose creation did not complete (never ready) is deleted after this.
ABANDONED: Final = dt.timedelta(minutes=10)
#: ``authentication.scheme`` (any case) that signs deliveries with ``credentials``
#: (a ``whsec_`` secret) instead of sending an Authorization header.
SIGNING_SCHEME: Final = "standardwebhooks"
TOKEN_HEADER: Final = "x-a2a-notification-token"  # noqa: S105 - a header's name


def purpose(workspace_id: str, endpoint_id: str, part: str) -> str:
    """What a push config's sealed ``token`` or ``credentials`` is bound to."""
    return f"a2a-push/{workspace_id}/{endpoint_id}/{part}"


def notification(event: events_pb2.Event) -> str:
    """The body pushed for a ``RUN_UPDATED`` status change: A2A's ``StreamResponse``.

    Its ``metadata["switchboard.sequence"]`` is the one the stream carries for
    the same status (``N``, or ``N.1`` for a completed task's), so a client
    that also streams or resumes sees one numbering.
    """
    update = event.run_updated.update
    changed = event.WhichOneof("payload") == "run_updated" and (
        update.WhichOneof("update") == "state_change"
    )
    if not changed:  # pragma: no cover - the engine feeds configs these only
        raise ValueError("not a status change")
    run = update.state_change.run
    part = 1 if run.state == pb.RUN_STATE_SUCCEEDED else 0
    response = mapping.status_event(run, (update.sequence, part))
    return json.dumps(structs.message_dict(response), separators=(",", ":"))


class PushDelivery:
    """A2A push configs as the webhook engine delivers them (``shared.PushNotifications``)."""

    def __init__(self, database: Database, secrets: SecretBox) -> None:
        self._store = PushStore(database)
        self._secrets = secrets

    def body(self, event: events_pb2.Event) -> str:
        return notification(event)

    def headers(
        self,
        workspace_id: str,
        endpoint_id: str,
        token: bytes | None,
        auth_scheme: str,
        credentials: bytes | None,
    ) -> tuple[dict[str, str], str]:
        """A config's own headers and its signing secret ("" when it signs nothing)."""
        headers: dict[str, str] = {}
        if token is not None:
            headers[TOKEN_HEADER] = self._secrets.open(
                token, purpose=purpose(workspace_id, endpoint_id, "token")
            )
        opened = ""
        if credentials is not None:
            opened = self._secrets.open(
                credentials, purpose=purpose(workspace_id, endpoint_id, "credentials")
            )
        if auth_scheme.lower() == SIGNING_SCHEME:
            return headers, opened
        if auth_scheme:
            headers["authorization"] = f"{auth_scheme} {opened}".strip()
        return headers, ""

    async def disable(self, workspace_id: str, endpoint_id: str) -> None:
        await self._store.disable(workspace_id, endpoint_id)

    async def prune(self, current: dt.datetime) -> int:
        return await self._store.prune(current - RETENTION, current - MAX_AGE, current - ABANDONED)
