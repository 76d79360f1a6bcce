"""Run the benchmarks and write their figures to BENCHMARKS.md.

    make bench        (or: .venv/bin/python bench/run.py [--seconds S] [--concurrency C])

Each server variant runs in its own process and the load in another, both on
loopback. On a two-core machine the client and the server share the cores, so
figures compare variants in one run; they are not absolute capacity.

The event delivery section comes from ``bench/events.py`` (about 4 minutes;
``--no-events`` skips it), the writers under fan-out section from ``bench/writers.py``
(about 8 minutes; ``--no-writers`` skips it), the context service section from
``bench/context.py`` (about 3 minutes; ``--no-context`` skips it), the dispatcher
section from ``bench/dispatcher.py`` (about 5 minutes; ``--no-dispatcher`` skips it),
the integration hub section from ``bench/integration.py`` (about 4 minutes;
``--no-integration`` skips it), the tool runs section from ``bench/tools.py`` (about 3
minutes; ``--no-tools`` skips it), the Envoy section from ``bench/edge.py`` (about 8
minutes; ``--no-edge`` skips it), the tracing overhead section from
``bench/telemetry.py`` (about 4 minutes; ``--no-telemetry`` skips it), the A2A section from
``bench/frontdoor.py`` (about 1 minute; ``--no-frontdoor`` skips it), the streaming section
from ``bench/streaming.py`` (about 8 minutes; ``--no-streaming`` skips it), the fairness
between workspaces section from ``bench/fairness.py`` (about 90 s; ``--no-fairness`` skips
it), the budgets section from ``bench/budgets.py`` (about 4 minutes; ``--no-budgets`` skips
it), the files section from ``bench/files.py`` (about 3 minutes; ``--no-files`` skips it),
the voice section from ``bench/voice.py`` (about 4 minutes; ``--no-voice`` skips it),
the voice over WebRTC section from ``bench/webrtc.py`` (about 7 minutes; ``--no-webrtc``
skips it), the phone calls (SIP) section from ``bench/telephony.py`` (about 6 minutes;
``--no-telephony`` skips it), the phone calls (carriers' media streams) section from
``bench/streams.py`` (about 5 minutes; ``--no-streams`` skips it),
the turn detection section from ``bench/turns.py`` (Smart Turn against silence on a labelled
set, about 15 seconds; ``--no-turns`` skips it),
the semantic memory section from ``bench/semantic.py`` (about 10 minutes; ``--no-semantic``
skips it), the scale section from ``bench/scale.py`` (whole-run processes behind the edge,
about 5 minutes; ``--no-scale`` skips it), the delegation section from ``bench/delegation.py``
(about 3 minutes; ``--no-delegation`` skips it), the round trips section from
``bench/roundtrips.py`` (PostgreSQL's and Redis's work per run, counted; about a minute;
``--no-roundtrips`` skips it), the memory forming section from ``bench/memory.py`` (about 2
minutes; ``--no-memory`` skips it).
Each of those
scripts also runs alone (``--write`` puts its section into BENCHMARKS.md). Every section
replaces the one with its heading in BENCHMARKS.md (``bench/harness.py``); a skipped
section keeps its earlier figures.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Final

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, for bench.*

from bench.harness import (
    BENCHMARKS,
    HERE,
    middle,
    provenance,
    python,
    running,
    write_sections,
)

CASES: Final = [
    ("bare", "health", "grpc.aio, health only, no interceptor"),
    ("switchboard", "health", "Switchboard assembly, health Check"),
    ("switchboard", "error", "Switchboard, error path (UNAUTHENTICATED + ErrorInfo)"),
    ("switchboard", "jwks", "GetJwks, public (no credential)"),
    ("switchboard", "jwks-header", "GetJwks, public, bearer header sent but unchecked"),
    ("switchboard-auth", "jwks-auth", "GetJwks, authenticated, cached verification"),
    (
        "switchboard-auth-nocache",
        "jwks-auth",
        "GetJwks, authenticated, no caches (EdDSA verify + session read per call)",
    ),
]
LOGIN_CLIENTS: Final = 8
#: The scenario scripts, each printing its section (``--json``), with how long it may take.
SECTIONS: Final = (
    ("events", 900),
    ("writers", 1800),
    ("context", 1200),
    ("dispatcher", 3600),
    ("integration", 1800),
    ("tools", 1800),
    ("edge", 1800),
    ("telemetry", 1200),
    ("frontdoor", 600),
    ("streaming", 1200),
    ("fairness", 600),
    ("budgets", 900),
    ("files", 900),
    ("voice", 900),
    ("webrtc", 1200),
    ("telephony", 1200),
    ("streams", 1200),
    ("turns", 300),
    ("semantic", 1500),
    ("scale", 1500),
    ("delegation", 900),
    ("roundtrips", 300),
    ("memory", 600),
)

Figures = dict[str, float]


def run_case(variant: str, rpc: str, concurrency: int, seconds: float) -> Figures:
    """Start the target, run the load against it, return the load's figures."""
    with running(python(str(HERE / "target.py"), variant)) as server:
        assert server.stdout is not None
        port, token = server.stdout.readline().split()
        done = subprocess.run(
            python(
                str(HERE / "load.py"),
                f"127.0.0.1:{port}",
                token,
                rpc,
                str(concurrency),
                str(seconds),
            ),
            capture_output=True,
            text=True,
            check=True,
            timeout=seconds + 120,
        )
    result: Figures = json.loads(done.stdout)
    return result


