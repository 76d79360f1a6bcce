"""What the services share with each other, below them all, and the imports still crossing.

Services are independent layers (pyproject.toml's layers contract): none
imports another. What two of them both need in one process lives here:

- ``parttext``: a message's parts as text. The context service counts a
  window in it and the dispatcher's model reads its prompt in it, so the model
  reads exactly the text its window was counted in (docs/decisions.md, 47).
- ``PushNotifications``: A2A push configs as the integration service's webhook
  engine delivers them. The feature is the A2A front door's (``a2a/push/``),
  which no service may import.

A part that one service builds and another uses (the context domain, the
integration hub, the budgets that embedding calls are charged to, push
notifications) is reached through a ``Port`` that the user declares in its own
package and the composition root fills (``platform/process.py``, ``mesh.connect``).

``SHARED_PARTS`` names the modules of one service that another still imports,
each with why; the layers contract allows exactly these imports, and
``tests/repo/test_import_layers.py`` holds the contract to this list.
"""

from __future__ import annotations

import datetime as dt
from typing import Final, Protocol

from switchboard.api.events.v1 import events_pb2

#: Module -> what another service uses it for, in-process.
SHARED_PARTS: Final[dict[str, str]] = {
    "switchboard.integration.kinds.a2a": "the A2A agent client: a workspace's A2A expert "
    "is a thin handler around the client the hub calls the agent's tools with",
    "switchboard.integration.ports.connectors": "the errors the A2A agent client raises",
}


class PushNotifications(Protocol):
    """A2A push configs as the integration service's webhook engine delivers them.

    The feature is the A2A front door's (``a2a/push/``: what a config is, what
    is sent for it, how long it lives); the engine only sends, as it sends a
    webhook's events. A service may not import the front door, so the
    composition root plugs the front door's in (``integration.build.PUSH_NOTIFICATIONS``).
    """

    def body(self, event: events_pb2.Event) -> str:
        """The JSON body for a ``RUN_UPDATED`` status change of the config's task."""
        ...

    def headers(
        self,
        workspace_id: str,
        endpoint_id: str,
        token: bytes | None,
        auth_scheme: str,
        credentials: bytes | None,
    ) -> tuple[dict[str, str], str]:
        """The config's own headers and its signing secret ("" when it signs nothing),
        from its sealed ``token`` and ``credentials``; raises if they cannot be opened."""
        ...

    async def disable(self, workspace_id: str, endpoint_id: str) -> None:
        """Stop delivering to a config that kept failing."""
        ...

    async def prune(self, current: dt.datetime) -> int:
        """Delete a batch of configs (and their deliveries) past their lifetime; how many."""
        ...
