"""The A2A front door's section: the edge's URL and the root agent.

Where the dispatcher and the context service run when not here is the
platform's ``PeerSettings``; where push notifications may go, ``EgressSettings``.
"""

from __future__ import annotations

import re
from typing import Final
from urllib.parse import urlsplit

from pydantic import Field, field_validator

from switchboard.platform.config import Section, shown

#: An A2A tenant: a workspace id and an assistant id (``a2a/mapping.py``).
_TENANT: Final = re.compile(r"[a-z0-9][a-z0-9-]{0,62}\.[a-z0-9][a-z0-9-]{0,62}")


class A2ASettings(Section):
    """What only the A2A front door reads (``a2a/build.py``)."""

    public_url: str = Field(
        default="",
        max_length=256,
        description="The edge's URL as A2A clients reach it, `http(s)://host[:port]` (no "
        "path): agent cards name HTTP+JSON at it and gRPC at its `host:port` "
        "(docs/a2a.md). Set it behind a load balancer or CDN",
        json_schema_extra=shown(
            "empty: the public Agent Card names the scheme and host the request "
            "reached Envoy with; the extended card `http://127.0.0.1:8080`"
        ),
    )
    a2a_root_agent: str = Field(
        default="",
        max_length=127,
        description="The A2A agent (`{workspace}.{assistant}`) the edge's root card, "
        "`/.well-known/agent-card.json`, serves; A2A requests that name no tenant "
        "go to it, so a generic A2A client works from the root card alone "
        "([docs/a2a.md](docs/a2a.md#the-public-card))",
        json_schema_extra=shown(
            "empty: the root Agent Card is 404 and A2A requests must name a tenant"
        ),
    )

    @field_validator("a2a_root_agent")
    @classmethod
    def _a2a_root_agent(cls, value: str) -> str:
        if value and not _TENANT.fullmatch(value):
            raise ValueError(
                "expected {workspace}.{assistant}, the tenant A2A names the agent by (acme.helper)"
            )
        return value

    @field_validator("public_url")
    @classmethod
    def _public_url(cls, value: str) -> str:
        if not value:
            return value
        try:
            parts = urlsplit(value)
            # .port raises for a port that is not a number.
            _ = parts.port
        except ValueError:
            raise ValueError("not a valid URL (http(s)://host[:port])") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("expected http(s)://host[:port]")
        if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
            raise ValueError(
                "expected http(s)://host[:port] without a path, query or user: A2A's "
                "HTTP+JSON paths start at the edge's root"
            )
        return value.rstrip("/")
