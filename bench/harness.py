"""What every benchmark section shares: its statistics, the machine it ran on, the report.

- One percentile definition, nearest-rank: of n samples, the p-th percentile is the
  ceil(p * n / 100)-th smallest (``percentile``); a latency histogram gives the upper
  edge of the bucket holding that sample (``histogram_percentile``). p50 and p99 mean
  the same statistic in every section of BENCHMARKS.md.
- One reader of the machine: its CPU model and versions (``provenance``), how fast it
  runs now (``host_speed``), CPU time from /proc (``CpuMeter``).
- One report writer (``write_sections``): a section replaces the section of
  BENCHMARKS.md with the same ``## `` heading, or is appended; the file's preamble is
  ``PREAMBLE``, followed by the current figures (``current``): each area's goals as its
  latest run left them, above the sections.
- The processes a benchmark starts: ``switchboard serve`` (``serve``), a child that
  answers one JSON line per command (``Child`` / ``answer``), a client process that
  prints its figures (``run_client`` / ``clients``).
- A section script's entry point (``section_main``): its options, or one of the
  processes it starts (``SCRIPT ROLE [JSON]``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import inspect
import json
import math
import os
import platform
import queue
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Coroutine,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Final, Literal, TypeVar

from grpc import aio

_T = TypeVar("_T")
ROOT: Final = Path(__file__).resolve().parents[1]
HERE: Final = Path(__file__).resolve().parent
BENCHMARKS: Final = ROOT / "BENCHMARKS.md"
#: What BENCHMARKS.md says before its first section (the writer keeps it so).
PREAMBLE: Final = """# Benchmarks

Written by `make bench` (`bench/run.py`), or one section at a time by its script's `--write`:
a section replaces the one with its heading, and sections no script writes are kept. Do not
edit a script's section by hand.

