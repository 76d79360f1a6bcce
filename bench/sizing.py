"""Sizing on paper: what 8, 64 and 256 whole-run processes carry, from measured costs.

    python bench/sizing.py          the model, from BENCHMARKS.md's scale tables
    python bench/sizing.py --write  ... and put it into BENCHMARKS.md

``bench/scale.py`` prints the same model from the rows it has just measured. The inputs
are each part's CPU per run at each process count measured (the "N process(es)" rows of
the scale tables: a Switchboard process, PostgreSQL, Redis, Envoy) and a Talk session's
CPU per second (BENCHMARKS.md "Voice over WebRTC", the gRPC row). The model:

- **A process's CPU per run grows with the count**: ``p(N) = a + b (N - 1)``, a straight
  line fitted (least squares) to the measured counts. ``b`` is what one more process costs
  each of the others per run: when every process read every event of the log and heard
  every token (before issue 80's channels), ``b`` was above zero and a process's share of a
  core per run grew with N (the total work with N squared). One process then carries
  ``H / p(N)`` runs/s, with ``H`` the share of a core a part is planned to (``HEADROOM``),
  and N of them ``N H / p(N)``, which stops growing past ``a / b``. The model shows the
  fitted line (``b`` as measured) and ``b = 0`` (shared-nothing, what issue 80 aims at).
- **PostgreSQL and Redis per run grow with the count too** (fitted the same way: more
  connections, more readers of the log). PostgreSQL gets as many cores as it needs (its
  column), up to what one primary has (``PG_CORES``). Redis's log is one stream on one
  shard, one thread: the log's shard carries at most ``H / r(N)`` runs/s, however many shards
  a cluster has, since the whole of Redis's CPU per run is counted against the log's shard
  (an upper bound: the caches, counters and windows spread over the other masters; the
  measurement does not separate them). The shards column is Redis's cores at ``H`` each,
  at least one: while the log's shard does not bind, the rest fits beside it, so a
  cluster's other masters buy failover, not capacity.
- **Extrapolated.** The lines are fitted to the counts measured (1 to 8 on the many-core
  machine); the 64 and 256 rows are what the lines say, not measurements.
- **Live sessions** (Talk over gRPC): a process at ``H`` of a core holds ``H / s``
  sessions, ``s`` a session's CPU per second; sessions and runs share the same cores.
- **Bound by** the first of: the processes, the log's Redis shard, PostgreSQL past one
  primary's cores.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, for bench.*

from bench.harness import BENCHMARKS, write_sections

SECTION: Final = "## Sizing on paper: 8, 64 and 256 processes"
#: The share of a core each part is planned to (the rest is headroom).
HEADROOM: Final = 0.8
#: The process counts the model sizes.
COUNTS: Final = (8, 64, 256)
#: Cores one PostgreSQL primary is taken to have at most.
PG_CORES: Final = 64
#: A Talk session's server CPU per second (ms), BENCHMARKS.md "Voice over WebRTC", the talk
#: row (5 sessions over gRPC, server VAD, 2026-11-28): the default when no figure is given.
TALK_SESSION_MS: Final = 21.1
#: The scale sections whose "N process(es)" rows feed the model (the many-core one first).
SOURCES: Final = (
    "## Scale on 16 cores: whole-run processes behind the edge",
    "## Scale: whole-run processes behind the edge",
)
_ROW: Final = re.compile(r"^\|\s*\d+\s*\|\s*(\d+) process\(es\)\s*\|")


@dataclass(frozen=True)
class Point:
    """One measured row: the count and each part's CPU per run (ms)."""

    processes: int
    process_ms: float
    postgres_ms: float
    redis_ms: float
    envoy_ms: float


@dataclass(frozen=True)
class Line:
    """``value(N) = base + per_process * (N - 1)``."""

    base: float
    per_process: float

    def at(self, count: int) -> float:
        return self.base + self.per_process * (count - 1)


def fit(points: Sequence[tuple[int, float]]) -> Line:
    """The least-squares line through ``(N, value)``; flat through the mean with one
    count (nothing says how it grows), never falling (a part's cost does not shrink
    because there are more processes: a fall is the measurement's noise)."""
    counts = {n for n, _ in points}
    mean_y = sum(y for _, y in points) / len(points)
    if len(counts) < 2:
        return Line(mean_y, 0.0)
    mean_x = sum(n - 1 for n, _ in points) / len(points)
    sxx = sum((n - 1 - mean_x) ** 2 for n, _ in points)
    sxy = sum((n - 1 - mean_x) * (y - mean_y) for n, y in points)
    slope = max(0.0, sxy / sxx)
    return Line(mean_y - slope * mean_x, slope)


@dataclass(frozen=True)
class Sized:
    """What N processes carry (runs/s, or live sessions instead), what each shared part
    needs for it (cores; Redis's shards), and the part that binds."""

    process_ms: float
    runs_s: float
    sessions: float
    postgres_cores: float
    redis_cores: float
    redis_shards: int
    envoy_cores: float
    bound: str


