"""Heavy libraries imported where a feature first needs them, off the event loop, once.

A process imports the MCP SDK, the a2a SDK's client, aiortc and aiohttp only when a call
first needs one (decision 66), and in a worker thread, so a second of importing never
stalls the loop.
Two first uses at once must not import in two threads: Python's per-module import
locks then deadlock on a package whose modules import each other (``mcp``'s did:
``_DeadlockError`` on ``mcp.shared.exceptions``). One lock takes the imports one at a
time, and a name counts as imported only once its import has finished, never while
``sys.modules`` holds it half made.
"""

from __future__ import annotations

import asyncio
import importlib
import threading
from typing import Final

_LOCK: Final = threading.Lock()
#: The importer (a seam for the tests, which count the threads inside it at once).
_import_module = importlib.import_module
#: Modules whose import has finished in this process.
_DONE: set[str] = set()


async def imported(*names: str) -> None:
    """Import ``names`` (in order) in a worker thread unless they are already imported."""
    if _DONE.issuperset(names):
        return
    await asyncio.to_thread(_import, names)


def _import(names: tuple[str, ...]) -> None:
    with _LOCK:
        for name in names:
            if name not in _DONE:
                _import_module(name)
                _DONE.add(name)
