"""PDF text extraction in child processes bounded in time and memory.

pypdf is pure Python with no time bound of its own: a crafted PDF of a few
kilobytes (pages that all share one content stream of a million operators, a
deep or looping structure) can hold it for hours, and a thread cannot be
stopped. So a PDF is read in a process of its own, which can: its address space
is capped (``RLIMIT_AS``, so a memory bomb ends as a MemoryError, not as the
server's), its CPU time too (``RLIMIT_CPU``, a backstop), and the server kills
it when its wall time is up.

Starting an interpreter and importing pypdf for every PDF would cost a few
hundred milliseconds; instead one helper process per server (``main`` below:
``python -m switchboard.context.files.reading.pdfworker``) imports pypdf once, reads
jobs as JSON lines on its stdin, and forks a child for each (a fork of a
single-threaded process that has pypdf loaded: a few milliseconds). The child
sets its limits (and, on Linux, dies with the helper), extracts, writes the
result to a file the server named, and exits; the helper reports each child's
exit status on its stdout, and kills a child when the server asks (only the
helper may: it is the parent, so the pid cannot have been reused meanwhile).

``PdfExtractor`` is the server's side: it starts the helper on first use,
bounds how many PDFs are read at once, waits for each without holding a
thread or blocking the event loop, and turns every way a child can end into an
``Extracted``: the text, or a short reason (too slow, too much memory, not
readable). A helper that dies is started again for the next PDF.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import io
import json
import logging
import os
import resource
import selectors
import signal
import sys
from pathlib import Path
from typing import IO, Any, Final

from switchboard.context.files.reading.extract import Extracted, pdf_text

log = logging.getLogger("switchboard.context.files")

MiB: Final = 1024 * 1024
#: How long the helper may take to start (importing pypdf on a busy machine).
START_TIMEOUT_S: Final = 60.0
#: How long a killed child may take to be reported gone.
KILL_TIMEOUT_S: Final = 10.0


def _one_page_pdf(content: bytes) -> bytes:
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] "
        b"/Resources << /Font << /F1 4 0 R >> >> /Contents 5 0 R >>",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
        b"<< /Length %d >>\nstream\n%s\nendstream" % (len(content), content),
    ]
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n%s\nendobj\n" % (number, body)
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (
        len(objects) + 1,
        xref,
    )
    return bytes(out)


#: A one-page PDF read once at the helper's start, so that pypdf's lazy imports
#: and caches are warm in every child it forks.
_WARM_PDF: Final = _one_page_pdf(b"BT /F1 12 Tf 72 720 Td (warm) Tj ET")


class PdfExtractor:
    """Reads PDFs' text in bounded child processes of one helper (see the module doc)."""

    def __init__(self, *, timeout_s: float, memory_bytes: int, concurrency: int) -> None:
        self.timeout_s = timeout_s
        self.memory_bytes = memory_bytes
        self._slots = asyncio.Semaphore(concurrency)
        self._helper: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self._starting = asyncio.Lock()
        # Each job's exit status, and the helper whose child runs it.
        self._exits: dict[int, tuple[asyncio.subprocess.Process, asyncio.Future[int]]] = {}
        self._jobs = 0
        self._closed = False

    async def extract(self, source: Path, *, max_chars: int, max_pages: int) -> Extracted:
        """The text of the PDF at ``source``; a reason instead when it cannot be read
        within the limits. The caller removes ``source`` afterwards."""
        async with self._slots:
            helper = await self._helper_running()
            if helper is None:
                return Extracted(error="the PDF could not be read (its reader did not start)")
            self._jobs += 1
            job = self._jobs
            result = source.with_name(f"{source.name}.{job}.json")
            exited = asyncio.get_running_loop().create_future()
            self._exits[job] = (helper, exited)
            request = {
                "job": job,
                "source": str(source),
                "result": str(result),
                "max_chars": max_chars,
                "max_pages": max_pages,
                "memory_bytes": self.memory_bytes,
                "cpu_s": int(self.timeout_s) + 1,
            }
            try:
                await self._send(helper, request)
                try:
                    code = await asyncio.wait_for(asyncio.shield(exited), self.timeout_s)
                except TimeoutError:
                    await self._kill(helper, job, exited)
                    return Extracted(error=f"reading the PDF took longer than {self.timeout_s:g} s")
                return await self._outcome(code, result)
            finally:
                if not exited.done():
                    # Cancelled, or the helper went away: the child must not run on.
                    with contextlib.suppress(Exception):
                        await self._kill(helper, job, exited)
                self._exits.pop(job, None)
                with contextlib.suppress(OSError):
                    await asyncio.to_thread(result.unlink, missing_ok=True)

    async def close(self) -> None:
        self._closed = True
        helper, self._helper = self._helper, None
        if helper is not None:
            await _stop(helper)
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        self._fail_waiting()

    async def _outcome(self, code: int, result: Path) -> Extracted:
        if code == 0:
            try:
                answer = await asyncio.to_thread(_read_json, result)
            except (OSError, ValueError):
                answer = None
            if isinstance(answer, dict):
                text, error = answer.get("text", ""), answer.get("error", "")
                return Extracted(text=str(text), error=str(error))
        if code in (-signal.SIGXCPU, -signal.SIGKILL):
            # Its CPU limit, or the kernel's out-of-memory killer.
            return Extracted(error=f"reading the PDF took longer than {self.timeout_s:g} s")
        log.info("PDF reader child ended with %s", code)
        return Extracted(error="the PDF could not be read")

    async def _helper_running(self) -> asyncio.subprocess.Process | None:
        async with self._starting:
            helper = self._helper
            if helper is not None and helper.returncode is None:
                return helper
            if self._closed:
                return None
            if helper is not None:
                self._fail_waiting(helper)
            try:
                helper = await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-m",
                    "switchboard.context.files.reading.pdfworker",
                    stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE,
                )
            except OSError:
                log.warning("could not start the PDF reader", exc_info=True)
                return None
            try:
                ready = await asyncio.wait_for(_out(helper).readline(), START_TIMEOUT_S)
            except TimeoutError:
                ready = b""
            if not ready.startswith(b'{"ready"'):
                log.warning("the PDF reader did not start")
                await _stop(helper)
                return None
            self._helper = helper
            self._reader = asyncio.create_task(self._read(helper), name="pdf-reader-exits")
            return helper

    async def _read(self, helper: asyncio.subprocess.Process) -> None:
        """Dispatch the helper's reports of its children's exits."""
        try:
            while line := await _out(helper).readline():
                report = json.loads(line)
                found = self._exits.get(int(report.get("job", 0)))
                if found is not None and not found[1].done():
                    found[1].set_result(int(report["exit"]))
        except (ValueError, KeyError, TypeError):
            log.warning("the PDF reader sent what it should not; restarting it")
            await _stop(helper)
        finally:
            if self._helper is helper:
                self._helper = None
            # Whatever was in flight on this helper ends now (its children were killed
            # with it): as unreadable, never as waiting forever. A newer helper's jobs
            # are not this one's.
            self._fail_waiting(helper)

    async def _send(self, helper: asyncio.subprocess.Process, request: dict[str, Any]) -> None:
        stdin = helper.stdin
        if stdin is None:  # pragma: no cover - started with a pipe
            raise RuntimeError("the PDF reader has no stdin")
        stdin.write(json.dumps(request).encode() + b"\n")
        try:
            await stdin.drain()
        except (ConnectionError, RuntimeError):
            found = self._exits.get(int(request.get("job", 0)))
            if found is not None and not found[1].done():
                found[1].set_result(-1)

    async def _kill(
        self, helper: asyncio.subprocess.Process, job: int, exited: asyncio.Future[int]
    ) -> None:
        await self._send(helper, {"kill": job})
        try:
            await asyncio.wait_for(asyncio.shield(exited), KILL_TIMEOUT_S)
        except TimeoutError:
            # The helper does not answer: it and all its children go.
            log.warning("the PDF reader did not stop a child; restarting it")
            if self._helper is helper:
                self._helper = None
            await _stop(helper)

    def _fail_waiting(self, helper: asyncio.subprocess.Process | None = None) -> None:
        """End the jobs of ``helper`` (None: of every helper) as unreadable."""
        for owner, exited in self._exits.values():
            if (helper is None or owner is helper) and not exited.done():
                exited.set_result(-1)


