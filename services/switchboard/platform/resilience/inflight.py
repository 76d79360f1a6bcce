"""Unary calls this process is serving right now.

The event fan-out yields the loop to them when it is busy (``platform/events/bus.py``,
decision 34): a caller waiting for its write is served before a thousand
subscribers get their next frame. Counted by the error interceptor, which
wraps every unary handler (``platform/rpc/interceptors.py``); the loop's thread is
the only one that touches it.
"""

from __future__ import annotations


class _Count:
    __slots__ = ("unary",)

    def __init__(self) -> None:
        self.unary = 0


#: ``CALLS.unary``: unary calls between their handler's start and end.
CALLS = _Count()