@dataclass(frozen=True)
class Model:
    process: Line
    postgres: Line
    redis: Line
    envoy: Line
    session_ms: float
    source: str

    @classmethod
    def from_points(cls, points: Sequence[Point], session_ms: float, source: str) -> Model:
        return cls(
            process=fit([(p.processes, p.process_ms) for p in points]),
            postgres=fit([(p.processes, p.postgres_ms) for p in points]),
            redis=fit([(p.processes, p.redis_ms) for p in points]),
            envoy=fit([(p.processes, p.envoy_ms) for p in points]),
            session_ms=session_ms,
            source=source,
        )

    def row(self, count: int, *, shared_nothing: bool = False) -> Sized:
        """What ``count`` processes carry, and what each shared part needs for it."""
        process_ms = self.process.base if shared_nothing else self.process.at(count)
        redis_ms = self.redis.base if shared_nothing else self.redis.at(count)
        postgres_ms = self.postgres.at(count)
        envoy_ms = self.envoy.at(count)
        by_processes = count * HEADROOM * 1000 / process_ms
        by_log = HEADROOM * 1000 / max(redis_ms, 1e-9)
        by_postgres = PG_CORES * HEADROOM * 1000 / max(postgres_ms, 1e-9)
        rate = min(by_processes, by_log, by_postgres)
        bound = (
            "the processes"
            if rate == by_processes
            else "the log's Redis shard (one thread)"
            if rate == by_log
            else f"PostgreSQL ({PG_CORES} cores)"
        )
        return Sized(
            process_ms=process_ms,
            runs_s=rate,
            sessions=count * HEADROOM * 1000 / self.session_ms,
            postgres_cores=rate * postgres_ms / 1000 / HEADROOM,
            redis_cores=rate * redis_ms / 1000,
            redis_shards=max(1, math.ceil(rate * redis_ms / 1000 / HEADROOM - 1e-9)),
            envoy_cores=rate * envoy_ms / 1000 / HEADROOM,
            bound=bound,
        )

    def lines(self) -> list[str]:
        p, r = self.process, self.redis
        ceiling = 1 + p.base / p.per_process if p.per_process else math.inf
        out = [
            f"Fed by {self.source}. Fitted per run, N processes: a Switchboard process "
            f"{p.base:.1f} + {p.per_process:.2f} (N - 1) ms, PostgreSQL "
            f"{self.postgres.base:.2f} + {self.postgres.per_process:.2f} (N - 1), Redis "
            f"{r.base:.2f} + {r.per_process:.3f} (N - 1), Envoy {self.envoy.base:.2f} + "
            f"{self.envoy.per_process:.3f} (N - 1); a Talk session {self.session_ms:g} ms of "
            f"CPU per second. Each part planned at {HEADROOM:g} of a core; PostgreSQL at most "
            f"{PG_CORES} cores.",
            "",
            (
                f"With what one process costs each other as measured (b), the processes "
                f"together carry at most about {HEADROOM * 1000 / p.per_process:.0f} runs/s, "
                f"however many there are: past N = {ceiling:.0f} a process spends more of its "
                "core on the others' runs than on its own."
                if p.per_process
                else "The measured counts show no cost of one process to the others."
            ),
            "",
            "| shape | processes N | a process's CPU per run ms | runs/s | live Talk sessions "
            "(instead) | PostgreSQL cores | Redis cores (shards) | Envoy cores "
            "| bound by |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for shared_nothing in (False, True):
            shape = "shared-nothing (b = 0)" if shared_nothing else "as measured (b fitted)"
            for count in COUNTS:
                row = self.row(count, shared_nothing=shared_nothing)
                out.append(
                    f"| {shape} | {count} | {row.process_ms:.1f} | {row.runs_s:.0f} | "
                    f"{row.sessions:.0f} | {row.postgres_cores:.1f} | "
                    f"{row.redis_cores:.2f} ({row.redis_shards}) | "
                    f"{row.envoy_cores:.1f} | {row.bound} |"
                )
        return out


def points_from(text: str, heading: str) -> list[Point]:
    """The "N process(es)" rows of the section ``heading`` (its tables and the runs
    appended under it), as the scale bench writes them."""
    section = text.split("\n" + heading + "\n", 1)
    if len(section) < 2:
        return []
    body = section[1].split("\n## ", 1)[0]
    points = []
    for line in body.splitlines():
        match = _ROW.match(line)
        if match is None:
            continue
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        # round | shape | runs/s | first token | gap | server CPU | process | PG | Redis | Envoy
        points.append(
            Point(
                processes=int(match.group(1)),
                process_ms=float(cells[6]),
                postgres_ms=float(cells[7]),
                redis_ms=float(cells[8]),
                envoy_ms=float(cells[9]),
            )
        )
    return points


def model_from_benchmarks(path: Path = BENCHMARKS, session_ms: float = TALK_SESSION_MS) -> Model:
    text = path.read_text()
    for heading in SOURCES:
        points = points_from(text, heading)
        if points:
            return Model.from_points(points, session_ms, f'BENCHMARKS.md "{heading[3:]}"')
    raise SystemExit("no scale table in BENCHMARKS.md: run python bench/scale.py first")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--write", action="store_true", help="put the model into BENCHMARKS.md")
    args = parser.parse_args()
    model = model_from_benchmarks()
    report = "\n".join(
        [
            SECTION,
            "",
            f"- when: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
            "- command: `python bench/sizing.py` (no measurement of its own: the model of its "
            "doc, fed by the figures named below)",
            "",
            *model.lines(),
        ]
    )
    print(report)
    if args.write:
        write_sections(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
