"""The read side of a workspace's domain experts, for the dispatcher.

The dispatcher routes to a workspace's experts (integrations of kind
INTEGRATION_KIND_GRPC_HANDLER and INTEGRATION_KIND_A2A_AGENT) in every
process that serves it, so it reads them from the shared database, not from
the integration service's memory.
One statement per workspace, cached by the dispatcher
(``dispatcher/handlers/experts.py``) until an INTEGRATION_CHANGED event of the
workspace says otherwise. Rows never leave this module: the dispatcher gets
plain values, with the credential opened (it is sent to the expert).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Final

from sqlalchemy.exc import SQLAlchemyError

from switchboard.api.integration.v1 import integration_pb2
from switchboard.platform.errors import DependencyUnavailable
from switchboard.platform.security.credentials.secretbox import SecretBox, SecretUnreadable
from switchboard.platform.store.db import Database, log_failure
from switchboard.platform.values.resources import IntegrationName

log = logging.getLogger("switchboard.integration.directory")

_EXPERTS: Final = (
    "SELECT id, display_name, endpoint, call_timeout_ms, credential, disabled, kind "
    "FROM integrations WHERE workspace_id = :workspace AND (kind = :grpc OR kind = :a2a) "
    "ORDER BY id LIMIT :limit"
)


@dataclass(frozen=True)
class ExpertEntry:
    """One expert registered in a workspace."""

    #: The integration id, which is the handler id it is routed by.
    id: str
    display_name: str
    #: ``host:port`` or ``grpcs://host[:port]``, as registered.
    endpoint: str
    #: The integration's call timeout in seconds; 0 when it sets none.
    timeout_s: float
    #: The credential in clear ("" when none); never logged (not in ``repr``).
    credential: str = field(repr=False)
    disabled: bool
    #: Why it cannot be called though enabled ("" when it can): an unreadable credential.
    problem: str = ""
    #: INTEGRATION_KIND_GRPC_HANDLER (``endpoint`` is ``host:port``) or
    #: INTEGRATION_KIND_A2A_AGENT (``endpoint`` is the Agent Card's URL).
    kind: int = integration_pb2.INTEGRATION_KIND_GRPC_HANDLER


async def workspace_experts(
    database: Database, secrets: SecretBox, workspace_id: str, *, limit: int
) -> list[ExpertEntry]:
    """The workspace's experts by id, at most ``limit`` (the per-workspace quota).

    A database outage raises DependencyUnavailable (UNAVAILABLE, retryable).
    """
    try:
        rows = await database.fetch(
            _EXPERTS,
            {
                "workspace": workspace_id,
                "grpc": integration_pb2.INTEGRATION_KIND_GRPC_HANDLER,
                "a2a": integration_pb2.INTEGRATION_KIND_A2A_AGENT,
                "limit": limit,
            },
        )
    except (SQLAlchemyError, OSError, TimeoutError) as exc:
        log_failure(log, "reading a workspace's experts failed", exc)
        raise DependencyUnavailable("the workspace's experts cannot be read now; retry") from None
    found: list[ExpertEntry] = []
    for integration_id, display_name, endpoint, timeout_ms, sealed, disabled, kind in rows:
        credential, problem = "", ""
        if sealed:
            try:
                credential = secrets.open(
                    sealed, purpose=str(IntegrationName(workspace_id, str(integration_id)))
                )
            except SecretUnreadable as exc:
                problem = exc.message
        found.append(
            ExpertEntry(
                id=str(integration_id),
                display_name=str(display_name or ""),
                endpoint=str(endpoint),
                timeout_s=max(0, int(timeout_ms or 0)) / 1000.0,
                credential=credential,
                disabled=bool(disabled),
                problem=problem,
                kind=int(kind),
            )
        )
    return found