Percentiles (p50, p95, p99) are nearest-rank in every section (`bench/harness.py`): of n
samples, the ceil(p·n/100)-th smallest. Where latencies are counted in a histogram (event
delivery, 10 µs buckets below 100 ms), the upper edge of the bucket holding that sample.
"""
#: A client process's collector thresholds once set up (CPython's: 700, 10, 10): one
#: process stands for many clients, and its own pauses would count as server latency.
QUIET_GC_THRESHOLD: Final = (100_000, 50, 1000)
#: Cores others may use for the machine to count as quiet before a case starts.
QUIET_CORES: Final = 0.25


def say(text: str) -> None:
    """Progress, on stderr (stdout carries a section's report or JSON)."""
    print(text, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------
# Statistics.


def rank(count: int, fraction: float) -> int:
    """The nearest rank (1-based) of the ``fraction`` percentile among ``count`` samples."""
    # Rounded first: 0.99 * n in binary floating point can land just above a whole number.
    return min(count, max(1, math.ceil(round(fraction * count, 9))))


def percentile(samples: Iterable[float], fraction: float) -> float:
    """The nearest-rank percentile of ``samples`` (NaN if there are none)."""
    ordered = sorted(samples)
    if not ordered:
        return math.nan
    return ordered[rank(len(ordered), fraction) - 1]


def ms(samples: Iterable[float], fraction: float) -> float:
    """The nearest-rank percentile of seconds, in ms."""
    return round(percentile(samples, fraction) * 1000, 3)


def histogram_percentile(
    counts: Mapping[int, int], fraction: float, upper: Callable[[int], float]
) -> float:
    """The nearest-rank percentile of samples counted by bucket: ``upper`` of its bucket."""
    total = sum(counts.values())
    if total == 0:
        return math.nan
    wanted = rank(total, fraction)
    seen = 0
    for bucket in sorted(counts):
        seen += counts[bucket]
        if seen >= wanted:
            break
    return upper(bucket)


def summary(samples: Sequence[float], fractions: Sequence[float] = (0.5, 0.99)) -> dict[str, float]:
    """Count, percentiles (``p50_ms``...), max and mean of seconds, in ms."""
    return {
        "calls": len(samples),
        **{f"p{round(f * 100)}_ms": ms(samples, f) for f in fractions},
        "max_ms": round(max(samples, default=math.nan) * 1000, 3),
        "mean_ms": round(sum(samples) / max(len(samples), 1) * 1000, 3),
    }


def median(values: Iterable[float]) -> float:
    """The median of figures over rounds (the mean of the middle two of an even count)."""
    listed = list(values)
    return statistics.median(listed) if listed else math.nan


def middle(items: Sequence[_T], key: Callable[[_T], float]) -> _T:
    """The median item by ``key`` (of an even count, the upper middle): the median round."""
    return sorted(items, key=key)[len(items) // 2]


def merge_counts(counts: Iterable[Mapping[str, int]]) -> dict[str, int]:
    merged: dict[str, int] = {}
    for one in counts:
        for key, n in one.items():
            merged[key] = merged.get(key, 0) + n
    return merged


def share(count: int, parts: int, index: int) -> int:
    """Part ``index`` of ``count`` split as evenly as can be into ``parts``."""
    return count // parts + (1 if index < count % parts else 0)


# ---------------------------------------------------------------------------------
# The machine.


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def provenance(command: str, *, versions: str = "", took_s: int | None = None) -> list[str]:
    """The when / machine / command lines every section starts with (``versions``: more
    packages after grpcio's; ``took_s``: how long the run took)."""
    took = "" if took_s is None else f" ({took_s} s)"
    return [
        f"- when: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        f"- machine: {os.cpu_count()} cores, {cpu_model()}; Python "
        f"{platform.python_version()}, grpcio {metadata.version('grpcio')}{versions}",
        f"- command: `{command}`{took}",
    ]


def command_line(script: str) -> str:
    """How this run was started, as the report shows it (output flags left out)."""
    command = " ".join([f"python {script}", *sys.argv[1:]])
    command = command.replace(" --json", "").replace(" --write", "")
    return re.sub(r" --(py-spy|profile-dir) \S+", "", command)


def reference_loop_ms() -> float:
    """CPU ms of a fixed pure-Python loop (median of 5): how fast this host runs now.

    Shared virtual machines drift; this puts runs on a common scale.
    """
    times = []
    for _ in range(5):
        start = time.process_time()
        total = 0
        for i in range(1_000_000):
            total += i
        times.append(time.process_time() - start)
    return round(percentile(times, 0.5) * 1000, 1)


async def thread_round_trip_us() -> float:
    """Median µs of an event loop -> worker thread -> event loop round trip.

    aiosqlite makes one per SQLite call (execute, fetch, close, commit...), so on
    SQLite this, more than the interpreter's speed, sets what a database read costs.
    """
    loop = asyncio.get_running_loop()
    requests: queue.SimpleQueue[asyncio.Future[None] | None] = queue.SimpleQueue()

    def worker() -> None:
        while (future := requests.get()) is not None:
            loop.call_soon_threadsafe(future.set_result, None)

    thread = threading.Thread(target=worker, daemon=True)
    thread.start()
    samples = []
    try:
        for _ in range(2000):
            future = loop.create_future()
            start = time.perf_counter()
            requests.put(future)
            await future
            samples.append(time.perf_counter() - start)
    finally:
        requests.put(None)
        thread.join()
    return round(percentile(samples, 0.5) * 1e6)


async def host_speed() -> dict[str, float]:
    return {"loop_ms": reference_loop_ms(), "hop_us": await thread_round_trip_us()}


@contextlib.asynccontextmanager
async def session(results: dict[str, Any], prefix: str) -> AsyncIterator[Path]:
    """A section's run in a scratch directory (removed afterwards), with the host's speed
    before and after it (``results['host']``) and how long it took (``results['seconds']``)."""
    results["host"] = [await host_speed()]
    started = time.monotonic()
    directory = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield directory
    finally:
        await asyncio.to_thread(shutil.rmtree, directory, ignore_errors=True)
    results["host"].append(await host_speed())
    results["seconds"] = round(time.monotonic() - started)
    say(f"done in {results['seconds']} s")


def host_speed_line(host: Sequence[Mapping[str, float]], note: str = ".") -> str:
    """The report's line of ``host_speed`` measured before and after the run."""
    first, last = host[0], host[-1]
    return (
        "- host speed, before / after the run: a pure-Python reference loop (1M additions) "
        f"{first['loop_ms']:g} / {last['loop_ms']:g} ms of CPU; an event loop -> thread -> "
        f"event loop round trip {first['hop_us']:g} / {last['hop_us']:g} µs (median){note}"
    )


# ---------------------------------------------------------------------------------
# CPU time and memory, from /proc.


def process_cpu_s(pid: int, thread: int = 0) -> float:
    """User + system CPU seconds of a process (or one of its threads)."""
    path = f"/proc/{pid}/task/{thread}/stat" if thread else f"/proc/{pid}/stat"
    fields = Path(path).read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_cpu_s() -> float:
    """CPU seconds every process on the machine has used (busy time of all cores)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"process {pid}: no VmRSS")


def _cpu_s(source: int | tuple[int, int]) -> float:
    return process_cpu_s(*source) if isinstance(source, tuple) else process_cpu_s(source)


class CpuMeter:
    """CPU seconds used while it measures (one interval, or several added up): by each of
    ``sources`` (a process id, or ``(pid, tid)``: one of its threads), by this process,
    and by the whole machine."""

    def __init__(self, *sources: int | tuple[int, int]) -> None:
        self.sources = sources
        self.wall = 0.0
        self.client = 0.0
        self.machine = 0.0
        self.used = [0.0] * len(sources)
        self._began: list[float] = []

    def _sample(self) -> list[float]:
        return [
            time.monotonic(),
            time.process_time(),
            machine_cpu_s(),
            *(_cpu_s(source) for source in self.sources),
        ]

    def start(self) -> None:
        self._began = self._sample()

    def stop(self) -> None:
        spent = [after - before for after, before in zip(self._sample(), self._began, strict=True)]
        self.wall += spent[0]
        self.client += spent[1]
        self.machine += spent[2]
        self.used = [used + more for used, more in zip(self.used, spent[3:], strict=True)]

    @contextlib.contextmanager
    def measure(self) -> Iterator[None]:
        self.start()
        yield
        self.stop()

    def cores(self, index: int) -> float:
        """Cores source ``index`` used on average."""
        return round(self.used[index] / max(self.wall, 1e-9), 2)

    def others(self) -> float:
        """CPU seconds of everything else on the machine (a thread is its process's)."""
        sources = zip(self.used, self.sources, strict=True)
        processes = sum(used for used, source in sources if isinstance(source, int))
        return max(0.0, self.machine - processes - self.client)

    def figures(self, calls: int) -> dict[str, float]:
        """The first source as the server: its CPU per call; cores used by it, by this
        process (the client) and by everything else."""
        wall = max(self.wall, 1e-9)
        return {
            "wall_s": round(wall, 2),
            "server_cpu_ms_per_call": round(self.used[0] * 1000 / max(calls, 1), 2),
            "server_cores": self.cores(0),
            "client_cores": round(self.client / wall, 2),
            "other_cores": round(self.others() / wall, 2),
        }


class Window:
    """A closed-loop load's clock: a warm-up, then the measured time (``start``); before
    it starts, no time is in it."""

    def __init__(self) -> None:
        self.begin = 0.0
        self.deadline = 0.0

    def start(self, warmup_s: float, seconds: float) -> None:
        self.begin = time.perf_counter() + warmup_s
        self.deadline = self.begin + seconds

    def __contains__(self, at: float) -> bool:
        return self.begin <= at < self.deadline

    def open(self) -> bool:
        """Whether the loads go on (the measured time has not ended)."""
        return time.perf_counter() < self.deadline

    async def warm_up(self) -> None:
        """Until the measured time begins, the collector quieted first (``quiet_gc``)."""
        quiet_gc()
        await asyncio.sleep(max(0.0, self.begin - time.perf_counter()))

    async def measured(self) -> None:
        """Until the measured time ends."""
        await asyncio.sleep(max(0.0, self.deadline - time.perf_counter()))


def quiet_gc() -> None:
    """Freeze what exists and collect rarely: this process's pauses are not the server's."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*QUIET_GC_THRESHOLD)


async def wait_quiet(limit_s: float) -> float:
    """Wait (at most ``limit_s``) for 2 s in a row with the machine nearly idle; seconds waited.

    The machine is shared (other jobs run tests on it); a case measured while
    they use a core measures them too. The wait is bounded, and the CPU that
    others used during each case is reported either way.
    """
    began = time.monotonic()
    quiet = 0
    while time.monotonic() - began < limit_s:
        before = machine_cpu_s()
        await asyncio.sleep(0.5)  # sampling the machine's load
        quiet = quiet + 1 if (machine_cpu_s() - before) / 0.5 < QUIET_CORES else 0
        if quiet >= 4:
            break
    waited = round(time.monotonic() - began, 1)
    if waited > 3:
        say(f"  waited {waited:g} s for other jobs to leave the cores")
    return waited


# ---------------------------------------------------------------------------------
# gRPC clients.


def dedicated_channel(address: str) -> aio.Channel:
    # Without a local subchannel pool, channels with the same arguments share
    # one connection (and its 100 concurrent streams).
    return aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])


def bearer(token: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {token}"),)


async def gather_limited(calls: Sequence[Callable[[], Awaitable[_T]]], limit: int = 16) -> list[_T]:
    """Make and await ``calls`` at most ``limit`` at a time (a grpc.aio call starts when made).

    A connection admits 100 concurrent streams (SWITCHBOARD_MAX_CONCURRENT_STREAMS);
    past that the server refuses streams (RST_STREAM REFUSED_STREAM: UNAVAILABLE).
    """
    gate = asyncio.Semaphore(limit)

    async def one(call: Callable[[], Awaitable[_T]]) -> _T:
        async with gate:
            return await call()

    return list(await asyncio.gather(*(one(c) for c in calls)))


# ---------------------------------------------------------------------------------
# Processes.


def python(*args: str) -> list[str]:
    """The command line of a Python process (this interpreter)."""
    return [sys.executable, *args]


def spawn(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    stdout: Any = subprocess.PIPE,
    stderr: Any = None,
) -> subprocess.Popen[str]:
    """Start ``argv`` with a pipe to its stdin (closing it asks a bench child to stop)."""
    return subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=stdout, stderr=stderr, env=env, cwd=cwd, text=True
    )


def stop(
    process: subprocess.Popen[str],
    *,
    by: Literal["stdin", "terminate", "kill"] = "stdin",
    timeout_s: float = 30.0,
) -> None:
    """Ask ``process`` to end (its stdin closed, or a signal), then kill it if it lingers."""
    if process.stdin is not None:
        process.stdin.close()
    if by != "stdin" and process.poll() is None:
        process.send_signal(signal.SIGTERM if by == "terminate" else signal.SIGKILL)
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    if process.stdout is not None:
        process.stdout.close()


@contextlib.contextmanager
def running(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    by: Literal["stdin", "terminate", "kill"] = "stdin",
) -> Iterator[subprocess.Popen[str]]:
    """``spawn`` for the block (stdout a pipe), then ``stop``."""
    process = spawn(argv, env=env)
    try:
        yield process
    finally:
        stop(process, by=by)


def run_client(script: str, spec: Mapping[str, Any], timeout_s: float = 1800) -> dict[str, Any]:
    """Run ``python SCRIPT client SPEC`` (the measuring client, its own process); its JSON."""
    done = subprocess.run(
        python(script, "client", json.dumps(spec)),
        stdout=subprocess.PIPE,
        text=True,
        check=True,
        timeout=timeout_s,
    )
    answer: dict[str, Any] = json.loads(done.stdout)
    return answer


#: How a report describes ``serve``'s server.
SERVED: Final = (
    "a real `switchboard serve --dev` process (embedded SQLite, in-memory cache and event "
    "log, JSON access log to a file)"
)


@dataclass(frozen=True)
class Server:
    port: int
    pid: int
    log: Path

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


@contextlib.contextmanager
def serve(directory: Path, database_url: str, settings: Mapping[str, str]) -> Iterator[Server]:
    """Start ``switchboard serve --dev`` on a free port (JSON log to a file in ``directory``)
    with ``settings`` as its only ``SWITCHBOARD_*`` variables; SIGTERM and wait on exit."""
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("SWITCHBOARD_")}
    env.update({"SWITCHBOARD_DATABASE_URL": database_url, **settings})
    log = directory / f"serve-{time.monotonic_ns()}.log"
    with log.open("w") as sink:
        process = spawn(
            python("-m", "switchboard.cli", "serve", "--dev", "--port", "0"),
            env=env,
            cwd=directory,
            stdout=sink,
            stderr=sink,
        )
    try:
        yield Server(port=_listening(process, log), pid=process.pid, log=log)
    finally:
        stop(process, by="terminate", timeout_s=60)


def _listening(process: subprocess.Popen[str], log: Path) -> int:
    """The port ``switchboard serve`` says it listens on, from its log."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"switchboard serve exited ({process.returncode}):\n{_tail(log)}")
        for line in log.read_text(errors="replace").splitlines():
            if '"switchboard listening"' in line:
                port: int = json.loads(line)["port"]
                return port
        time.sleep(0.05)  # polling the log for the listening line
    raise RuntimeError(f"switchboard serve did not start:\n{_tail(log)}")


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


#: A child's answer is one JSON line; a latency histogram can be long.
LINE_LIMIT: Final = 64 * 1024 * 1024


def answer(message: Mapping[str, Any]) -> None:
    """A child's side of ``Child``: one JSON line on stdout."""
    sys.stdout.write(json.dumps(message, separators=(",", ":")) + "\n")
    sys.stdout.flush()


class Child:
    """A Python child process: commands on its stdin, one answer per line on its stdout."""

    def __init__(self, name: str, process: asyncio.subprocess.Process) -> None:
        self.name = name
        self.process = process
        self.pid = process.pid

    @classmethod
    async def start(cls, name: str, *args: str) -> Child:
        process = await asyncio.create_subprocess_exec(
            *python(*args),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            limit=LINE_LIMIT,
        )
        return cls(name, process)

    async def line(self, timeout_s: float) -> str:
        assert self.process.stdout is not None
        try:
            async with asyncio.timeout(timeout_s):
                raw = await self.process.stdout.readline()
        except TimeoutError:
            raise RuntimeError(f"{self.name}: no answer within {timeout_s:g} s") from None
        if not raw:
            code = await self.process.wait()
            raise RuntimeError(f"{self.name} exited with status {code}")
        return raw.decode()

    async def answer(self, timeout_s: float) -> dict[str, Any]:
        message: dict[str, Any] = json.loads(await self.line(timeout_s))
        if "error" in message:
            raise RuntimeError(f"{self.name}: {message['error']}")
        return message

    async def send(self, text: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(text.encode() + b"\n")
        await self.process.stdin.drain()

    async def ask(self, command: Mapping[str, Any], timeout_s: float) -> dict[str, Any]:
        await self.send(json.dumps(command))
        return await self.answer(timeout_s)

    def cpu_s(self) -> float:
        return process_cpu_s(self.pid)

    def rss_kib(self) -> int:
        return rss_kib(self.pid)

    async def close(self) -> None:
        """Close stdin (the child's signal to stop), then kill it if it lingers."""
        if self.process.returncode is not None:
            return
        if self.process.stdin is not None:
            self.process.stdin.close()
        try:
            async with asyncio.timeout(20):
                await self.process.wait()
        except TimeoutError:
            self.process.kill()
            await self.process.wait()


# ---------------------------------------------------------------------------------
# The report.


def verdict(met: bool) -> str:
    return "met" if met else "**missed**"


def errors_text(errors: Mapping[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(errors.items())) or "0"


def settings_text(settings: Mapping[str, object]) -> str:
    return ", ".join(f"`{k}={v}`" for k, v in settings.items())


def _split(document: str) -> tuple[str, list[str]]:
    """The text before the first ``## `` heading, and each section from its heading on."""
    before: list[str] = []
    sections: list[list[str]] = []
    for line in document.splitlines():
        if line.startswith("## "):
            sections.append([line])
        elif sections:
            sections[-1].append(line)
        else:
            before.append(line)
    return "\n".join(before), ["\n".join(lines).strip("\n") for lines in sections]


def replace_sections(document: str, text: str) -> str:
    """``document`` with each ``## `` section of ``text`` in place of the one with the same
    heading (or appended), under ``PREAMBLE`` and the current figures (``current``)."""
    before, fresh = _split(text)
    if before.strip():
        raise ValueError(f"a section starts with its '## ' heading, not {before[:40]!r}")
    by_heading = {section.partition("\n")[0]: section for section in fresh}
    _, kept = _split(document)
    sections = [*(by_heading.pop(s.partition("\n")[0], s) for s in kept), *by_heading.values()]
    digest = current(sections)
    return PREAMBLE + "\n" + (digest + "\n" if digest else "") + "\n\n".join(sections) + "\n"


#: Headings of the dated history: a change's before and after, kept but not current.
_HISTORY: Final = re.compile(r"^## (Issue \d+|.*\(A/B|.*\(\d{4}-\d{2}-\d{2}\)|.*before and after)")
#: A goal's verdict, as the sections write it.
_MET: Final = re.compile(r"(?<![\w*])met\b")
_MISSED: Final = "**missed**"
_NOT_GOALS: Final = ("- when:", "- machine:", "- command:", "- host speed")


def current(sections: Sequence[str]) -> str:
    """The current figures, area by area: each section's goal lines (its bullets that say
    a goal is met or missed) with the date and command of the run that wrote them, a
    table per area; the dated history (before and after of a change) is left out."""
    blocks = []
    for section in sections:
        heading, _, body = section.partition("\n")
        if _HISTORY.match(heading):
            continue
        goals = [
            line[2:]
            for line in body.splitlines()
            if line.startswith("- ")
            and not line.startswith(_NOT_GOALS)
            and (_MISSED in line or _MET.search(line))
        ]
        if not goals:
            continue
        title = heading[3:]
        when, command = _field(body, "when"), _field(body, "command")
        said = ", ".join(part for part in (when, command) if part) or "no date recorded"
        rows = [f"| {_cell(goal)} | {_verdict(goal)} |" for goal in goals]
        blocks.append(
            f"**[{title}](#{_anchor(title)})**: {said}\n\n| goal, with the latest figure | "
            "verdict |\n|---|---|\n" + "\n".join(rows)
        )
    if not blocks:
        return ""
    return (
        "Current figures, area by area: each goal as the latest run of its section left it\n"
        "(the sections below hold the whole of each run; the dated ones, a change's before\n"
        "and after, are its history).\n\n" + "\n\n".join(blocks) + "\n"
    )


def _field(body: str, name: str) -> str:
    prefix = f"- {name}: "
    for line in body.splitlines():
        if line.startswith(prefix):
            return line[len(prefix) :].strip()
    return ""


def _cell(text: str) -> str:
    """``text`` in a table cell: its pipes escaped."""
    return text.replace("|", r"\|")


def _verdict(goal: str) -> str:
    met, missed = bool(_MET.search(goal)), _MISSED in goal
    if met and missed:
        return "met and **missed**"
    return "**missed**" if missed else "met"


def _anchor(title: str) -> str:
    """GitHub's anchor for a heading: lowercased, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")


def write_sections(text: str, path: Path = BENCHMARKS) -> None:
    """Put the ``## `` sections of ``text`` into BENCHMARKS.md (``replace_sections``)."""
    current = path.read_text() if path.exists() else ""
    path.write_text(replace_sections(current, text))


def section_parser(doc: str | None, quick: str = "") -> argparse.ArgumentParser:
    """A section script's options: ``--write`` and ``--json``, which ``report`` obeys, and
    ``--quick`` (its help: ``quick``) if it has a short mode. ``doc``: the script's."""
    parser = argparse.ArgumentParser(description=(doc or "").split("\n\n")[0])
    if quick:
        parser.add_argument("--quick", action="store_true", help=quick)
    parser.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
    parser.add_argument("--json", action="store_true", help="print JSON (for bench/run.py)")
    return parser


def report(results: Mapping[str, Any], text: str, args: argparse.Namespace) -> None:
    """Print the section (``--json``: with the figures, for bench/run.py); ``--write``
    also puts it into BENCHMARKS.md."""
    if args.json:
        print(json.dumps({"results": results, "markdown": text}))
    else:
        print(text)
    if args.write:
        write_sections(text)


# ---------------------------------------------------------------------------------
# A section script's entry point.


def overrides(args: argparse.Namespace, names: Iterable[str]) -> dict[str, Any]:
    """The options among ``names`` given on the command line (lists as tuples), for
    ``dataclasses.replace`` of a script's plan."""
    given = {name: getattr(args, name) for name in names}
    return {
        name: tuple(value) if isinstance(value, list) else value
        for name, value in given.items()
        if value is not None
    }


def clients(
    by_mode: Mapping[str, Callable[[dict[str, Any]], Coroutine[Any, Any, dict[str, Any]]]],
) -> Callable[[dict[str, Any]], None]:
    """The ``client`` role (``run_client``): the spec's ``mode`` picks the measuring
    client; its figures go to stdout as JSON."""

    def client(spec: dict[str, Any]) -> None:
        print(json.dumps(asyncio.run(by_mode[spec["mode"]](spec))))

    return client


def section_main(
    doc: str | None,
    drive: Callable[[argparse.Namespace], Coroutine[Any, Any, object]],
    *,
    quick: str = "",
    options: Callable[[argparse.ArgumentParser], None] | None = None,
    roles: Mapping[str, Callable[..., object]] | None = None,
) -> int:
    """A section script's ``main``. ``SCRIPT ROLE [JSON...]`` is one of the processes the
    script starts: ``roles[ROLE]`` given the decoded arguments (a coroutine it returns is
    run). Otherwise the section: ``section_parser`` with ``options`` added, then ``drive``."""
    argv = sys.argv[1:]
    if roles and argv and argv[0] in roles:
        done = roles[argv[0]](*(json.loads(arg) for arg in argv[1:]))
        if inspect.iscoroutine(done):
            asyncio.run(done)
        return 0
    parser = section_parser(doc, quick)
    if options is not None:
        options(parser)
    code: object = asyncio.run(drive(parser.parse_args()))
    return code if isinstance(code, int) else 0
