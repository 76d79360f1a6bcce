"""Starting several processes of one test at once.

A ``switchboard serve`` spends its first seconds importing and opening its stores:
made in turn, each start waits for the previous one's for nothing; made at once, they
share the machine's cores (on a machine with cores to spare).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from typing import TypeVar

from tests.e2e.procs import ManagedProcess

_T = TypeVar("_T")


def together(*calls: Callable[[], _T]) -> list[_T]:
    """Each call's result, the calls made at once; the first failure is raised (after
    every call has ended)."""
    with ThreadPoolExecutor(len(calls)) as pool:
        futures = [pool.submit(call) for call in calls]
        return [future.result() for future in futures]


def serving(stack: ExitStack, *processes: ManagedProcess) -> None:
    """Start ``processes`` at once; each is stopped with ``stack``, whatever happened
    (also one that started when another did not)."""
    for process in processes:
        stack.push(process)
    together(*(process.start for process in processes))
