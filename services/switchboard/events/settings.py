"""The event service's section: its subscriptions' limits and heartbeat.

The event log itself (its retention, its Redis Stream) and how often open
streams re-check access are the kernel's: every process publishes to the log
and keeps its streams' access current (``platform/config.py``).
"""

from __future__ import annotations

from pydantic import Field

from switchboard.platform.config import Section


class EventSettings(Section):
    """What only the event service reads (``events/build.py``)."""

    events_heartbeat_s: float = Field(
        default=15.0,
        gt=0,
        le=3600,
        description="heartbeat interval on idle Subscribe/Stream streams (keep it below proxy "
        "idle timeouts)",
    )
    events_subscriber_buffer: int = Field(
        default=1_000,
        ge=1,
        le=1_000_000,
        description="events queued for one subscriber; beyond it the subscription ends with "
        "RESOURCE_EXHAUSTED and a resume cursor",
    )
    events_max_batch: int = Field(
        default=256,
        ge=1,
        le=10_000,
        description="most events in one message: a subscriber gets everything queued for it "
        "when its writer runs, so a busy server sends fewer, fuller messages",
    )
    events_max_scopes: int = Field(
        default=16,
        ge=1,
        le=1_000,
        description="scopes per Subscribe, AddSubscription or ListEvents request",
    )
    events_max_subscriptions_per_principal: int = Field(
        default=64,
        ge=1,
        le=1_000_000,
        description="live subscriptions (Subscribe calls plus Stream subscriptions) per user, "
        "per process",
    )
    events_max_subscriptions_per_stream: int = Field(
        default=32,
        ge=1,
        le=10_000,
        description="subscriptions on one bidirectional Stream",
    )
