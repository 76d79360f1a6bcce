"""Imports at first use (platform/imports.py): off the loop, one at a time, and a name
counts as imported only once its import has finished."""

from __future__ import annotations

import asyncio
import threading
import time
from types import ModuleType

import pytest

from switchboard.platform import imports

pytestmark = pytest.mark.unit


class SlowImports:
    """``importlib.import_module`` that takes a while and counts the threads in it at once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.inside = 0
        self.most_at_once = 0
        self.imported: list[str] = []

    def __call__(self, name: str) -> ModuleType:
        with self._lock:
            self.inside += 1
            self.most_at_once = max(self.most_at_once, self.inside)
        # Long enough that threads started together overlap unless something serializes
        # them; the assertion is about overlap, not time.
        time.sleep(0.05)
        with self._lock:
            self.inside -= 1
            self.imported.append(name)
        return ModuleType(name)


@pytest.fixture
def slow(monkeypatch: pytest.MonkeyPatch) -> SlowImports:
    fake = SlowImports()
    monkeypatch.setattr(imports, "_import_module", fake)
    monkeypatch.setattr(imports, "_DONE", set())
    return fake


async def test_first_uses_at_once_import_one_at_a_time_and_each_name_once(
    slow: SlowImports,
) -> None:
    # Two threads importing one package's modules at once deadlocked (mcp's
    # _DeadlockError under the suite's load): the imports never overlap now.
    await asyncio.gather(*(imports.imported("pkg.a", "pkg.b") for _ in range(6)))
    assert slow.most_at_once == 1
    assert sorted(slow.imported) == ["pkg.a", "pkg.b"]


async def test_a_name_imported_is_not_imported_again(slow: SlowImports) -> None:
    await imports.imported("pkg.a")
    await imports.imported("pkg.a")
    await imports.imported("pkg.a", "pkg.b")
    assert slow.imported == ["pkg.a", "pkg.b"]


async def test_the_loop_runs_while_a_name_is_imported(slow: SlowImports) -> None:
    importing = asyncio.ensure_future(imports.imported("pkg.slow"))
    turns = 0
    while not importing.done():
        turns += 1
        await asyncio.sleep(0)  # one turn of the loop, counted while the thread imports
    await importing
    assert turns > 1
    assert slow.imported == ["pkg.slow"]


async def test_a_real_module_is_whole_when_imported_returns() -> None:
    await imports.imported("json.decoder")
    import json.decoder

    assert json.decoder.JSONDecodeError is not None
