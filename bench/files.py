"""Files benchmark: upload and download throughput through gRPC, and the server's memory.

    python bench/files.py                the full run (500 MiB transfers, about 3 minutes)
    python bench/files.py --quick        64 MiB transfers, to try it out (< 1 min)
    python bench/files.py --write        ... and put the report into BENCHMARKS.md
    python bench/files.py --json         one JSON line, figures and report (bench/run.py)

Against a fresh ``switchboard serve --dev`` (embedded SQLite, the directory blob store
beside the database), a measuring client in its own process moves one file of S MiB:

- ``UploadFile``: one client stream of 1 MiB chunks, then the SHA-256;
- ``resumable``: ``StartUpload``, one ``AppendUpload`` per MiB (each durable when it
  returns: written and fsynced), ``FinishUpload``;
- ``DownloadFile``: the server stream of the file uploaded first.

The content is generated as it is sent (a random MiB with a counter in each chunk), so the
client holds one chunk at a time. While each transfer runs, another thread of the driver
reads the server's resident set (``VmRSS``) every 20 ms; the growth is the peak minus the
RSS just before the transfer, after a warm-up transfer of 8 MiB each way.

The baseline, in the same run: a bare ``grpc.aio`` server with the same two methods and the
same messages that drops what it receives and sends one MiB it holds, so its rate is what
gRPC in Python moves on these cores when nothing is stored, checked or read from disk.
Reported: MiB/s, the ratio to the baseline, and the RSS growth, for each transfer, median
over the rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import hashlib
import os
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import grpc
from grpc import aio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, for bench.*

from bench.fixtures import register
from bench.harness import (
    HERE,
    command_line,
    dedicated_channel,
    host_speed_line,
    median,
    provenance,
    python,
    report,
    rss_kib,
    run_client,
    say,
    section_main,
    serve,
    session,
    spawn,
    stop,
    verdict,
)
from switchboard.api.context.v1 import context_pb2 as pb
from switchboard.api.context.v1 import context_pb2_grpc

SECTION: Final = "## Files: upload and download through gRPC"
MIB: Final = 1024 * 1024
#: The issue's goals.
RATE_GOAL_MIB_S: Final = 200.0
RSS_GOAL_MIB: Final = 32.0
TRANSFERS: Final = ("upload", "resumable", "download")
#: How often the driver reads the server's RSS during a transfer.
RSS_EVERY_S: Final = 0.02
SCRIPT: Final = str(HERE / "files.py")
#: The warm-up transfer's size, before the measured ones.
WARM_MIB: Final = 8
SERVICE: Final = "switchboard.api.context.v1.ContextService"


@dataclass(frozen=True)
class Sizes:
    mib: int
    resumable_mib: int
    rounds: int


FULL: Final = Sizes(mib=500, resumable_mib=200, rounds=3)
QUICK: Final = Sizes(mib=64, resumable_mib=32, rounds=1)


# ---------------------------------------------------------------------------------
# The content, made as it is sent.


def chunks(mib: int, seed: bytes) -> Iterator[bytes]:
    """``mib`` chunks of one MiB, each a random MiB with its number and ``seed`` in front
    (every file of a run differs, and no chunk repeats in a file)."""
    block = bytearray(os.urandom(MIB))
    for number in range(mib):
        block[:24] = seed[:16].ljust(16, b"\0") + number.to_bytes(8, "big")
        yield bytes(block)


# ---------------------------------------------------------------------------------
# The measuring client (its own process).


async def _upload(stub: Any, metadata: Any, spec: dict[str, Any]) -> tuple[str, str]:
    digest = hashlib.sha256()
    seed = os.urandom(16)

    async def frames() -> AsyncIterator[pb.UploadFileRequest]:
        yield pb.UploadFileRequest(
            header=pb.UploadFileHeader(
                parent=spec["workspace"],
                file=pb.File(
                    display_name="bench.bin",
                    media_type="application/octet-stream",
                    size_bytes=spec["mib"] * MIB,
                ),
            )
        )
        for chunk in chunks(spec["mib"], seed):
            digest.update(chunk)
            yield pb.UploadFileRequest(chunk=chunk)
        yield pb.UploadFileRequest(sha256=digest.hexdigest())

    response = await stub.UploadFile(frames(), metadata=metadata, timeout=600)
    return response.file.name, response.file.sha256


async def _resumable(stub: Any, metadata: Any, spec: dict[str, Any]) -> tuple[str, str]:
    digest = hashlib.sha256()
    started = await stub.StartUpload(
        pb.StartUploadRequest(
            parent=spec["workspace"],
            file=pb.File(
                display_name="bench-resumable.bin",
                media_type="application/octet-stream",
                size_bytes=spec["mib"] * MIB,
            ),
        ),
        metadata=metadata,
        timeout=60,
    )
    name = started.upload.name
    offset = 0
    for chunk in chunks(spec["mib"], os.urandom(16)):
        digest.update(chunk)
        await stub.AppendUpload(
            pb.AppendUploadRequest(name=name, offset=offset, data=chunk),
            metadata=metadata,
            timeout=60,
        )
        offset += len(chunk)
    finished = await stub.FinishUpload(
        pb.FinishUploadRequest(name=name, sha256=digest.hexdigest()),
        metadata=metadata,
        timeout=600,
    )
    return finished.file.name, finished.file.sha256


async def _download(stub: Any, metadata: Any, spec: dict[str, Any]) -> tuple[str, str]:
    digest = hashlib.sha256()
    size = 0
    async for frame in stub.DownloadFile(
        pb.DownloadFileRequest(name=spec["file"]), metadata=metadata, timeout=600
    ):
        digest.update(frame.data)
        size += len(frame.data)
    if size != spec["mib"] * MIB:
        raise RuntimeError(f"downloaded {size} bytes, expected {spec['mib'] * MIB}")
    return spec["file"], digest.hexdigest()


async def client(spec: dict[str, Any]) -> dict[str, Any]:
    """One transfer; its wall time, this process's CPU, and what it moved."""
    metadata = (("authorization", f"Bearer {spec['token']}"),) if spec.get("token") else None
    async with dedicated_channel(spec["address"]) as channel:
        stub = context_pb2_grpc.ContextServiceStub(channel)
        transfer = {"upload": _upload, "resumable": _resumable, "download": _download}
        cpu = time.process_time()
        started = time.perf_counter()
        name, sha256 = await transfer[spec["transfer"]](stub, metadata, spec)
        seconds = time.perf_counter() - started
        return {
            "seconds": round(seconds, 3),
            "mib_per_s": round(spec["mib"] / seconds, 1),
            "client_cpu_s": round(time.process_time() - cpu, 2),
            "file": name,
            "sha256": sha256,
        }


