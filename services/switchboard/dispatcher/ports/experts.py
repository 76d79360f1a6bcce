"""How the dispatcher reads a workspace's domain experts: as the integration hub stores them.

An expert is an integration (kind INTEGRATION_KIND_GRPC_HANDLER or
INTEGRATION_KIND_A2A_AGENT) that its workspace registered through the hub; every
dispatcher process reads them from the shared database
(``integration/directory.py``), which the composition root hands the dispatcher
as an ``ExpertDirectory`` (``mesh.connect``). The dispatcher imports nothing of
the integration service: this is what it reads of one.
"""

from __future__ import annotations

from collections.abc import Awaitable, Sequence
from typing import Protocol

from switchboard.platform.values.resources import IntegrationName


class ExpertEntry(Protocol):
    """One expert registered in a workspace."""

    @property
    def id(self) -> str:
        """The integration id, which is the handler id it is routed by."""
        ...

    @property
    def display_name(self) -> str: ...

    @property
    def endpoint(self) -> str:
        """``host:port`` or ``grpcs://host[:port]``; an A2A agent's card URL."""
        ...

    @property
    def timeout_s(self) -> float:
        """The integration's call timeout in seconds; 0 when it sets none."""
        ...

    @property
    def credential(self) -> str:
        """The credential in clear ("" when none), sent to the expert; never logged."""
        ...

    @property
    def disabled(self) -> bool: ...

    @property
    def problem(self) -> str:
        """Why it cannot be called though enabled ("" when it can)."""
        ...

    @property
    def kind(self) -> int:
        """INTEGRATION_KIND_GRPC_HANDLER or INTEGRATION_KIND_A2A_AGENT."""
        ...


class ExpertDirectory(Protocol):
    """A workspace's experts by id, at most ``limit``; DependencyUnavailable in an outage."""

    def __call__(self, workspace_id: str, *, limit: int) -> Awaitable[Sequence[ExpertEntry]]: ...


def integration_name(workspace_id: str, integration_id: str) -> str:
    """The expert's integration's resource name (its breaker's key)."""
    return str(IntegrationName(workspace_id, integration_id))
