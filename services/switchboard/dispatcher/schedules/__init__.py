"""Schedules: runs started on a cron expression or an interval, without a person."""
