"""py-spy on the server during extra, unmeasured runs (the sections' ``--profile``): record,
read its raw output by function and by library, and the report's tables of them."""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import re
import shutil
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Final

from bench.harness import ROOT, say

#: How the report names the recording.
RECORD: Final = "`py-spy record --format raw --gil --threads --nonblocking`"
_FRAME: Final = re.compile(r"^(?P<function>.*) \((?P<file>[^()]*?)(?::\d+)?\)$")
#: Innermost frames of a thread blocked in C (a queue's get, epoll), which
#: py-spy cannot always tell from running.
_WAITING: Final = (
    "EpollSelector.select (selectors.py)",
    "_worker (concurrent/futures/thread.py)",
    "_connection_worker_thread (aiosqlite/core.py)",
)
#: How py-spy names Switchboard's files (relative to ``services/``, whichever way).
_OURS: Final = tuple(
    f"{folder}/{module.stem}.py)"
    for folder in ("platform", "dispatcher", "context", "auth", "events", "integration")
    for module in (ROOT / "services" / "switchboard" / folder).glob("*.py")
)
#: Where frames come from, by path fragment (first match wins).
_LIBRARIES: Final = (
    ("switchboard/integration/", "Switchboard integration hub"),
    ("integration/", "Switchboard integration hub"),
    ("switchboard/platform/", "Switchboard platform (interceptors, bus, db, cache)"),
    ("platform/", "Switchboard platform (interceptors, bus, db, cache)"),
    ("mcp_types/", "mcp SDK (client session, types)"),
    ("mcp/", "mcp SDK (client session, types)"),
    ("httpx2/", "httpx2 (the SDK's HTTP client)"),
    ("httpx/", "httpx (the egress client under it)"),
    ("httpcore/", "httpcore, h11 (HTTP/1.1)"),
    ("h11/", "httpcore, h11 (HTTP/1.1)"),
    ("anyio/", "anyio (the SDK's streams and task groups)"),
    ("pydantic", "pydantic (the SDK's messages)"),
    ("jsonschema/", "jsonschema, referencing"),
    ("referencing/", "jsonschema, referencing"),
    ("grpc/", "grpc (server, interceptors)"),
    ("opentelemetry/", "OpenTelemetry"),
    ("sqlalchemy/", "SQLAlchemy, aiosqlite"),
    ("aiosqlite/", "SQLAlchemy, aiosqlite"),
    ("google/protobuf", "protobuf"),
    ("asyncio/", "asyncio"),
    ("logging/", "logging"),
)
_OTHER: Final = "other (the interpreter, C code called from the event loop)"


def flags(parser: argparse.ArgumentParser, runs: str) -> None:
    """``--profile`` (py-spy on the server during ``runs``), ``--py-spy``, ``--profile-dir``."""
    parser.add_argument("--profile", action="store_true", help=f"py-spy on the server in {runs}")
    parser.add_argument("--py-spy", default="", help="the py-spy executable (default: on PATH)")
    parser.add_argument(
        "--profile-dir", default="", help="keep py-spy's raw profiles in this directory"
    )


def find(args: argparse.Namespace) -> str | None:
    """The py-spy executable if ``--profile`` asks for one: ``--py-spy``, or on PATH."""
    if not args.profile:
        return None
    if args.py_spy:
        found = args.py_spy if Path(args.py_spy).exists() else None
    else:
        found = shutil.which("py-spy")
    if found is None:
        say("--profile: py-spy not found (pip install py-spy, or --py-spy PATH); not profiling")
    return found


def plan(py_spy: str | None, seconds: float, out: Path) -> dict[str, Any] | None:
    """What ``record`` needs (JSON, for a client process), or None without py-spy."""
    return {"py_spy": py_spy, "seconds": seconds, "out": str(out)} if py_spy else None