def unary_rounds(args: argparse.Namespace) -> list[tuple[str, Figures]]:
    """Every case, the median round by QPS.

    Cases are interleaved round by round, so drift on a shared machine hits every
    case alike.
    """
    results: dict[str, list[Figures]] = {label: [] for _, _, label in CASES}
    for round_no in range(args.rounds):
        for variant, rpc, label in CASES:
            figures = run_case(variant, rpc, args.concurrency, args.seconds)
            results[label].append(figures)
            print(f"round {round_no + 1}: {label}: {figures}", flush=True)
    return [(label, middle(runs, key=lambda f: f["qps"])) for label, runs in results.items()]


def login_rounds(args: argparse.Namespace) -> Figures:
    """Logins under load, the median round by logins/s."""
    logins: list[Figures] = []
    for round_no in range(args.rounds):
        figures = run_case("switchboard", "logins", LOGIN_CLIENTS, args.seconds)
        logins.append(figures)
        print(f"round {round_no + 1}: logins: {figures}", flush=True)
    return middle(logins, key=lambda f: f["qps"])


def micro() -> Figures:
    """bench/micro.py's in-process figures."""
    done = subprocess.run(
        python(str(HERE / "micro.py")), capture_output=True, text=True, check=True, timeout=300
    )
    figures: Figures = json.loads(done.stdout)
    return figures


def render(
    rows: list[tuple[str, Figures]], login: Figures, inprocess: Figures, args: argparse.Namespace
) -> str:
    """This script's own sections: unary overhead, per-call authentication, logins."""
    command = (
        f"python bench/run.py --seconds {args.seconds:g} --concurrency {args.concurrency} "
        f"--rounds {args.rounds}"
    )
    lines = [
        "## Unary call overhead of the server assembly",
        "",
        *provenance(command),
        f"- shape: server and load generator in separate processes on loopback, "
        f"{args.concurrency} concurrent callers on one channel, closed loop, "
        f"{args.seconds:g} s per case after 200 warm-up calls, {args.rounds} interleaved "
        "rounds, the median round (by QPS) shown. Both processes share the cores.",
        "",
        "| case | calls | QPS | vs bare | p50 ms | p99 ms |",
        "|---|---|---|---|---|---|",
    ]
    base = rows[0][1]["qps"]
    for label, f in rows:
        lines.append(
            f"| {label} | {f['calls']:.0f} | {f['qps']:.0f} | {f['qps'] / base:.2f} "
            f"| {f['p50_ms']:.2f} | {f['p99_ms']:.2f} |"
        )
    return "\n".join([*lines, "", *_authentication(dict(rows), inprocess), *_logins(login, args)])