async def _stop(helper: asyncio.subprocess.Process) -> None:
    """End the helper: closing its stdin makes it kill its children and exit."""
    if helper.stdin is not None:
        helper.stdin.close()
    try:
        await asyncio.wait_for(helper.wait(), KILL_TIMEOUT_S)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            helper.kill()
        await helper.wait()


def _out(helper: asyncio.subprocess.Process) -> asyncio.StreamReader:
    if helper.stdout is None:  # pragma: no cover - started with a pipe
        raise RuntimeError("the PDF reader has no stdout")
    return helper.stdout


def _read_json(path: Path) -> Any:
    with path.open("rb") as handle:
        return json.load(handle)


# -- the helper process ----------------------------------------------------------------


def main() -> None:
    """The helper: warm pypdf, then fork a bounded child per job read on stdin."""
    logging.getLogger("pypdf").setLevel(logging.CRITICAL)
    pdf_text(io.BytesIO(_WARM_PDF), max_chars=100, max_pages=1)
    out = sys.stdout.buffer
    children: dict[int, int] = {}  # pid -> job
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    os.set_blocking(wake_r, False)
    signal.set_wakeup_fd(wake_w)
    # A handler of its own (not SIG_IGN): children stay to be reaped, and their
    # exits wake the loop through the pipe.
    signal.signal(signal.SIGCHLD, lambda *_: None)
    stdin = sys.stdin.buffer.fileno()
    selector = selectors.DefaultSelector()
    selector.register(stdin, selectors.EVENT_READ)
    selector.register(wake_r, selectors.EVENT_READ)
    _report(out, {"ready": True})
    pending = b""
    while True:
        for key, _ in selector.select():
            if key.fd == wake_r:
                with contextlib.suppress(BlockingIOError):
                    while os.read(wake_r, 4096):
                        pass
                continue
            data = os.read(stdin, 65536)
            if not data:
                # The server closed our stdin (or died): nothing may outlive it.
                for pid in children:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                return
            pending += data
            *lines, pending = pending.split(b"\n")
            for line in lines:
                if line.strip():
                    _handle(json.loads(line), children, out, (wake_r, wake_w, stdin))
        _reap(children, out)


