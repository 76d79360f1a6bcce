"""Schedules' section (``SWITCHBOARD_SCHEDULES_*``): how many, how often, how late."""

from __future__ import annotations

from pydantic import Field

from switchboard.platform.config import Section


class ScheduleSettings(Section):
    """What schedules read (``dispatcher/build.py`` builds their catalog and firing)."""

    schedules_max_per_workspace: int = Field(
        default=100,
        ge=1,
        le=10_000,
        description="schedules one workspace may hold (RESOURCE_EXHAUSTED `QUOTA_EXCEEDED` past "
        "it; docs/schedules.md)",
    )
    schedules_min_interval_s: float = Field(
        default=60.0,
        gt=0,
        le=86_400,
        description="the shortest `interval` a schedule may have (INVALID_ARGUMENT below it); "
        "cron schedules may fire every second",
    )
    schedules_missed_grace_s: float = Field(
        default=60.0,
        gt=0,
        le=86_400,
        description="a schedule's tick still unclaimed this long after it was due is missed: "
        "the schedule's `missed_tick_policy` decides (SKIP or RUN_ONCE)",
    )
    schedules_poll_s: float = Field(
        default=1.0,
        gt=0,
        le=60,
        description="how often each dispatcher replica looks for due schedule ticks, at most "
        "(sooner when the next tick is sooner, or a schedule changed here; up to four times "
        "that while none come due, never past the next tick)",
    )