@contextlib.asynccontextmanager
async def recording(profile: Mapping[str, Any] | None, pid: int) -> AsyncIterator[None]:
    """py-spy on process ``pid`` for the block, as ``profile`` (``plan``) says (nothing
    without one); the block ends once py-spy has written its file."""
    if not profile:
        yield
        return
    process = await asyncio.create_subprocess_exec(
        profile["py_spy"],
        "record",
        "--pid",
        str(pid),
        "--duration",
        str(int(profile["seconds"])),
        "--format",
        "raw",
        "--gil",  # only the thread holding the GIL: where the interpreter's one core goes
        "--threads",  # each stack under its thread: the event loop's apart
        "--nonblocking",  # pausing the server 100 times a second halved its throughput
        "--output",
        profile["out"],
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    yield
    await process.wait()


async def keep(args: argparse.Namespace, directory: Path, pattern: str) -> None:
    """Copy the raw profiles in ``directory`` named ``pattern`` (a glob) into
    ``--profile-dir``, if it was given."""
    if args.profile_dir:
        await asyncio.to_thread(_copy, directory, pattern, Path(args.profile_dir))


def _copy(directory: Path, pattern: str, destination: Path) -> None:
    destination.mkdir(parents=True, exist_ok=True)
    for raw in directory.glob(pattern):
        shutil.copy(raw, destination / raw.name)


def _where(file: str) -> str:
    for marker in ("site-packages/", "services/", "/lib/python3.11/", "gen/"):
        if marker in file:
            return file.split(marker, 1)[1]
    return file


def _stacks(path: Path) -> Iterator[tuple[str, list[str], int]]:
    """(thread, frames outermost first as ``function (file)``, samples) per stack."""
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        thread, _, frames = stack.partition(";")
        names = []
        for frame in frames.split(";") if frames else []:
            found = _FRAME.match(frame)
            names.append(
                f"{found['function']} ({_where(found['file'])})" if found else frame.strip()
            )
        yield thread, names, int(count_text)


def functions(path: Path) -> dict[str, Any]:
    """Own (innermost) and inclusive samples per function, every thread.

    Samples blocked in a queue or in epoll are counted apart; the event loop's
    thread (MainThread) and the others are counted apart too.
    """
    if not path.exists():
        return {"error": "py-spy wrote no profile"}
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    busy: collections.Counter[str] = collections.Counter()  # main / other -> samples
    waiting = 0
    for thread, names, count in _stacks(path):
        leaf = names[-1] if names else thread
        if leaf in _WAITING:
            waiting += count
            continue
        busy["main" if thread.endswith(": MainThread") else "other"] += count
        own[leaf] += count
        for name in set(names):
            inclusive[name] += count
    return {
        "main_samples": busy["main"],
        "other_samples": busy["other"],
        "waiting_samples": waiting,
        "own": own.most_common(20),
        "inclusive": [
            (name, n)
            for name, n in inclusive.most_common(500)
            if name.endswith(_OURS) or "(sqlalchemy/orm/session.py)" in name
        ][:20],
    }


def libraries(path: Path) -> dict[str, Any]:
    """Busy samples by library: own (innermost frame) and inclusive (anywhere on the stack)."""
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for _, names, count in _stacks(path) if path.exists() else ():
        if not names or names[-1] in _WAITING:
            continue
        total += count
        groups = [_library(name) for name in names]
        own[groups[-1]] += count
        for group in set(groups):
            inclusive[group] += count
    return {"total": total, "own": own.most_common(), "inclusive": inclusive.most_common()}


def _library(name: str) -> str:
    file = name.rpartition("(")[2]
    return next((group for fragment, group in _LIBRARIES if fragment in file), _OTHER)


def library_table(groups: Mapping[str, Any]) -> list[str]:
    """``libraries`` as a table: own and inclusive percent of the busy samples."""
    total = max(groups["total"], 1)
    inclusive = dict(groups["inclusive"])
    return [
        "| library | own % | inclusive % |",
        "|---|---|---|",
        *(
            f"| {group} | {n * 100 / total:.1f} | {inclusive.get(group, 0) * 100 / total:.1f} |"
            for group, n in groups["own"]
        ),
    ]


def function_table(heading: str, counts: Sequence[Sequence[Any]], total: int) -> list[str]:
    """(function, samples) pairs as a table of percent of ``total``."""
    return [
        f"| {heading} |",
        "|---|---|",
        *(f"| {n * 100 / max(total, 1):.1f} | `{name}` |" for name, n in counts),
    ]
