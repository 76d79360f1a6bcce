"""sqlite-vec registered with the process's libsqlite3 (``sqlite3_auto_extension``),
so every SQLite connection opened afterwards has ``vec0``: Python's ``sqlite3``
here has no ``enable_load_extension``, but it links the system library.

Its own module, below ``db.py`` (which calls it before a SQLite engine's first
connection) and ``vectors.py`` (which reports a failure), so neither imports
the other to reach it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.util
import threading
from pathlib import Path

_lock = threading.Lock()
_registered: str | None = None  # the reason it failed, "" once registered


def register_sqlite_vec() -> str:
    """Register sqlite-vec with the process's libsqlite3; "" on success, else why not.

    Idempotent and thread-safe; only connections opened afterwards have it.
    """
    global _registered  # noqa: PLW0603 - once per process, by design
    with _lock:
        if _registered is None:
            _registered = _register()
        return _registered


def _register() -> str:
    try:
        engine = ctypes.CDLL(_loadable_path() + ".so")
        name = ctypes.util.find_library("sqlite3")
        if name is None:
            return "the system libsqlite3 was not found"
        library = ctypes.CDLL(name)
        init = engine.sqlite3_vec_init
        library.sqlite3_auto_extension.argtypes = [ctypes.c_void_p]
        library.sqlite3_auto_extension.restype = ctypes.c_int
        code = library.sqlite3_auto_extension(ctypes.cast(init, ctypes.c_void_p))
    except (ImportError, OSError, AttributeError) as exc:
        return f"sqlite-vec could not be loaded ({type(exc).__name__}: {exc})"
    if code != 0:
        return f"sqlite3_auto_extension refused sqlite-vec (code {code})"
    return ""


def _loadable_path() -> str:
    """``sqlite_vec.loadable_path()``, found without importing the package: importing it
    imports numpy (for a helper of its own we never call), about 0.15 s of CPU at every
    start."""
    spec = importlib.util.find_spec("sqlite_vec")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError("No module named 'sqlite_vec'", name="sqlite_vec")
    return str(Path(spec.origin).parent / "vec0")