# ---------------------------------------------------------------------------------
# The baseline: bare grpc.aio with the same methods and messages, storing nothing.


async def floor() -> None:
    """Serve UploadFile (drops the chunks) and DownloadFile (sends one held MiB) until
    stdin closes; the port is the first line of stdout."""
    held = os.urandom(MIB)

    async def upload(requests: AsyncIterator[pb.UploadFileRequest], _: object) -> Any:
        size = 0
        async for frame in requests:
            size += len(frame.chunk)
        return pb.UploadFileResponse(file=pb.File(name="floor/files/f", size_bytes=size))

    async def download(request: pb.DownloadFileRequest, _: object) -> AsyncIterator[Any]:
        for index in range(int(request.read_limit // MIB)):
            yield pb.DownloadFileResponse(data=held, offset=index * MIB)

    upload_new = pb.UploadFileRequest.FromString
    handlers = {
        "UploadFile": grpc.stream_unary_rpc_method_handler(
            upload,
            request_deserializer=upload_new,
            response_serializer=pb.UploadFileResponse.SerializeToString,
        ),
        "DownloadFile": grpc.unary_stream_rpc_method_handler(
            download,
            request_deserializer=pb.DownloadFileRequest.FromString,
            response_serializer=pb.DownloadFileResponse.SerializeToString,
        ),
    }
    server = aio.server(
        options=[
            ("grpc.max_receive_message_length", 4 * MIB),
            ("grpc.max_send_message_length", 4 * MIB),
        ]
    )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(port, flush=True)
    await asyncio.to_thread(sys.stdin.read)  # until the driver closes our stdin
    await server.stop(0)


async def floor_download(spec: dict[str, Any]) -> dict[str, Any]:
    async with dedicated_channel(spec["address"]) as channel:
        stub = context_pb2_grpc.ContextServiceStub(channel)
        started = time.perf_counter()
        size = 0
        async for frame in stub.DownloadFile(
            pb.DownloadFileRequest(name="floor/files/f", read_limit=spec["mib"] * MIB),
            timeout=600,
        ):
            size += len(frame.data)
        seconds = time.perf_counter() - started
        return {"seconds": round(seconds, 3), "mib_per_s": round(size / MIB / seconds, 1)}


def client_role(spec: dict[str, Any]) -> None:
    import json

    if spec.get("floor") and spec["transfer"] == "download":
        print(json.dumps(asyncio.run(floor_download(spec))))
    else:
        print(json.dumps(asyncio.run(client(spec))))


# ---------------------------------------------------------------------------------
# The driver.


class RssWatch:
    """The peak RSS of a process while the block runs, read every ``RSS_EVERY_S``."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.before_kib = rss_kib(pid)
        self.peak_kib = self.before_kib
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        while not self._done.wait(RSS_EVERY_S):
            self.peak_kib = max(self.peak_kib, rss_kib(self.pid))

    def __enter__(self) -> RssWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()
        self.peak_kib = max(self.peak_kib, rss_kib(self.pid))

    @property
    def growth_mib(self) -> float:
        return round((self.peak_kib - self.before_kib) / 1024, 1)


def measured(spec: dict[str, Any], pid: int) -> dict[str, Any]:
    with RssWatch(pid) as watch:
        figures = run_client(SCRIPT, spec)
    figures["rss_before_mib"] = round(watch.before_kib / 1024, 1)
    figures["rss_growth_mib"] = watch.growth_mib
    return figures


async def floor_round(sizes: Sizes) -> dict[str, Any]:
    process = spawn(python(SCRIPT, "floor"))
    try:
        assert process.stdout is not None
        port = int(await asyncio.to_thread(process.stdout.readline))
        address = f"127.0.0.1:{port}"
        base = {"address": address, "floor": True, "workspace": "floor", "token": ""}
        up = await asyncio.to_thread(
            measured, {**base, "transfer": "upload", "mib": sizes.mib}, process.pid
        )
        down = await asyncio.to_thread(
            measured, {**base, "transfer": "download", "mib": sizes.mib}, process.pid
        )
    finally:
        stop(process)
    return {"upload": up, "download": down}


async def switchboard_round(sizes: Sizes, directory: Path, number: int) -> dict[str, Any]:
    url = f"sqlite+aiosqlite:///{directory / f'files-{number}.db'}"
    with serve(directory, url, {}) as server:
        async with dedicated_channel(server.address) as channel:
            account = await register(channel, f"files-{number}@example.com")
            stub = context_pb2_grpc.ContextServiceStub(channel)
            workspace = (
                await stub.CreateWorkspace(
                    pb.CreateWorkspaceRequest(
                        workspace=pb.Workspace(display_name="Files"),
                        workspace_id=f"files-{number}",
                    ),
                    metadata=account.metadata,
                    timeout=30,
                )
            ).workspace.name
        base = {"address": server.address, "token": account.token, "workspace": workspace}
        # One small transfer each way first: what a server allocates once (its blob
        # threads, the statements, the first buffers) is not what a transfer's size costs.
        warm = await asyncio.to_thread(
            run_client, SCRIPT, {**base, "transfer": "upload", "mib": WARM_MIB}
        )
        await asyncio.to_thread(
            run_client,
            SCRIPT,
            {**base, "transfer": "download", "mib": WARM_MIB, "file": warm["file"]},
        )
        result: dict[str, Any] = {}
        result["upload"] = await asyncio.to_thread(
            measured, {**base, "transfer": "upload", "mib": sizes.mib}, server.pid
        )
        result["resumable"] = await asyncio.to_thread(
            measured,
            {**base, "transfer": "resumable", "mib": sizes.resumable_mib},
            server.pid,
        )
        result["download"] = await asyncio.to_thread(
            measured,
            {**base, "transfer": "download", "mib": sizes.mib, "file": result["upload"]["file"]},
            server.pid,
        )
        if result["download"]["sha256"] != result["upload"]["sha256"]:
            raise RuntimeError("the downloaded file differs from the uploaded one")
    return result


async def drive(args: argparse.Namespace) -> int:
    sizes = QUICK if args.quick else FULL
    if args.rounds:
        sizes = dataclasses.replace(sizes, rounds=args.rounds)
    if args.mib:
        sizes = dataclasses.replace(sizes, mib=args.mib)
    results: dict[str, Any] = {"rounds": []}
    async with session(results, "switchboard-files-bench-") as directory:
        for number in range(sizes.rounds):
            # The order flips every round, so drift hits both alike.
            if number % 2 == 0:
                base = await floor_round(sizes)
                served = await switchboard_round(sizes, directory, number)
            else:
                served = await switchboard_round(sizes, directory, number)
                base = await floor_round(sizes)
            results["rounds"].append({"floor": base, "switchboard": served})
            for transfer in TRANSFERS:
                f = served[transfer]
                say(
                    f"round {number + 1} {transfer}: {f['mib_per_s']} MiB/s, RSS +"
                    f"{f['rss_growth_mib']} MiB (floor: "
                    f"{base.get(transfer, base['upload'])['mib_per_s']} MiB/s)"
                )
    results["summary"] = summarize(results["rounds"])
    report(results, render(results, command_line("bench/files.py"), sizes), args)
    return 0


def summarize(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for transfer in TRANSFERS:
        floor_of = "download" if transfer == "download" else "upload"
        rate = median(r["switchboard"][transfer]["mib_per_s"] for r in rounds)
        base = median(r["floor"][floor_of]["mib_per_s"] for r in rounds)
        summary[transfer] = {
            "mib_per_s": round(rate, 1),
            "floor_mib_per_s": round(base, 1),
            "ratio": round(rate / max(base, 1e-9), 3),
            "rss_growth_mib": round(
                median(r["switchboard"][transfer]["rss_growth_mib"] for r in rounds), 1
            ),
            "server_rss_mib": round(
                median(r["switchboard"][transfer]["rss_before_mib"] for r in rounds), 1
            ),
        }
    return summary


def render(results: dict[str, Any], command: str, sizes: Sizes) -> str:
    s = results["summary"]
    lines = [
        SECTION,
        "",
        *provenance(command, took_s=results.get("seconds")),
        host_speed_line(results["host"]),
        f"- a fresh `switchboard serve --dev` per round (embedded SQLite, the directory blob "
        f"store beside it); the measuring client in its own process on the same two cores; "
        f"{sizes.mib} MiB per streamed transfer, {sizes.resumable_mib} MiB resumable (one "
        f"`AppendUpload` per MiB, each fsynced); {sizes.rounds} rounds, medians",
        "- floor: a bare `grpc.aio` server with the same methods and messages that stores "
        "nothing (drops the upload, sends one held MiB over and over)",
        "- RSS growth: the server's peak `VmRSS` during the transfer (read every "
        f"{RSS_EVERY_S * 1000:g} ms) minus its RSS just before it, after a warm-up "
        f"transfer of {WARM_MIB} MiB each way (what a server allocates once is not what a "
        "transfer's size costs)",
        "",
        "| transfer | MiB/s | floor MiB/s | ratio | server RSS before, MiB | RSS growth, MiB |",
        "|---|---|---|---|---|---|",
    ]
    for transfer in TRANSFERS:
        f = s[transfer]
        lines.append(
            f"| {transfer} | {f['mib_per_s']} | {f['floor_mib_per_s']} | {f['ratio']:.2f} | "
            f"{f['server_rss_mib']} | {f['rss_growth_mib']} |"
        )
    rates = {t: s[t]["mib_per_s"] for t in ("upload", "download")}
    growth = max(s[t]["rss_growth_mib"] for t in TRANSFERS)
    lines += [
        "",
        f"- through gRPC (`UploadFile`, `DownloadFile`): {rates['upload']} and "
        f"{rates['download']} MiB/s (goal: at least {RATE_GOAL_MIB_S:g}): "
        f"{verdict(min(rates.values()) >= RATE_GOAL_MIB_S)}",
        f"- the server's RSS growth during a {sizes.mib} MiB transfer: at most {growth} MiB "
        f"(goal: under {RSS_GOAL_MIB:g}): {verdict(growth < RSS_GOAL_MIB)}",
    ]
    return "\n".join(lines)


def options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rounds", type=int, default=0, help="rounds (default: 3, quick: 1)")
    parser.add_argument("--mib", type=int, default=0, help="MiB per streamed transfer")


def main() -> int:
    return section_main(
        __doc__,
        drive,
        quick="64 MiB transfers, one round",
        options=options,
        roles={"client": client_role, "floor": floor},
    )


if __name__ == "__main__":
    sys.exit(main())