def _authentication(by_label: dict[str, Figures], inprocess: Figures) -> list[str]:
    public = by_label["GetJwks, public (no credential)"]["qps"]
    cached = by_label["GetJwks, authenticated, cached verification"]["qps"]
    header = by_label["GetJwks, public, bearer header sent but unchecked"]["qps"]
    uncached = by_label["GetJwks, authenticated, no caches (EdDSA verify + session read per call)"][
        "qps"
    ]
    return [
        "## Per-call authentication",
        "",
        "The same RPC (GetJwks) public and authenticated, in the same run; the "
        "authenticated variants differ only in one access rule (bench/target.py).",
        "",
        f"- authenticated with cached verification / public: **{cached / public:.2f}** "
        "(budget: at least 0.90)",
        f"- public with the same ~400-byte bearer header on the wire (unchecked) / public: "
        f"{header / public:.2f}: the transport's share (HPACK, metadata to Python)",
        f"- authenticated with cached verification / public with the header: "
        f"{cached / header:.2f}: the guard's own share",
        f"- no caches (EdDSA verification and a session read from SQLite on every call) / "
        f"public: {uncached / public:.2f}: what the caches save",
        f"- in process, without the transport (`bench/micro.py`): a cached credential check "
        f"costs {inprocess['cached_authenticate_us']:.1f} µs per call; verifying the EdDSA "
        f"signature alone costs {inprocess['verify_us']:.0f} µs",
        "",
        "On two shared cores the QPS ratios move by about ±15% between rounds; the "
        "in-process figure is the stable one.",
        "",
    ]


def _logins(login: Figures, args: argparse.Namespace) -> list[str]:
    return [
        "## Logins under load",
        "",
        f"{LOGIN_CLIENTS} concurrent clients call Login (argon2id m=19456 KiB, t=2, p=1, in "
        "the hashing pool; a session row and a refresh token written per login) for "
        f"{args.seconds:g} s, while one more client calls health Check in a closed loop; "
        "median round of "
        f"{args.rounds}.",
        "",
        "| logins/s | login p50 ms | login p99 ms | health p50 ms | health p99 ms |",
        "|---|---|---|---|---|",
        f"| {login['qps']:.1f} | {login['p50_ms']:.1f} | {login['p99_ms']:.1f} "
        f"| {login['health_p50_ms']:.2f} | {login['health_p99_ms']:.2f} |",
        "",
        "Budgets: health p99 under 50 ms while logins run; at least 25 logins/s on 2 cores.",
    ]


def section(script: str, timeout_s: float) -> str:
    """The section a scenario script measures (it prints progress on stderr, and one
    JSON line with its figures and its section: ``--json``)."""
    done = subprocess.run(
        python(str(HERE / f"{script}.py"), "--json"),
        stdout=subprocess.PIPE,
        text=True,
        check=True,
        timeout=timeout_s,
    )
    markdown: str = json.loads(done.stdout)["markdown"]
    return markdown


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    for script, _ in SECTIONS:
        parser.add_argument(f"--no-{script}", action="store_true", help=f"skip bench/{script}.py")
    return parser.parse_args(argv)


def main() -> int:
    args = parse()
    texts = [render(unary_rounds(args), login_rounds(args), micro(), args)]
    options: dict[str, Any] = vars(args)
    for script, timeout_s in SECTIONS:
        if not options[f"no_{script}"]:
            texts.append(section(script, timeout_s))
    write_sections("\n\n".join(texts))
    print(f"wrote {BENCHMARKS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