def _handle(
    request: dict[str, Any], children: dict[int, int], out: IO[bytes], fds: tuple[int, ...]
) -> None:
    if "kill" in request:
        for pid, job in children.items():
            if job == request["kill"]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        return
    pid = os.fork()
    if pid == 0:
        _child(request, fds)
    children[pid] = int(request["job"])


def _reap(children: dict[int, int], out: IO[bytes]) -> None:
    while children:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        job = children.pop(pid, None)
        if job is not None:
            _report(out, {"job": job, "exit": os.waitstatus_to_exitcode(status)})


def _die_with_parent() -> None:
    """On Linux, have the kernel kill this child when the helper dies (even by SIGKILL),
    so that no PDF is read on with nobody waiting for it. Elsewhere the CPU limit ends it."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_pdeathsig = 1
    libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
    if os.getppid() == 1:
        # The helper died before the line above took effect.
        os._exit(1)


def _report(out: IO[bytes], message: dict[str, Any]) -> None:
    out.write(json.dumps(message).encode() + b"\n")
    out.flush()


def _child(request: dict[str, Any], fds: tuple[int, ...]) -> None:
    """A forked child: limits, the extraction, its result in a file; never returns."""
    code = 1
    try:
        _die_with_parent()
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for fd in fds:
            os.close(fd)
        # Nothing it prints may reach the helper's reports.
        null = os.open(os.devnull, os.O_RDWR)
        os.dup2(null, 0)
        os.dup2(null, 1)
        memory = int(request["memory_bytes"])
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
        cpu = int(request["cpu_s"])
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
        try:
            with open(request["source"], "rb") as source:
                extracted = pdf_text(
                    source,
                    max_chars=int(request["max_chars"]),
                    max_pages=int(request["max_pages"]),
                )
        except MemoryError:
            extracted = Extracted(
                error=f"reading the PDF needed more than {memory // MiB} MiB of memory"
            )
        result = Path(request["result"])
        partial = result.with_name(result.name + ".part")
        with partial.open("w", encoding="utf-8") as handle:
            json.dump({"text": extracted.text, "error": extracted.error}, handle)
        partial.replace(result)
        code = 0
    except BaseException:  # noqa: BLE001 - a child reports by its exit code, never raises
        code = 1
    finally:
        os._exit(code)


if __name__ == "__main__":
    main()
