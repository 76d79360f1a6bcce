"""The browser console (clients/web) in headless Chromium, served by a real Envoy in front of
a real ``switchboard serve --dev``, over HTTP/2 on Envoy's TLS listener.

One stack for the module: the console built once (``node build.mjs`` into a temporary
directory) and type-checked (``tsc --noEmit``, strict) while the servers start; the local
OpenAI-protocol server as the llm handler's model; ``switchboard serve --dev`` on a database
file that outlives it; Envoy rendered with ``--console``; and two TCP relays
(tests/infra/tcprelay.py): Chromium -> relay -> Envoy's TLS port, which the tests cut to
drop the page's connections, and Envoy -> relay -> the server, so the server can be
replaced under Envoy. Each test drives its own Chromium through tests/browser/console.mjs,
one step at a time, and checks what the page shows against the server's own answers
(Python stubs, through the upstream relay).

- Envoy serves the build itself: the routes in its /config_dump, each file byte for byte
  over HTTP/2 with its type and security headers, nothing but GET and HEAD.
- A full session: a refused registration shown precisely, register on the page, create a
  workspace and a conversation, an echo answer streamed delta by delta, a screenshot, a slow
  run cancelled from the page, sign out (the server's session is revoked); the page and
  every call over h2, under the CSP.
- Live events resume after the connection is dropped: cut and refused at the relay, a
  message appended meanwhile shows exactly once, the feed reopened after the cursor it
  had, reconnecting -> live; a run's answer resumes (WatchRun after its last sequence)
  without a word lost or repeated.
- Integrations and approvals: an MCP integration's health and circuit, updated live when
  its server goes away; a run paused for approval, denied with a reason and approved from
  the page, then completing.
- Outcome unknown: runs whose calls to a tool not marked retry-safe were in flight when the
  server was killed (SIGKILL) pause after the restart, and the page decides them with
  Retry, Mark done (its result required) and Fail run instead of Approve and Deny.
- Sessions: the session survives a reload (one renewal, the refresh token rotated); a
  duplicated tab leaves the session to its original; a replaced server that refuses the
  old access token gets exactly one more renewal while the streams resume; the spent
  refresh token, presented again, revokes the session and the page says so precisely.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import itertools
import json
import os
import queue
import re
import signal
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, cast
from zoneinfo import ZoneInfo

import grpc
import httpx
import pytest
from google.protobuf import duration_pb2, field_mask_pb2
from google.rpc import error_details_pb2, status_pb2

from switchboard.api.auth.v1 import auth_pb2, auth_pb2_grpc
from switchboard.api.context.v1 import context_pb2, context_pb2_grpc
from switchboard.api.dispatcher.v1 import dispatcher_pb2, dispatcher_pb2_grpc
from switchboard.api.events.v1 import events_pb2, events_pb2_grpc
from switchboard.api.handler.v1 import handler_pb2
from switchboard.api.integration.v1 import integration_pb2, integration_pb2_grpc
from switchboard.deploy.edge.envoy import (
    CONSOLE_CSP,
    CONSOLE_HEADERS,
    CONSOLE_TYPES,
    MAX_CONSOLE_FILE_BYTES,
)
from switchboard.platform.security.credentials.devkey import dev_key_path
from switchboard.platform.values import names
from tests.conftest import CALL_DEADLINE_S
from tests.e2e.chromium import artifacts_dir, js_fixed, required, spki_sha256
from tests.e2e.envoy import EnvoyProcess
from tests.e2e.procs import ROOT, ServeProcess
from tests.infra.mcpserver import McpTestServer
from tests.infra.tcprelay import TcpRelay
from tests.infra.webhookreceiver import WebhookReceiver
from tests.kits.authkit import PASSWORD, unique_email

pytestmark = pytest.mark.e2e

WEB: Final = ROOT / "clients" / "web"
BROWSER_DIR: Final = ROOT / "tests" / "browser"
DRIVER: Final = BROWSER_DIR / "console.mjs"
#: How long the driver waits for any one page condition.
WAIT_MS: Final = 30_000
#: How long the test waits for the driver's answer to one step.
STEP_S: Final = 60.0


# -- The stack ----------------------------------------------------------------------------


@dataclass
class Stack:
    env: dict[str, str]
    serve: ServeProcess
    upstream: TcpRelay
    envoy: EnvoyProcess
    front: TcpRelay
    typecheck: subprocess.Popen[str]
    console_dir: Path
    restarts: list[float] = field(default_factory=list)

    @property
    def origin(self) -> str:
        return f"https://localhost:{self.front.port}"

    @property
    def address(self) -> str:
        """The server, through the upstream relay: the same address across a restart."""
        return f"127.0.0.1:{self.upstream.port}"

    def restart_server(self) -> None:
        """A new server process on the same database with a new signing key (dev mode
        keeps its key beside the database: deleting it is what makes a new one)."""
        started = time.monotonic()
        # Refused meanwhile: the old server's port, free now, could be taken by anyone.
        self.upstream.retarget(0)
        assert self.serve.terminate() == 0
        self.serve.__exit__(None, None, None)
        kept = dev_key_path(self.env["SWITCHBOARD_DATABASE_URL"])
        assert kept is not None
        kept.unlink()
        # The stack owns it before it starts: a failed start is still cleaned up.
        self.serve = ServeProcess("--dev", env=self.env)
        self.serve.start()
        self.upstream.retarget(self.serve.port)
        self.restarts.append(time.monotonic() - started)

    def crash_server(self) -> None:
        """SIGKILL the server mid-work, then a new process as the same dispatcher instance
        (`SWITCHBOARD_INSTANCE_ID`) on the same database and signing key: at start it takes
        its runs back and recovers them by the default policy (`resume`)."""
        instance = self.serve.env["SWITCHBOARD_INSTANCE_ID"]
        self.upstream.retarget(0)
        assert self.serve.proc is not None
        self.serve.proc.kill()
        assert self.serve.proc.wait(timeout=30) == -signal.SIGKILL
        self.serve.__exit__(None, None, None)
        self.serve = ServeProcess("--dev", env={**self.env, "SWITCHBOARD_INSTANCE_ID": instance})
        self.serve.start()
        self.upstream.retarget(self.serve.port)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    node = required("node", "scripts/install-deps.sh")
    if not (WEB / "node_modules" / "esbuild").is_dir():
        pytest.fail("clients/web has no node_modules; run `make tools` (npm ci in clients/web)")
    root = tmp_path_factory.mktemp("console")
    console_dir = root / "dist"
    # Every process is registered for cleanup before it starts: a failure anywhere (a
    # start past its deadline on a busy machine) leaves nothing running.
    with ExitStack() as cleanup:
        # The type check takes seconds: it runs while everything else starts.
        typecheck = subprocess.Popen(
            [node, str(WEB / "node_modules" / "typescript" / "bin" / "tsc"), "--noEmit", "-p", "."],
            cwd=WEB,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        cleanup.callback(_reap, typecheck)
        built = subprocess.run(
            [node, str(WEB / "build.mjs"), f"--outdir={console_dir}"],
            cwd=WEB,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert built.returncode == 0, built.stderr
        names = {p.name for p in console_dir.iterdir()}
        assert names == {"index.html", "app.js", "app.css", "favicon.svg", "capture.js"}
        llm_url = cleanup.enter_context(_openai_server())
        embeddings_url = cleanup.enter_context(_embeddings_server())
        # Both relays refuse connections until they have a target.
        upstream = cleanup.enter_context(TcpRelay())
        front = cleanup.enter_context(TcpRelay())
        env = {
            "SWITCHBOARD_DATABASE_URL": f"sqlite+aiosqlite:///{root}/switchboard.db",
            "SWITCHBOARD_LLM_BASE_URL": llm_url,
            "SWITCHBOARD_LLM_MODEL": "echo",
            "SWITCHBOARD_LLM_MAX_RETRIES": "0",
            "SWITCHBOARD_EGRESS_ALLOW_LOOPBACK": "true",
            "SWITCHBOARD_INTEGRATION_PROBE_INTERVAL_S": "0.5",
            "SWITCHBOARD_EVENTS_HEARTBEAT_S": "1",
            "SWITCHBOARD_DISPATCHER_HEARTBEAT_S": "1",
            "SWITCHBOARD_SHUTDOWN_GRACE_S": "1",
            # Priced, so the run inspector has a cost to show.
            # echo-free: a model priced at 0 (a free local one), priced, not "unpriced".
            "SWITCHBOARD_LLM_PRICES": json.dumps(
                {
                    "echo": {"input_per_mtok": 1000, "output_per_mtok": 2000},
                    "echo-free": {"input_per_mtok": 0, "output_per_mtok": 0},
                }
            ),
            # A schedule may tick every 2 s, so the Schedules page sees one fire.
            "SWITCHBOARD_SCHEDULES_MIN_INTERVAL_S": "1",
            # An embeddings endpoint with no default model: only a workspace that names one
            # (UpdateSemanticIndex) is indexed, the others search by words alone.
            "SWITCHBOARD_CONTEXT_EMBEDDINGS_URL": embeddings_url,
            "SWITCHBOARD_CONTEXT_SEMANTIC_POLL_S": "0.2",
        }
        envoy = EnvoyProcess(
            f"127.0.0.1:{upstream.port}",
            tls=True,
            console=console_dir,
            extra_args=("--health-interval=1",),
        )
        cleanup.push(envoy.__exit__)
        # Envoy's render takes seconds too: it starts beside the server (the relay's port
        # is known before the server's). The pool is waited for before Envoy is stopped.
        pool = cleanup.enter_context(ThreadPoolExecutor(max_workers=1))
        envoy_started = pool.submit(envoy.start)
        serve = ServeProcess("--dev", env=env)
        stack = Stack(env, serve, upstream, envoy, front, typecheck, console_dir)
        cleanup.callback(lambda: stack.serve.__exit__(None, None, None))
        serve.start()
        upstream.retarget(serve.port)
        envoy_started.result(timeout=180)
        front.retarget(envoy.tls_port)
        yield stack


def _reap(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=CALL_DEADLINE_S)
    if proc.stdout is not None:
        proc.stdout.close()


@contextmanager
def _local_server(module: str, what: str) -> Iterator[str]:
    """One of the suite's local protocol servers (``tests/fakes/``), started on a free
    port: its URL, from its first line."""
    proc = subprocess.Popen(
        [sys.executable, "-m", module, "--port", "0", "--quiet"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        if not url.startswith("http://127.0.0.1:"):
            pytest.fail(f"the {what} did not start: {url!r}")
        yield url
    finally:
        proc.kill()
        proc.wait(timeout=CALL_DEADLINE_S)
        if proc.stdout is not None:
            proc.stdout.close()


def _openai_server() -> AbstractContextManager[str]:
    """The local OpenAI-protocol server (tests/fakes/openai_server.py): its echo model
    answers with the message, or with the tool calls a ``call NAME {json}`` line asks for."""
    return _local_server("tests.fakes.openai_server", "OpenAI-protocol server")


def _embeddings_server() -> AbstractContextManager[str]:
    """The local embeddings server (tests/fakes/embeddings_server.py): deterministic
    vectors, texts sharing words close and texts sharing none nearly orthogonal."""
    return _local_server("tests.fakes.embeddings_server", "embeddings server")


# -- The browser ---------------------------------------------------------------------------


def tid(testid: str, /, **attrs: str) -> str:
    """A CSS selector by data-testid (and data-* attributes)."""
    extra = "".join(f'[data-{k.replace("_", "-")}="{v}"]' for k, v in attrs.items())
    return f'[data-testid="{testid}"]{extra}'


class Chromium:
    """One Chromium for the module, driven step by step through tests/browser/console.mjs;
    each test opens its pages in a browser context of its own."""

    def __init__(self, cert_file: Path, *, args: Sequence[str] = ()) -> None:
        """Trusting the certificate ``cert_file`` (Envoy's), with Chromium's own ``args``
        besides the usual ones (chromium.mjs)."""
        config = {
            "chromium": required("chromium", "scripts/install-deps.sh"),
            "spki": spki_sha256(cert_file),
            "waitMs": WAIT_MS,
            "args": list(args),
        }
        self.proc = subprocess.Popen(
            [required("node", "scripts/install-deps.sh"), str(DRIVER), json.dumps(config)],
            cwd=BROWSER_DIR,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        self._answers: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._stderr: list[str] = []
        self._next = 0
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._drain, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._answers.put(json.loads(line))
        self._answers.put(None)

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self._stderr.append(line.rstrip())

    def call(self, op: str, **args: Any) -> Any:
        self._next += 1
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"id": self._next, "op": op, **args}) + "\n")
        self.proc.stdin.flush()
        deadline = time.monotonic() + STEP_S
        while True:
            try:
                answer = self._answers.get(timeout=max(deadline - time.monotonic(), 0.0))
            except queue.Empty:
                pytest.fail(f"the browser driver did not answer {op} within {STEP_S}s")
            if answer is None:
                pytest.fail(f"the browser driver ended during {op}: {self._stderr[-20:]}")
            # An earlier call's answer, come after its test gave up on it (a timeout):
            # not this call's, and the module's next tests share this browser.
            if answer["id"] == self._next:
                break
            assert answer["id"] < self._next, answer
        if not answer["ok"]:
            console = self.call("console", page=args["page"])[-20:] if "page" in args else []
            pytest.fail(
                f"{op} {json.dumps(args)[:300]} failed: {answer['error']}\n"
                f"page: {json.dumps(answer.get('page'), indent=1)}\nconsole: {console}\n"
                f"calls: {json.dumps(answer.get('network'), indent=1)}"
            )
        return answer["value"]

    def open(self, url: str, *, downloads: Path | None = None) -> Page:
        """A page in a context of its own; its downloads saved in ``downloads``."""
        return Page(
            self, self.call("open", url=url, downloads=str(downloads) if downloads else None)
        )

    def close(self) -> None:
        if self.proc.poll() is None and self.proc.stdin is not None:
            try:
                self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.proc.stdin.close()
                self.proc.wait(timeout=20)
            except (OSError, subprocess.TimeoutExpired):
                pass
        if self.proc.poll() is None:
            # SIGTERM: puppeteer closes Chromium on it.
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=CALL_DEADLINE_S)


@pytest.fixture(scope="module")
def chromium(stack: Stack) -> Iterator[Chromium]:
    driver = Chromium(stack.envoy.cert_file)
    yield driver
    driver.close()


class Page:
    """One page of the console, in its own browser context (closed on exit)."""

    def __init__(self, chromium: Chromium, index: int, *, tab: bool = False) -> None:
        self.chromium = chromium
        self.index = index
        self.tab = tab

    def call(self, op: str, **args: Any) -> Any:
        return self.chromium.call(op, page=self.index, **args)

    def click(self, selector: str) -> None:
        self.call("click", selector=selector)

    def fill(self, selector: str, value: str) -> None:
        self.call("fill", selector=selector, value=value)

    def select(self, selector: str, value: str) -> None:
        self.call("select", selector=selector, value=value)

    def wait(self, fn: str, arg: Any = None) -> Any:
        """Until ``fn(arg)`` (JavaScript, run in the page) is truthy; what it returned."""
        return self.call("wait", fn=fn, arg=arg)

    def eval(self, fn: str, arg: Any = None) -> Any:
        return self.call("eval", fn=fn, arg=arg)

    def wait_for(self, selector: str) -> None:
        self.wait("(s) => document.querySelector(s) !== null", selector)

    def wait_visible(self, selector: str) -> None:
        """Until the element is there and rendered (not hidden, nor inside something hidden)."""
        self.wait("(s) => document.querySelector(s)?.checkVisibility() === true", selector)

    def visible(self, selector: str) -> bool:
        shown: bool = self.eval(
            "(s) => document.querySelector(s)?.checkVisibility() === true", selector
        )
        return shown

    def count(self, selector: str) -> int:
        found: int = self.eval("(s) => document.querySelectorAll(s).length", selector)
        return found

    def data(self, selector: str) -> dict[str, str]:
        found: dict[str, str] = self.eval(
            "(s) => ({ ...document.querySelector(s).dataset })", selector
        )
        return found

    def storage(self) -> dict[str, Any]:
        raw = self.eval("() => sessionStorage.getItem('switchboard.console.session')")
        return json.loads(raw) if raw else {}

    def reload(self) -> None:
        self.call("reload")

    def duplicate(self) -> Page:
        """A tab this page opens (a copy of its sessionStorage); closed with this page."""
        return Page(self.chromium, self.call("duplicate"), tab=True)

    def network(self) -> list[dict[str, Any]]:
        entries: list[dict[str, Any]] = self.call("network")
        return entries

    def console(self) -> list[dict[str, Any]]:
        messages: list[dict[str, Any]] = self.call("console")
        return messages

    def screenshot(self, path: Path) -> None:
        self.call("screenshot", path=str(path))

    def viewport(self, width: int, height: int) -> None:
        self.call("viewport", width=width, height=height)

    def shots(self, path: Path) -> None:
        """The page at a desktop's width and at a phone's (``NAME-420.png``), back at the
        desktop's after."""
        self.screenshot(path)
        self.viewport(PHONE_WIDTH, 900)
        self.wait_stacked()
        self.screenshot(path.with_name(f"{path.stem}-{PHONE_WIDTH}{path.suffix}"))
        self.viewport(DESKTOP_WIDTH, 900)

    def wait_stacked(self) -> None:
        """Until the three columns stand one above the other, within the window's width."""
        self.wait(STACKED_JS)

    def __enter__(self) -> Page:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.chromium.proc.poll() is None:
            self.call("closeTab" if self.tab else "close")


# -- The console's screens, as steps ---------------------------------------------------------


def sign_in(browser: Page, email: str, *, register: bool = False) -> str:
    """Signs in (or registers) on the page; the session's resource name."""
    browser.wait_visible(tid("auth"))
    browser.fill(tid("email"), email)
    browser.fill(tid("password"), PASSWORD)
    if register:
        browser.fill(tid("display-name"), "Console User")
        browser.click(tid("register"))
    else:
        browser.click(tid("sign-in"))
    browser.wait_visible(tid("console"))
    assert not browser.visible(tid("auth"))
    browser.wait_for(tid("connection", state="live"))
    session: str = browser.data(tid("session-info"))["session"]
    assert session.startswith("users/")
    return session


def open_conversation(browser: Page, workspace: str, conversation: str) -> None:
    browser.click(tid("workspace-item", name=workspace))
    browser.click(tid("conversation-item", name=conversation))
    browser.wait_visible(tid("composer"))
    browser.wait_for(f"{tid('conversation-item', name=conversation)}.current")
    # Its messages and runs listed: nothing moves under the next click.
    idle(browser)


def idle(browser: Page) -> None:
    """Waits until the page has no call of its own in flight (the console counts them)."""
    browser.wait("() => (document.body.dataset.busy ?? '0') === '0'")


def send(
    browser: Page, text: str, *, handler: str = "", parameters: str = "", expect_run: bool = True
) -> str:
    """Sends from the composer; the new run's name (the page's newest run card)."""
    before = browser.count(tid("run"))
    if handler:
        browser.select(tid("handler-select"), handler)
    if parameters and not browser.eval("(s) => document.querySelector(s).open", tid("advanced")):
        browser.click(f"{tid('advanced')} > summary")
    if parameters or browser.eval("(s) => document.querySelector(s).open", tid("advanced")):
        browser.fill(tid("parameters-input"), parameters)
    browser.fill(tid("message-input"), text)
    browser.click(tid("send"))
    if not expect_run:
        return ""
    run: str = browser.wait(
        "(n) => { const r = document.querySelectorAll('[data-testid=\"run\"]');"
        " return r.length > n && r[r.length - 1].dataset.run; }",
        before,
    )
    return run


def run_state(browser: Page, run: str, state: str) -> dict[str, str]:
    """Waits until the run's card shows ``state``; its data and answer."""
    found: dict[str, str] = browser.wait(
        "([run, state]) => { const c = [...document.querySelectorAll('[data-testid=\"run\"]')]"
        ".find((e) => e.dataset.run === run); return c && c.dataset.state === state &&"
        " { ...c.dataset, answer: c.querySelector('[data-testid=\"run-answer\"]').textContent }; }",
        [run, state],
    )
    return found


#: What Chromium itself logs for a request whose connection was reset, or that Envoy
#: answered 503 (no server): expected while a test has cut the network or replaces the
#: server, never otherwise.
OUTAGE_ERRORS: Final = (
    "net::ERR_CONNECTION_RESET",
    "net::ERR_CONNECTION_CLOSED",
    "net::ERR_CONNECTION_REFUSED",
    "the server responded with a status of 503",
)


def running(browser: Page, run: str, deltas: int) -> str:
    """Waits until the run's card shows it RUNNING with ``deltas`` deltas; its answer so far."""
    text: str = browser.wait(
        '([run, n]) => { const c = document.querySelector(`[data-run="${run}"]`);'
        " return c && c.dataset.state === 'RUN_STATE_RUNNING' && Number(c.dataset.deltas) >= n"
        " && c.querySelector('[data-testid=\"run-answer\"]').textContent; }",
        [run, deltas],
    )
    return text


def watch_answer(browser: Page, run: str) -> None:
    """Records every text the run's answer shows from now on (a MutationObserver the test
    puts in the page: what the page rendered, however fast the deltas came)."""
    browser.eval(
        "(run) => { const answer = document.querySelector("
        '`[data-run="${run}"] [data-testid="run-answer"]`); window.answersShown = [];'
        " new MutationObserver((records) => { for (const r of records) for (const n of"
        " r.addedNodes) window.answersShown.push(n.textContent); })"
        ".observe(answer, { childList: true }); }",
        run,
    )


def answers_shown(browser: Page) -> list[str]:
    shown: list[str] = browser.eval("() => window.answersShown")
    return shown


def current(browser: Page, item: str) -> str:
    """The name of the highlighted workspace or conversation ("" when none is)."""
    name: str = browser.eval(
        "(s) => document.querySelector(s)?.dataset.name ?? ''", f"{tid(item)}.current"
    )
    return name


#: The widths the screenshots are taken at: a desktop's and a phone's.
DESKTOP_WIDTH: Final = 1400
PHONE_WIDTH: Final = 420

#: True once the console's columns are stacked (each below the one before, as wide as the
#: page allows) and nothing is wider than the window.
STACKED_JS: Final = """() => {
  const columns = [...document.querySelectorAll('.console > .column')];
  if (columns.length !== 3) return false;
  const rects = columns.map((c) => c.getBoundingClientRect());
  const width = document.documentElement.clientWidth;
  const below = (r, i) => i === 0 || r.top >= rects[i - 1].bottom - 0.5;
  return rects.every((r, i) => r.right <= width + 0.5 && below(r, i))
    && document.documentElement.scrollWidth <= width;
}"""


def _enum_words() -> frozenset[str]:
    """Every value name of the contracts' enums, whole and without its enum's prefix
    (``HEALTH_STATE_UNSPECIFIED``, ``UNSPECIFIED``, ``MCP_SERVER``, ``SUCCEEDED``...)."""
    words: set[str] = set()
    for module in (auth_pb2, context_pb2, dispatcher_pb2, events_pb2, integration_pb2):
        files = [module.DESCRIPTOR, *module.DESCRIPTOR.dependencies]
        for file in files:
            for enum in file.enum_types_by_name.values():
                prefix = re.sub(r"(?<!^)(?=[A-Z])", "_", enum.name).upper() + "_"
                for value in enum.values:
                    words.update((value.name, value.name.removeprefix(prefix)))
    return frozenset(words)


ENUM_WORDS: Final = _enum_words()

#: The text a person reads that looks like an enum or a field name rather than words: an
#: enum value's name (``UNSPECIFIED``, ``SUCCEEDED``), anything snake_case (``mcp_server``)
#: or camelCase (``stateChange``). What the page quotes rather than says is left out: code
#: (tool and field names, an error's code and reason), what people, tools and servers
#: wrote (``data-content``, quotes), and what no one can see.
RAW_TEXT_JS: Final = """(words) => {
  const known = new Set(words);
  const quoted = 'code, pre, q, script, style, select, textarea, input, time, [data-content]';
  const found = [];
  const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
  for (let node = walker.nextNode(); node; node = walker.nextNode()) {
    const parent = node.parentElement;
    if (!parent || parent.closest(quoted) || !parent.checkVisibility()) continue;
    for (const token of node.textContent.match(/[A-Za-z0-9_]+/g) ?? []) {
      const camel = /^[a-z]+[A-Z]/.test(token) && token !== 'gRPC';
      if (token.includes('_') || camel || known.has(token)) {
        found.push(`${token} in "${node.textContent.trim().slice(0, 80)}"`);
      }
    }
  }
  return found;
}"""


def raw_text(browser: Page) -> list[str]:
    found: list[str] = browser.eval(RAW_TEXT_JS, sorted(ENUM_WORDS))
    return found


#: The words broken across two lines inside the elements ``selector`` finds (a run of
#: letters and digits whose characters lie on more than one line). A token longer than
#: ``max`` (an id, a URL) may break where it must.
SPLIT_WORDS_JS: Final = """([selector, max]) => {
  const split = [];
  for (const element of document.querySelectorAll(selector)) {
    if (!element.checkVisibility()) continue;
    const walker = document.createTreeWalker(element, NodeFilter.SHOW_TEXT);
    for (let node = walker.nextNode(); node; node = walker.nextNode()) {
      for (const word of node.textContent.matchAll(/[A-Za-z0-9]+/g)) {
        if (word[0].length > max) continue;
        const range = document.createRange();
        range.setStart(node, word.index);
        range.setEnd(node, word.index + word[0].length);
        const lines = new Set([...range.getClientRects()].map((r) => Math.round(r.top)));
        if (lines.size > 1) split.push(word[0]);
      }
    }
  }
  return split;
}"""


def split_words(browser: Page, selector: str, longest: int = 24) -> list[str]:
    found: list[str] = browser.eval(SPLIT_WORDS_JS, [selector, longest])
    return found


#: What the element ``selector`` finds lies on top of (or under): every other visible
#: element of the page whose box meets its box, its own ancestors and descendants aside.
COVERS_JS: Final = """(selector) => {
  const box = document.querySelector(selector);
  const r = box.getBoundingClientRect();
  const hits = [];
  for (const other of document.querySelectorAll('body *')) {
    if (other === box || box.contains(other) || other.contains(box)) continue;
    if (!other.checkVisibility()) continue;
    const o = other.getBoundingClientRect();
    if (o.width < 1 || o.height < 1) continue;
    const across = o.left < r.right - 1 && r.left < o.right - 1;
    if (across && o.top < r.bottom - 1 && r.top < o.bottom - 1) {
      hits.push(other.dataset.testid || other.className || other.tagName);
    }
  }
  return hits;
}"""


#: What an id field says and accepts: its pattern, its title, and for each sample value
#: whether the browser's own check (the pattern, the length) lets it through.
ID_FIELD_JS: Final = """([selector, samples]) => {
  const input = document.querySelector(selector);
  const before = input.value;
  const valid = {};
  for (const sample of samples) {
    input.value = sample;
    valid[sample] = input.checkValidity();
  }
  input.value = before;
  return { pattern: input.getAttribute('pattern'), title: input.title, valid };
}"""


def _id_samples(rule: names.IdRule) -> list[str]:
    shortest = "a" * rule.shortest
    return [
        shortest[:-1],
        shortest,
        "a-1" + "b" * max(0, rule.shortest - 3),
        "1" + shortest,
        "A" + shortest,
        shortest + "_",
        "a" * rule.longest,
        "a" * (rule.longest + 1),
    ]


def id_field(browser: Page, selector: str, rule: names.IdRule) -> dict[str, Any]:
    """What the id field ``selector`` says, and which of ``rule``'s samples it accepts."""
    found: dict[str, Any] = browser.eval(ID_FIELD_JS, [selector, _id_samples(rule)])
    return found


def id_rule_seen(rule: names.IdRule) -> dict[str, Any]:
    """What an id field following ``rule`` says and accepts: the server's pattern (its
    ``-`` escaped, as a browser's ``v``-flag pattern needs), the rule in the server's
    words, and exactly the values the server's pattern accepts."""
    return {
        "pattern": rule.regex.pattern.replace("0-9-]", "0-9\\-]"),
        "title": f"The id: {rule.words}.",
        "valid": {s: rule.regex.fullmatch(s) is not None for s in _id_samples(rule)},
    }


def covers(browser: Page, selector: str) -> list[str]:
    found: list[str] = browser.eval(COVERS_JS, selector)
    return found


def problems(browser: Page, *, outage: bool = False) -> list[str]:
    """What the console logged that a user would call an error (CSP violations included)."""
    return [
        f"{m['type']}: {m['text']}"
        for m in browser.console()
        if (m["type"] in ("error", "pageerror") or "Content Security Policy" in m["text"])
        and not (outage and any(error in m["text"] for error in OUTAGE_ERRORS))
    ]


# -- The server, through Python stubs --------------------------------------------------------


@dataclass
class User:
    email: str
    name: str
    access: str
    refresh: str

    @classmethod
    def signed_in(cls, answer: Any) -> User:
        """The user a Register or Login answer signed in."""
        return cls(
            answer.user.email,
            answer.user.name,
            answer.tokens.access_token,
            answer.tokens.refresh_token,
        )

    @property
    def md(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.access}"),)


class Server:
    """The server's own answers, through the generated stubs (sync gRPC)."""

    def __init__(self, address: str) -> None:
        self.channel = grpc.insecure_channel(address)
        self.auth = auth_pb2_grpc.AuthServiceStub(self.channel)
        self.context = context_pb2_grpc.ContextServiceStub(self.channel)
        self.dispatcher = dispatcher_pb2_grpc.DispatcherServiceStub(self.channel)
        self.events = events_pb2_grpc.EventServiceStub(self.channel)
        self.integration = integration_pb2_grpc.IntegrationServiceStub(self.channel)

    def register(self, prefix: str) -> User:
        answer = self.auth.Register(
            auth_pb2.RegisterRequest(
                email=unique_email(prefix), password=PASSWORD, display_name=prefix
            ),
            timeout=CALL_DEADLINE_S,
        )
        return User.signed_in(answer)

    def login(self, email: str) -> User:
        answer = self.auth.Login(
            auth_pb2.LoginRequest(
                password=auth_pb2.PasswordCredential(email=email, password=PASSWORD)
            ),
            timeout=CALL_DEADLINE_S,
        )
        return User.signed_in(answer)

    def workspace(self, user: User, workspace_id: str) -> tuple[str, str]:
        """A workspace and a conversation in it; their names."""
        workspace = self.context.CreateWorkspace(
            context_pb2.CreateWorkspaceRequest(
                workspace_id=workspace_id,
                workspace=context_pb2.Workspace(display_name=workspace_id.title()),
            ),
            metadata=user.md,
            timeout=CALL_DEADLINE_S,
        ).workspace.name
        conversation = self.context.CreateConversation(
            context_pb2.CreateConversationRequest(
                parent=workspace, conversation=context_pb2.Conversation(title="Plans")
            ),
            metadata=user.md,
            timeout=CALL_DEADLINE_S,
        ).conversation.name
        return workspace, conversation

    def append(self, user: User, conversation: str, text: str) -> str:
        return str(
            self.context.AppendMessage(
                context_pb2.AppendMessageRequest(
                    parent=conversation,
                    message=context_pb2.Message(
                        role=context_pb2.MESSAGE_ROLE_USER,
                        parts=[context_pb2.ContentPart(text=text)],
                    ),
                ),
                metadata=user.md,
                timeout=CALL_DEADLINE_S,
            ).message.name
        )

    def messages(self, user: User, conversation: str) -> list[context_pb2.Message]:
        return list(
            self.context.ListMessages(
                context_pb2.ListMessagesRequest(parent=conversation, page_size=100),
                metadata=user.md,
                timeout=CALL_DEADLINE_S,
            ).messages
        )

    def run(self, user: User, name: str) -> dispatcher_pb2.Run:
        run: dispatcher_pb2.Run = self.dispatcher.GetRun(
            dispatcher_pb2.GetRunRequest(name=name), metadata=user.md, timeout=CALL_DEADLINE_S
        ).run
        return run

    def sessions(self, user: User) -> dict[str, auth_pb2.Session]:
        listed = self.auth.ListSessions(
            auth_pb2.ListSessionsRequest(show_inactive=True, page_size=100),
            metadata=user.md,
            timeout=CALL_DEADLINE_S,
        )
        return {s.name: s for s in listed.sessions}

    def events_after(
        self, user: User, scopes: list[events_pb2.Scope], after: str
    ) -> list[events_pb2.Event]:
        found: list[events_pb2.Event] = []
        token = ""
        while True:
            page = self.events.ListEvents(
                events_pb2.ListEventsRequest(
                    scopes=scopes, after_cursor=after, page_size=500, page_token=token
                ),
                metadata=user.md,
                timeout=CALL_DEADLINE_S,
            )
            found += page.events
            token = page.next_page_token
            if not token:
                return found

    def close(self) -> None:
        self.channel.close()


@pytest.fixture
def server(stack: Stack) -> Iterator[Server]:
    client = Server(stack.address)
    yield client
    client.close()


def text_of(message: context_pb2.Message) -> str:
    return "".join(part.text for part in message.parts)


def grpc_web_calls(network: list[dict[str, Any]], origin: str) -> list[dict[str, Any]]:
    return [n for n in network if n["url"].startswith(f"{origin}/switchboard.api.")]


def method(entry: dict[str, Any]) -> str:
    return str(entry["url"]).rsplit("/", 1)[1]


# -- The tests -------------------------------------------------------------------------------


def test_the_console_type_checks_in_strict_mode(stack: Stack) -> None:
    """``tsc --noEmit`` over clients/web (strict, noUncheckedIndexedAccess), generated
    code included; started with the stack, so it costs no extra time."""
    output, _ = stack.typecheck.communicate(timeout=180)
    assert stack.typecheck.returncode == 0, output
    config = json.loads((WEB / "tsconfig.json").read_text())
    assert config["compilerOptions"]["strict"] is True


def test_envoy_serves_the_console_itself_with_its_headers(stack: Stack) -> None:
    """What Envoy runs (its /config_dump) and answers: each file of the build, as built,
    with its type and the security headers; nothing but reads, and nothing else."""
    dump = stack.envoy.config_dump()
    [listeners] = [c for c in dump["configs"] if c["@type"].endswith("ListenersConfigDump")]
    files = {
        "/" if p.name == "index.html" else f"/{p.name}": p for p in stack.console_dir.iterdir()
    }
    for item in listeners["static_listeners"]:
        [chain] = item["listener"]["filter_chains"]
        [manager] = chain["filters"]
        routes = manager["typed_config"]["route_config"]
        largest = max(p.stat().st_size for p in files.values())
        assert largest <= routes["max_direct_response_body_size_bytes"] <= MAX_CONSOLE_FILE_BYTES
        [host] = routes["virtual_hosts"]
        direct = {r["match"]["path"]: r for r in host["routes"] if "direct_response" in r}
        assert set(direct) == {*files, "/index.html"}
        for path, route in direct.items():
            [method] = route["match"]["headers"]
            assert method["name"] == ":method"
            assert method["string_match"]["safe_regex"]["regex"] == "GET|HEAD"
            body = route["direct_response"]["body"]["filename"]
            assert Path(body) == files.get(path, files["/"])
            headers = {
                h["header"]["key"]: h["header"]["value"] for h in route["response_headers_to_add"]
            }
            assert headers["content-security-policy"] == CONSOLE_CSP
    # Answered by Envoy itself, byte for byte what was built.
    trust = ssl.create_default_context(cafile=str(stack.envoy.cert_file))
    with httpx.Client(verify=trust, http2=True, trust_env=False) as client:
        base = f"https://localhost:{stack.envoy.tls_port}"
        for path, file in files.items():
            answer = client.get(base + path)
            assert answer.status_code == 200, path
            assert answer.http_version == "HTTP/2"
            assert answer.content == file.read_bytes()
            assert answer.headers["content-type"] == CONSOLE_TYPES[file.suffix]
            for key, value in CONSOLE_HEADERS:
                assert answer.headers[key] == value
        assert client.get(f"{base}/?next=1").content == files["/"].read_bytes()
        head = client.head(base + "/app.js")
        assert head.status_code == 200
        assert head.content == b""
        assert client.post(base + "/", content=b"x").status_code == 404
        assert client.get(base + "/app.ts").status_code == 404


def test_a_full_session_from_register_to_a_streamed_answer_a_cancel_and_sign_out(
    stack: Stack, chromium: Chromium, server: Server, tmp_path: Path
) -> None:
    email = unique_email("console")
    workspace_id = f"acme-{os.getpid()}"
    with chromium.open(stack.origin + "/") as browser:
        # A refusal is shown as the server gave it: code, reason, the field at fault.
        browser.wait_visible(tid("auth"))
        browser.fill(tid("email"), email)
        browser.fill(tid("password"), "short")
        browser.click(tid("register"))
        browser.wait_for(tid("auth-problem"))
        refused = browser.data(tid("auth-problem"))
        assert refused["code"] == "INVALID_ARGUMENT"
        assert refused["reason"] == "ERROR_REASON_INVALID_ARGUMENT"
        assert browser.data(tid("auth-problem-violation"))["field"] == "password"
        # Signed out there is no feed: no connection badge to say "offline".
        assert not browser.visible(tid("connection"))
        session = sign_in(browser, email, register=True)
        # The first sign-in: no workspaces, and the page says what to do first; the
        # workspace id's rule is written beside the field, in the server's words, and the
        # field checks that very rule.
        browser.wait_visible(tid("empty-hint"))
        assert browser.visible(tid("workspace-id-format"))
        hint = browser.eval(
            "(s) => document.querySelector(s).textContent", tid("workspace-id-format")
        )
        assert names.WORKSPACE_ID_RULE.words in hint
        rule = names.WORKSPACE_ID_RULE
        assert id_field(browser, tid("new-workspace-id"), rule) == id_rule_seen(rule)

        # A workspace and a conversation, made on the page.
        browser.fill(tid("new-workspace-id"), workspace_id)
        browser.fill(tid("new-workspace-name"), "Acme")
        browser.click(tid("create-workspace"))
        workspace = f"workspaces/{workspace_id}"
        browser.wait_for(f"{tid('workspace-item', name=workspace)}.current")
        browser.fill(tid("new-conversation-title"), "Launch")
        browser.click(tid("create-conversation"))
        browser.wait_visible(tid("composer"))
        conversation = current(browser, "conversation-item")
        assert conversation.startswith(f"{workspace}/conversations/")

        # Handler parameters must be a JSON object: said before anything is sent.
        send(browser, "never sent", parameters="[1, 2]", expect_run=False)
        browser.wait_for(tid("error", code="INVALID_ARGUMENT", action="send"))
        assert browser.data(tid("error-violation"))["field"] == "parameters"
        assert browser.count(tid("run")) == 0

        # An answer streamed delta by delta: each text the page showed, in order.
        words = "the quick brown fox jumps over the lazy dog"
        run = send(browser, words, handler="handlers/echo", parameters='{"delay_ms": 120}')
        watch_answer(browser, run)
        done = run_state(browser, run, "RUN_STATE_SUCCEEDED")
        shown = answers_shown(browser)
        user = server.login(email)
        stored = server.run(user, run)
        assert stored.state == dispatcher_pb2.RUN_STATE_SUCCEEDED
        [answer] = [
            m for m in server.messages(user, conversation) if m.name == stored.output_message
        ]
        assert done["answer"] == text_of(answer)
        assert done["answer"].startswith(words)
        assert int(done["deltas"]) >= len(words.split())
        # Half-written before whole: each text a beginning of the next, the last the answer.
        # The observer starts once the run is on the page, by when the first deltas may
        # already show; every word after that must have been shown on its own (two may
        # share a frame).
        assert shown, "no text was rendered after the run appeared"
        assert len(shown) >= len(words.split()) - len(shown[0].split()) + 1 - 2, shown
        assert all(b.startswith(a) and b != a for a, b in itertools.pairwise(shown)), shown
        assert shown[-1] == done["answer"]
        # The stored answer reached the message list through the live events, and it is
        # shown there only: the run's card keeps its state and no second copy.
        browser.wait_for(tid("message", name=stored.output_message, role="assistant"))
        browser.wait_for(tid("run", run=run, answer_in="messages"))
        assert not browser.visible(f"{tid('run', run=run)} {tid('run-answer')}")
        assert browser.count(tid("empty-hint")) == 0
        # An answer of one delta says so in the singular.
        single = send(browser, "once", handler="handlers/echo")
        one = run_state(browser, single, "RUN_STATE_SUCCEEDED")
        assert one["deltas"] == "1"
        meta = browser.eval(
            '(run) => document.querySelector(`[data-run="${run}"] [data-part="meta"]`).textContent',
            single,
        )
        assert meta.endswith("· 1 delta"), meta
        screenshot = artifacts_dir(tmp_path) / "console.png"
        browser.screenshot(screenshot)
        print(f"console screenshot: {screenshot}")
        assert screenshot.stat().st_size > 0

        # A slow run, cancelled from the page once it has started answering.
        slow = send(browser, "one two three four five six", parameters='{"delay_ms": 5000}')
        assert slow != run
        running(browser, slow, 1)
        browser.click(f"{tid('run', run=slow)} {tid('cancel-run')}")
        cancelled = run_state(browser, slow, "RUN_STATE_CANCELLED")
        assert cancelled["answer"].startswith("one")
        assert "six" not in cancelled["answer"]
        assert server.run(user, slow).state == dispatcher_pb2.RUN_STATE_CANCELLED

        # Sign out: the page forgets the session and the server revokes it.
        browser.click(tid("sign-out"))
        browser.wait_visible(tid("auth"))
        assert not browser.visible(tid("console"))
        assert browser.storage() == {}
        assert server.sessions(user)[session].HasField("revoke_time")

        # Everything came over one origin, HTTP/2 on the TLS listener, under the CSP.
        network = [n for n in browser.network() if n["url"].startswith(stack.origin)]
        documents = [n for n in network if n["type"] == "Document"]
        assert documents
        assert documents[0]["headers"]["content-security-policy"].startswith("default-src 'self'")
        types = {n["type"] for n in network}
        assert {"Document", "Script", "Stylesheet", "Fetch"} <= types
        assert {n["protocol"] for n in network} == {"h2"}, network
        calls = {method(n) for n in grpc_web_calls(network, stack.origin)}
        assert {"Register", "CreateWorkspace", "SendMessage", "WatchRun", "Subscribe"} <= calls
        assert {"CancelRun", "Logout"} <= calls
        assert problems(browser) == []


def _scope(**kind: str) -> events_pb2.Scope:
    return events_pb2.Scope(**kind)


def test_live_events_and_a_run_resume_after_the_connection_is_dropped(
    stack: Stack, chromium: Chromium, server: Server
) -> None:
    user = server.register("resume")
    workspace, conversation = server.workspace(user, f"resume-{os.getpid()}")
    with chromium.open(stack.origin + "/") as browser:
        sign_in(browser, user.email)
        open_conversation(browser, workspace, conversation)
        browser.wait_for(tid("connection", state="live"))
        # Live before the cut: a message written elsewhere shows up.
        before = server.append(user, conversation, "written before the cut")
        browser.wait_for(tid("message", name=before))

        # A run answering word by word, so the cut lands in the middle of it.
        words = " ".join(f"w{i}" for i in range(12))
        run = send(browser, words, handler="handlers/echo", parameters='{"delay_ms": 300}')
        running(browser, run, 2)

        # The network goes: every connection reset, new ones refused.
        assert stack.front.cut(refuse=True) >= 1
        browser.wait_for(tid("connection", state="reconnecting"))
        # Nothing arrives now, so the page's cursor is the one it must resume after.
        cursor = browser.data(tid("feed"))["cursor"]
        resumed_before = json.loads(browser.data(tid("feed"))["resumedFrom"])
        assert cursor
        # Written while the page cannot hear: it must arrive once the network is back.
        during = server.append(user, conversation, "written while the page was cut off")
        refused = stack.front.stats.refused
        deadline = time.monotonic() + 30
        while stack.front.stats.refused == refused:
            # The page keeps trying (with backoff) while it is refused.
            assert time.monotonic() < deadline, "the page never tried to reconnect"
            time.sleep(0.05)
        stack.front.restore()

        browser.wait_for(tid("message", name=during))
        browser.wait_for(tid("connection", state="live"))
        # Exactly once, in the messages and in the events.
        assert browser.count(tid("message", name=during)) == 1
        shown: list[dict[str, str]] = browser.eval(
            "() => [...document.querySelectorAll('[data-testid=\"event\"]')]"
            ".map((e) => ({ ...e.dataset, text: e.textContent }))"
        )
        ids = [e["id"] for e in shown]
        assert len(ids) == len(set(ids)), "an event was shown twice"
        assert len([e for e in shown if e["subject"] == during]) == 1
        feed = browser.data(tid("feed"))
        assert feed["duplicates"] == "0"
        # Every reopening since the cut resumed after the cursor the page had.
        resumed = json.loads(feed["resumedFrom"])[len(resumed_before) :]
        assert resumed
        assert set(resumed) == {cursor}, (resumed, cursor)
        history = browser.data(tid("connection"))["history"].split(",")
        after_cut = history[history.index("reconnecting") :]
        assert after_cut[-1] == "live"
        assert "stopped" not in after_cut
        # The run went on meanwhile; its watch resumed after its last sequence.
        done = run_state(browser, run, "RUN_STATE_SUCCEEDED")
        assert int(done["resumes"]) >= 1
        stored = server.run(user, run)
        [answer] = [
            m for m in server.messages(user, conversation) if m.name == stored.output_message
        ]
        assert done["answer"] == text_of(answer), "a word was lost or repeated"

        # Nothing lost: every event of the feed's scopes since it started reaches the page
        # (the run's last ones may still be on their way), and none of them twice.
        scopes = [_scope(user=user.name), _scope(workspace=workspace)]
        events = server.events_after(user, scopes, feed["firstCursor"])
        assert during in {e.message_created.message.name for e in events}
        assert run in {e.run_updated.update.run for e in events}
        logged = [e.id for e in events]
        browser.wait(
            "(ids) => { const shown = new Set([...document.querySelectorAll("
            "'[data-testid=\"event\"]')].map((e) => e.dataset.id));"
            " return ids.every((id) => shown.has(id)); }",
            logged,
        )
        ids = browser.eval(
            "() => [...document.querySelectorAll('[data-testid=\"event\"]')]"
            ".map((e) => e.dataset.id)"
        )
        assert len(ids) == len(set(ids)), "an event was shown twice"
        assert browser.data(tid("feed"))["duplicates"] == "0"
        assert stack.front.stats.cut >= 1
        assert problems(browser, outage=True) == []


def test_integrations_show_their_status_live_and_tool_calls_wait_for_approval(
    stack: Stack, chromium: Chromium, server: Server
) -> None:
    user = server.register("tools")
    workspace, conversation = server.workspace(user, f"tools-{os.getpid()}")
    with McpTestServer() as mcp:
        integration = server.integration.CreateIntegration(
            integration_pb2.CreateIntegrationRequest(
                parent=workspace,
                integration_id="kit",
                integration=integration_pb2.Integration(
                    display_name="Tool kit",
                    kind=integration_pb2.INTEGRATION_KIND_MCP_SERVER,
                    endpoint=mcp.url,
                ),
            ),
            metadata=user.md,
            timeout=CALL_DEADLINE_S,
        ).integration.name
        # The workspace's default assistant: the llm handler with the kit's echo tool,
        # whose every call needs a person's decision.
        server.dispatcher.CreateAssistant(
            dispatcher_pb2.CreateAssistantRequest(
                parent=workspace,
                assistant_id="helper",
                assistant=dispatcher_pb2.Assistant(
                    display_name="Helper",
                    instructions="Use the tools.",
                    tools=[
                        dispatcher_pb2.AssistantTools(
                            integration=integration,
                            tools=["echo"],
                            approval_required_tools=["echo"],
                        )
                    ],
                    workspace_default=True,
                ),
            ),
            metadata=user.md,
            timeout=CALL_DEADLINE_S,
        )
        with chromium.open(stack.origin + "/") as browser:
            sign_in(browser, user.email)
            open_conversation(browser, workspace, conversation)
            # Its status, as the hub's probes found it.
            healthy = tid(
                "integration",
                name=integration,
                health="HEALTH_STATE_HEALTHY",
                circuit="CIRCUIT_STATE_CLOSED",
            )
            browser.wait_for(healthy)
            status = server.integration.GetIntegration(
                integration_pb2.GetIntegrationRequest(name=integration),
                metadata=user.md,
                timeout=CALL_DEADLINE_S,
            ).integration.status
            assert status.health == integration_pb2.HEALTH_STATE_HEALTHY
            assert status.circuit == integration_pb2.CIRCUIT_STATE_CLOSED

            # Denied, with a reason the model is told.
            denied = send(browser, 'call kit__echo {"message": "first"}')
            pending = f"{tid('approval', run=denied)} {tid('pending-call')}"
            browser.wait_for(pending)
            assert browser.data(pending)["tool"] == "echo"
            browser.fill(f"{pending} {tid('deny-reason')}", "not this one")
            browser.click(f"{pending} {tid('deny')}")
            answer = run_state(browser, denied, "RUN_STATE_SUCCEEDED")["answer"]
            assert answer.startswith("Tool kit__echo returned:")
            assert "not this one" in answer
            [decided] = server.run(user, denied).required_action.tool_calls
            assert decided.decision == dispatcher_pb2.TOOL_APPROVAL_DECISION_DENY
            assert decided.reason == "not this one"
            assert decided.decided_by == user.name

            # Approved: the tool runs, its output goes back to the model.
            approved = send(browser, 'call kit__echo {"message": "second"}')
            pending = f"{tid('approval', run=approved)} {tid('pending-call')}"
            browser.wait_for(pending)
            browser.click(f"{pending} {tid('approve')}")
            done = run_state(browser, approved, "RUN_STATE_SUCCEEDED")
            assert done["answer"] == "Tool kit__echo returned: second"
            stored = server.run(user, approved)
            [decided] = stored.required_action.tool_calls
            assert decided.decision == dispatcher_pb2.TOOL_APPROVAL_DECISION_APPROVE
            assert browser.count(tid("approval")) == 0

            # The integration's server goes away: its status changes on the page by itself.
            mcp.kill()
            browser.wait_for(tid("integration", name=integration, health="HEALTH_STATE_UNHEALTHY"))
            status = server.integration.GetIntegration(
                integration_pb2.GetIntegrationRequest(name=integration),
                metadata=user.md,
                timeout=CALL_DEADLINE_S,
            ).integration.status
            assert status.health == integration_pb2.HEALTH_STATE_UNHEALTHY
            shown = browser.eval(
                "(s) => document.querySelector(s).querySelector("
                "'[data-testid=\"integration-error\"]')?.textContent",
                tid("integration", name=integration),
            )
            assert shown == status.last_error.message
            assert problems(browser) == []


def _slow_calls_started(server: Server, user: User, integration: str) -> list[str]:
    """The tags of the ``slow`` calls the MCP test server has received, in order."""
    answer = server.integration.InvokeTool(
        integration_pb2.InvokeToolRequest(name=f"{integration}/tools/stats"),
        metadata=user.md,
        timeout=CALL_DEADLINE_S,
    )
    return [tag.string_value for tag in answer.result.fields["started"].list_value.values]


def _until_paused(server: Server, user: User, run: str) -> None:
    """Return once ``run`` waits for a person (its WatchRun says REQUIRES_ACTION)."""
    for response in server.dispatcher.WatchRun(
        dispatcher_pb2.WatchRunRequest(name=run), metadata=user.md, timeout=60
    ):
        update = response.update
        if (
            response.WhichOneof("frame") == "update"
            and update.WhichOneof("update") == "state_change"
            and update.state_change.run.state == dispatcher_pb2.RUN_STATE_REQUIRES_ACTION
        ):
            return
    pytest.fail(f"{run} ended its watch without pausing")


def _approval_kit(
    server: Server, user: User, workspace: str, mcp: McpTestServer, *, title: str = "Helper"
) -> str:
    """An MCP integration ("kit") and the workspace's default assistant (``title``) with
    its echo tool, every call of which waits for a person's decision; the integration's
    name."""
    integration: str = server.integration.CreateIntegration(
        integration_pb2.CreateIntegrationRequest(
            parent=workspace,
            integration_id="kit",
            integration=integration_pb2.Integration(
                display_name="Tool kit",
                kind=integration_pb2.INTEGRATION_KIND_MCP_SERVER,
                endpoint=mcp.url,
            ),
        ),
        metadata=user.md,
        timeout=CALL_DEADLINE_S,
    ).integration.name
    server.dispatcher.CreateAssistant(
        dispatcher_pb2.CreateAssistantRequest(
            parent=workspace,
            assistant_id="helper",
            assistant=dispatcher_pb2.Assistant(
                display_name=title,
                instructions="Use the tools.",
                tools=[
                    dispatcher_pb2.AssistantTools(
                        integration=integration, tools=["echo"], approval_required_tools=["echo"]
                    )
                ],
                workspace_default=True,
            ),
        ),
        metadata=user.md,
        timeout=CALL_DEADLINE_S,
    )
    return integration


def test_a_paused_call_is_decided_in_one_place_and_its_arguments_read_as_the_model_reads_them(
    stack: Stack, chromium: Chromium, server: Server
) -> None:
    user = server.register("once")
    workspace, conversation = server.workspace(user, f"once-{os.getpid()}")
    # Keys a Struct (a map) carries in no order of its own, nested, and integer-like ones
    # that JSON.stringify would put first: the page shows them sorted, as the server reads
    # the call back to the model (shared/parttext.py), the same on every card.
    arguments = {
        "message": "hi",
        "zeta": 1,
        "alpha": {"b": 2, "a": 1},
        "mid": [3, {"y": 1, "x": 2}],
        "b": True,
        "a": None,
        "10": "ten",
        "2": "two",
    }
    compact = json.dumps(arguments, separators=(",", ":"), sort_keys=True)
    with McpTestServer() as mcp:
        _approval_kit(server, user, workspace, mcp)
        with chromium.open(stack.origin + "/") as browser:
            sign_in(browser, user.email)
            open_conversation(browser, workspace, conversation)
            run = send(browser, f"call kit__echo {json.dumps(arguments)}")
            pending = f"{tid('approval', run=run)} {tid('pending-call')}"
            browser.wait_for(pending)
            call_id = browser.data(pending)["callId"]
            entry = f"{tid('run', run=run)} {tid('timeline-entry', kind='tool-call')}"
            browser.wait_for(f"{entry} {tid('inspector-decide', call_id=call_id)}")
            assert browser.eval("(s) => document.querySelector(s).open", tid("inspector"))

            # One call waits: one Approve and one Deny on the whole page, in the approvals.
            buttons = browser.eval(
                "() => [...document.querySelectorAll('button')]"
                ".filter((b) => b.checkVisibility()).map((b) => b.textContent)"
            )
            assert buttons.count("Approve") == 1, buttons
            assert buttons.count("Deny") == 1, buttons
            assert browser.count(f"{pending} {tid('approve')}") == 1

            # The timeline's entry leads to it: the reason field takes the focus.
            browser.click(f"{entry} {tid('inspector-decide', call_id=call_id)}")
            browser.wait(
                "(s) => document.activeElement === document.querySelector(s)",
                f"{pending} {tid('deny-reason')}",
            )

            shown = browser.eval(
                "([pending, card, entry]) => ({"
                " approval: document.querySelector(pending + ' pre').textContent,"
                " card: document.querySelector(card).textContent,"
                " timeline: document.querySelector(entry + ' .detail').textContent })",
                [pending, f"{tid('run', run=run)} {tid('run-tool')} code", entry],
            )
            assert shown == {
                "approval": json.dumps(arguments, indent=2, sort_keys=True),
                "card": f"kit__echo({compact})",
                "timeline": f"kit__echo({compact})",
            }

            browser.fill(f"{pending} {tid('deny-reason')}", "not now")
            browser.click(f"{pending} {tid('deny')}")
            run_state(browser, run, "RUN_STATE_SUCCEEDED")
            assert browser.count(tid("approval")) == 0
            # The conversation's stored call reads the same.
            calls = browser.wait(
                "() => { const t = [...document.querySelectorAll("
                "'[data-testid=\"message-text\"]')].map((e) => e.textContent)"
                ".filter((t) => t.startsWith('→')); return t.length && t; }"
            )
            assert calls == [f"→ kit__echo({compact})"]
            assert problems(browser) == []


#: What a queued run's card says of the run ahead, and the text of each part of it.
QUEUED_NOTE_JS: Final = """(run) => {
  const note = document.querySelector(
    `[data-testid="run"][data-run="${run}"] [data-testid="queued-behind"]`);
  if (!note) return null;
  const part = (id) => note.querySelector(`[data-testid="${id}"]`);
  return { ...note.dataset, text: note.textContent, link: part('queued-behind-run').title,
    reason: part('queued-behind-reason')?.textContent ?? null,
    until: part('queued-behind-until')?.textContent ?? null };
}"""


def test_a_message_queued_behind_a_run_waiting_for_approval_says_what_it_waits_for(
    stack: Stack, chromium: Chromium, server: Server
) -> None:
    """Issue 79: a run waiting for a person's approval holds its conversation's next
    message QUEUED for up to the approval timeout. The queued run's card names the run
    ahead (a link to its card), says why and until when, within a phone's width even
    with a long unbroken assistant title, and the note goes when the run starts."""
    user = server.register("queued")
    workspace, conversation = server.workspace(user, f"queued-{os.getpid()}")
    title = "Helper" + "Withaverylongunbrokentitle" * 3
    with McpTestServer() as mcp:
        _approval_kit(server, user, workspace, mcp, title=title)
        with chromium.open(stack.origin + "/") as browser:
            sign_in(browser, user.email)
            open_conversation(browser, workspace, conversation)
            first = send(browser, 'call kit__echo {"message": "first"}')
            pending = f"{tid('approval', run=first)} {tid('pending-call')}"
            browser.wait_for(pending)

            second = send(browser, "and then this")
            assert second != first
            # Until the server's note for it came (the SendMessage answer may carry it, the
            # stream says it as it changes).
            note: dict[str, str] = browser.wait(
                f"([run, ahead]) => {{ const n = ({QUEUED_NOTE_JS})(run);"
                " return n && n.run === ahead && n.reason && n; }",
                [second, first],
            )
            behind = server.run(user, second).queued_behind
            assert server.run(user, second).state == dispatcher_pb2.RUN_STATE_QUEUED
            assert behind.run == first
            assert behind.state == dispatcher_pb2.RUN_STATE_REQUIRES_ACTION
            assert behind.reason == "waiting for a person's approval of 1 tool call"
            assert behind.ahead == 1
            # In milliseconds as the page's Date has it (bufbuild's timestampDate rounds).
            expire = behind.expire_time
            expires_ms = expire.seconds * 1000 + (expire.nanos + 500_000) // 1_000_000
            assert expires_ms > 0
            until = browser.eval(
                "(ms) => new Date(ms).toLocaleTimeString([],"
                " { hour: '2-digit', minute: '2-digit', second: '2-digit' })",
                expires_ms,
            )
            assert note["state"] == "RUN_STATE_REQUIRES_ACTION"
            assert note["ahead"] == "1"
            assert note["link"] == first
            expires = datetime.fromtimestamp(expires_ms // 1000, UTC).replace(
                microsecond=expires_ms % 1000 * 1000
            )
            assert note["expireTime"] == expires.isoformat(timespec="milliseconds").replace(
                "+00:00", "Z"
            )
            assert note["reason"] == behind.reason
            assert note["until"] == f" (until {until})"
            assert note["text"] == (
                f"Waiting behind run {first.rsplit('/', 1)[1][:8]} ({title}):"
                f" {behind.reason} (until {until})."
            )
            # The run ahead is a run of the same conversation: its card is on the page.
            assert browser.count(tid("run", run=first)) == 1
            # Said on the queued run's timeline too, as its stream told it.
            browser.wait_for(
                f"{tid('run', run=second)} {tid('timeline-entry', kind='queued', call_id=first)}"
            )

            # A phone's width: the long title breaks where it must, nothing reaches out.
            browser.viewport(PHONE_WIDTH, 900)
            browser.wait_stacked()
            assert overflowing(browser, tid("queued-behind")) == []
            assert overflowing(browser, tid("run", run=second)) == []
            browser.viewport(DESKTOP_WIDTH, 900)

            # Approved: the first run goes on and ends, the second starts (its note gone)
            # and answers.
            browser.click(f"{pending} {tid('approve')}")
            browser.call(
                "wait",
                fn="(run) => document.querySelector("
                '`[data-testid="run"][data-run="${run}"]`)?.dataset.state'
                " === 'RUN_STATE_SUCCEEDED'",
                arg=second,
                # The second run starts only after the first has ended, on a machine that
                # may be busy: more time than one page condition gets.
                timeoutMs=55_000,
            )
            assert run_state(browser, first, "RUN_STATE_SUCCEEDED")["answer"] == (
                "Tool kit__echo returned: first"
            )
            done = run_state(browser, second, "RUN_STATE_SUCCEEDED")
            assert done["answer"] == "and then this"
            assert browser.count(f"{tid('run', run=second)} {tid('queued-behind')}") == 0
            stored = server.run(user, second)
            assert not stored.HasField("queued_behind")
            assert problems(browser) == []


def test_a_call_in_flight_at_a_crash_is_decided_on_the_page(
    stack: Stack, chromium: Chromium, server: Server
) -> None:
    """Three runs, in three conversations, each call a slow MCP tool whose integration is
    not marked retry-safe; the server is killed (SIGKILL) once the tool server has every
    call, and started again as the same instance. Each run resumes from its journal and
    pauses at its call, whose outcome is unknown. The page explains that and offers Retry,
    Mark done and Fail run, never Approve or Deny: Mark done stays disabled until a result
    is typed, and the model is given that result; Retry sends the call again (the tool
    server sees it a second time); Fail run ends the run FAILED with TOOL_OUTCOME_UNKNOWN.
    The server stored each decision as the page sent it."""
    user = server.register("unknown")
    workspace, first = server.workspace(user, f"unknown-{os.getpid()}")
    conversations = [first] + [
        server.context.CreateConversation(
            context_pb2.CreateConversationRequest(
                parent=workspace, conversation=context_pb2.Conversation(title=title)
            ),
            metadata=user.md,
            timeout=CALL_DEADLINE_S,
        ).conversation.name
        for title in ("Retried", "Failed")
    ]
    with McpTestServer() as mcp:
        # retry_safe left false: a call in flight at a crash waits for a person.
        integration = server.integration.CreateIntegration(
            integration_pb2.CreateIntegrationRequest(
                parent=workspace,
                integration_id="booking",
                integration=integration_pb2.Integration(
                    display_name="Bookings",
                    kind=integration_pb2.INTEGRATION_KIND_MCP_SERVER,
                    endpoint=mcp.url,
                ),
            ),
            metadata=user.md,
            timeout=CALL_DEADLINE_S,
        ).integration
        assert not integration.retry_safe
        server.dispatcher.CreateAssistant(
            dispatcher_pb2.CreateAssistantRequest(
                parent=workspace,
                assistant_id="booker",
                assistant=dispatcher_pb2.Assistant(
                    display_name="Booker",
                    tools=[
                        dispatcher_pb2.AssistantTools(integration=integration.name, tools=["slow"])
                    ],
                    workspace_default=True,
                ),
            ),
            metadata=user.md,
            timeout=CALL_DEADLINE_S,
        )
        tags = ["done", "retried", "failed"]
        runs = [
            server.dispatcher.SendMessage(
                dispatcher_pb2.SendMessageRequest(
                    conversation=conversation,
                    message=context_pb2.Message(
                        parts=[
                            context_pb2.ContentPart(
                                text=f'call booking__slow {{"seconds": 8, "tag": "{tag}"}}'
                            )
                        ]
                    ),
                ),
                metadata=user.md,
                timeout=CALL_DEADLINE_S,
            ).run.name
            for conversation, tag in zip(conversations, tags, strict=True)
        ]
        # A call is journaled as sent before it goes out: once the tool server has all
        # three, each is in flight with no result.
        deadline = time.monotonic() + 60
        while sorted(_slow_calls_started(server, user, integration.name)) != sorted(tags):
            assert time.monotonic() < deadline, _slow_calls_started(server, user, integration.name)
            time.sleep(0.05)  # polling the tool server: it has no way to announce a call
        stack.crash_server()
        # Every run paused before the page opens: one still pausing would redraw the
        # approvals while the test reads them.
        for run in runs:
            _until_paused(server, user, run)

        with chromium.open(stack.origin + "/") as browser:
            sign_in(browser, user.email)
            done, retried, failed = runs

            # Mark done: the result is required, and is what the model is given.
            open_conversation(browser, workspace, conversations[0])
            pending = f"{tid('approval', run=done)} {tid('pending-call', outcome_unknown='true')}"
            browser.wait_for(pending)
            shown = browser.eval("(s) => document.querySelector(s)?.textContent ?? ''", pending)
            assert "in flight when the server stopped" in shown
            assert "may or may not have happened" in shown
            assert browser.count(f"{tid('approval', run=done)} {tid('approve')}") == 0
            assert browser.count(f"{tid('approval', run=done)} {tid('deny')}") == 0
            badge = f"{tid('run', run=done)} {tid('run-state')}"
            assert browser.eval("(s) => document.querySelector(s).textContent", badge) == (
                "waiting for a decision (outcome unknown)"
            )
            complete = f"{pending} {tid('outcome-complete')}"
            disabled = "(s) => document.querySelector(s).disabled"
            assert browser.eval(disabled, complete) is True
            browser.fill(f"{pending} {tid('outcome-result')}", "   ")
            assert browser.eval(disabled, complete) is True
            assert (
                browser.eval(
                    "(s) => document.querySelector(s).maxLength",
                    f"{pending} {tid('outcome-result')}",
                )
                == 16_000
            )
            browser.fill(f"{pending} {tid('outcome-result')}", "booked: reference 42")
            assert browser.eval(disabled, complete) is False
            browser.click(complete)
            answer = run_state(browser, done, "RUN_STATE_SUCCEEDED")["answer"]
            assert answer == "Tool booking__slow returned: booked: reference 42"
            [decided] = server.run(user, done).required_action.tool_calls
            assert decided.outcome_unknown
            assert decided.decision == dispatcher_pb2.TOOL_APPROVAL_DECISION_COMPLETE
            assert decided.result_text == "booked: reference 42"
            assert decided.decided_by == user.name
            [entry] = [e for e in timeline(browser, done) if e["kind"] == "approval"]
            assert entry["decision"] == "TOOL_APPROVAL_DECISION_COMPLETE"
            assert "outcome unknown: marked done" in entry["text"]
            assert "booked: reference 42" in entry["text"]
            assert browser.count(tid("approval", run=done)) == 0

            # Retry: the same call sent again.
            open_conversation(browser, workspace, conversations[1])
            pending = (
                f"{tid('approval', run=retried)} {tid('pending-call', outcome_unknown='true')}"
            )
            browser.wait_for(pending)
            browser.click(f"{pending} {tid('outcome-retry')}")
            answer = run_state(browser, retried, "RUN_STATE_SUCCEEDED")["answer"]
            assert answer == "Tool booking__slow returned: slow retried done"
            [decided] = server.run(user, retried).required_action.tool_calls
            assert decided.decision == dispatcher_pb2.TOOL_APPROVAL_DECISION_RETRY
            assert _slow_calls_started(server, user, integration.name).count("retried") == 2

            # Fail run: it ends FAILED, the call not sent again.
            open_conversation(browser, workspace, conversations[2])
            pending = f"{tid('approval', run=failed)} {tid('pending-call', outcome_unknown='true')}"
            browser.wait_for(pending)
            browser.click(f"{pending} {tid('outcome-fail-run')}")
            run_state(browser, failed, "RUN_STATE_FAILED")
            stored = server.run(user, failed)
            [decided] = stored.required_action.tool_calls
            assert decided.decision == dispatcher_pb2.TOOL_APPROVAL_DECISION_FAIL_RUN
            info = error_details_pb2.ErrorInfo()
            assert any(d.Unpack(info) for d in stored.error.details)
            assert info.reason == "ERROR_REASON_TOOL_OUTCOME_UNKNOWN"
            browser.wait_for(f"{tid('run', run=failed)} {tid('run-error')}")
            assert _slow_calls_started(server, user, integration.name).count("failed") == 1
            assert raw_text(browser) == []
            assert problems(browser) == []


@contextmanager
def _reference_mcp() -> Iterator[str]:
    """The reference MCP server (server-everything, tests/mcp) over streamable HTTP, bound to
    loopback by tests/mcp/loopback.mjs as docs/integration.md starts it; its URL."""
    main = "node_modules/@modelcontextprotocol/server-everything/dist/index.js"
    packages = ROOT / "tests" / "mcp"
    if not (packages / main).is_file():
        pytest.fail("server-everything is not installed; run `make tools`")
    with ExitStack() as cleanup:
        for _ in range(3):
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                port = probe.getsockname()[1]
            log = cleanup.enter_context(tempfile.TemporaryFile("w+"))
            proc = subprocess.Popen(
                ["node", "--import", "./loopback.mjs", main, "streamableHttp"],
                cwd=packages,
                env={**os.environ, "PORT": str(port)},
                stdout=subprocess.DEVNULL,
                stderr=log,
            )
            cleanup.callback(_stop, proc)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and proc.poll() is None:
                log.seek(0)
                if f"listening on port {port}" in log.read():
                    yield f"http://127.0.0.1:{port}/mcp"
                    return
                time.sleep(0.05)  # polling its log: it says nothing else when it is ready
            _stop(proc)
        pytest.fail("the MCP reference server did not start")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=CALL_DEADLINE_S)


@contextmanager
def _webhook_receiver() -> Iterator[WebhookReceiver]:
    """tests/infra/webhookreceiver.py's receiver (it verifies every signature), served by an
    event loop of its own beside the synchronous test."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    receiver = WebhookReceiver()
    try:
        asyncio.run_coroutine_threadsafe(receiver.start(), loop).result(timeout=30)
        yield receiver
    finally:
        asyncio.run_coroutine_threadsafe(receiver.close(), loop).result(timeout=30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=CALL_DEADLINE_S)
        loop.close()


def timeline(browser: Page, run: str) -> list[dict[str, str]]:
    """The run inspector's entries, as the page shows them (data-* and text)."""
    entries: list[dict[str, str]] = browser.eval(
        "(run) => [...document.querySelectorAll("
        '`[data-run="${run}"] [data-testid="timeline-entry"]`)]'
        ".map((e) => ({ ...e.dataset, text: e.textContent }))",
        run,
    )
    return entries


def test_from_an_empty_workspace_to_a_tool_using_assistant_with_approvals(
    stack: Stack, chromium: Chromium, server: Server, tmp_path: Path
) -> None:
    """The studio flow in the browser: register the reference MCP server, list its tools
    and invoke one from its schema's form, create an assistant enabling get-sum with
    approval for echo (the workspace default), try it in a new conversation, approve the
    echo call in the run inspector and see the answer and the timeline; an etag conflict
    shown as such; a viewer sees no management controls, and a forced call is refused
    with PERMISSION_DENIED on the page. A screenshot of each screen."""
    shots = artifacts_dir(tmp_path) / "studio"
    shots.mkdir(parents=True, exist_ok=True)
    owner = server.register("studio")
    viewer = server.register("viewer")
    workspace = server.context.CreateWorkspace(
        context_pb2.CreateWorkspaceRequest(
            workspace_id=f"studio-{os.getpid()}",
            workspace=context_pb2.Workspace(display_name="Studio"),
        ),
        metadata=owner.md,
        timeout=CALL_DEADLINE_S,
    ).workspace.name
    server.context.AddWorkspaceMember(
        context_pb2.AddWorkspaceMemberRequest(
            parent=workspace, user=viewer.name, role=context_pb2.WORKSPACE_ROLE_VIEWER
        ),
        metadata=owner.md,
        timeout=CALL_DEADLINE_S,
    )
    with _reference_mcp() as mcp_url, _webhook_receiver() as receiver:
        with chromium.open(stack.origin + "/") as browser:
            sign_in(browser, owner.email)
            browser.click(tid("workspace-item", name=workspace))
            browser.wait_visible(tid("assistants-empty"))
            browser.wait_visible(tid("integrations-empty"))
            assert raw_text(browser) == []
            browser.shots(shots / "01-empty-workspace.png")

            # Register the reference MCP server, with a (write-only) credential. Its id's
            # rule is said beside it and checked as the server checks it.
            browser.click(f"{tid('register-integration')} > summary")
            rule = names.CLIENT_ID_RULE
            assert id_field(browser, tid("integration-id"), rule) == id_rule_seen(rule)
            hint = browser.eval(
                "(s) => document.querySelector(s).textContent", tid("integration-id-format")
            )
            assert rule.words in hint
            browser.select(tid("integration-kind"), "2")  # INTEGRATION_KIND_MCP_SERVER
            browser.fill(tid("integration-id"), "ref")
            browser.fill(tid("integration-name"), "Reference")
            browser.fill(tid("integration-endpoint"), mcp_url)
            browser.fill(tid("integration-credential"), "s3cret-token")
            browser.click(tid("create-integration"))
            integration = f"{workspace}/integrations/ref"
            browser.wait_for(tid("integration", name=integration, health="HEALTH_STATE_HEALTHY"))
            assert (
                browser.eval(
                    "(s) => document.querySelector(s).value", tid("integration-credential")
                )
                == ""
            )
            stored = server.integration.GetIntegration(
                integration_pb2.GetIntegrationRequest(name=integration),
                metadata=owner.md,
                timeout=CALL_DEADLINE_S,
            ).integration
            assert stored.endpoint == mcp_url
            assert stored.has_credential
            assert stored.credential == ""

            # A webhook for the workspace's messages, its signing secret write-only too.
            secret = "whsec_" + base64.b64encode(os.urandom(32)).decode()
            hooks = receiver.endpoint("console", [secret])
            # Registered, the form folded away: opened again for the next one.
            assert not browser.visible(tid("integration-endpoint"))
            browser.click(f"{tid('register-integration')} > summary")
            browser.select(tid("integration-kind"), "3")  # INTEGRATION_KIND_WEBHOOK
            browser.fill(tid("integration-id"), "hooks")
            browser.fill(tid("integration-name"), "Hooks")
            browser.fill(tid("integration-endpoint"), receiver.url("console"))
            browser.fill(tid("integration-credential"), secret)
            browser.click(tid("event-type", type="MESSAGE_CREATED"))
            browser.click(tid("create-integration"))
            webhook = f"{workspace}/integrations/hooks"
            browser.wait_for(tid("integration", name=webhook))

            # Its tools, and get-sum invoked from the form its input schema generates.
            item = tid("integration", name=integration)
            browser.click(f"{item} {tid('integration-tools')}")
            get_sum = f"{item} {tid('tool', tool='get-sum')}"
            browser.wait_for(get_sum)
            assert browser.count(f"{item} {tid('tool', tool='echo')}") == 1
            # A line per tool until one is opened: a dozen tools do not make the page a
            # scroll of descriptions.
            listed = browser.count(f"{item} {tid('tool')}")
            assert listed >= 10
            assert browser.count(f"{item} {tid('tool-try')}[open]") == 0
            assert not browser.visible(f"{get_sum} {tid('tool-description')}")
            height = browser.eval(
                "(s) => document.querySelector(s).getBoundingClientRect().height",
                f"{item} {tid('tools')}",
            )
            assert height <= 32 * listed, height
            assert browser.eval("() => document.documentElement.scrollHeight") <= 1500
            browser.click(f"{get_sum} {tid('tool-try')} > summary")
            browser.wait_visible(f"{get_sum} {tid('tool-description')}")
            # A required field left empty is refused on the page, as the server would.
            browser.fill(f"{get_sum} {tid('tool-arg', field='a')}", "2")
            browser.click(f"{get_sum} {tid('invoke-tool')}")
            browser.wait_for(f"{get_sum} {tid('tool-problem', code='INVALID_ARGUMENT')}")
            assert (
                browser.data(f"{get_sum} {tid('tool-problem-violation')}")["field"] == "arguments.b"
            )
            browser.fill(f"{get_sum} {tid('tool-arg', field='b')}", "3")
            browser.click(f"{get_sum} {tid('invoke-tool')}")
            browser.wait_for(f"{get_sum} {tid('tool-result', error='false')}")
            result = browser.eval(
                "(s) => document.querySelector(s).textContent",
                f"{get_sum} {tid('tool-result-text')}",
            )
            assert "5" in result, result
            assert raw_text(browser) == []
            browser.shots(shots / "02-integration-tools.png")

            # An assistant enabling get-sum and echo, echo only with a person's approval.
            browser.click(tid("new-assistant"))
            rule = names.CLIENT_ID_RULE
            assert id_field(browser, tid("assistant-id"), rule) == id_rule_seen(rule)
            browser.fill(tid("assistant-id"), "helper")
            browser.fill(tid("assistant-name"), "Helper")
            browser.fill(tid("assistant-instructions"), "Use the tools.")
            tools = tid("assistant-integration", integration=integration)
            browser.wait_for(f"{tools} {tid('assistant-tool', tool='echo')}")
            browser.click(f"{tools} {tid('assistant-tool', tool='get-sum')} {tid('tool-enabled')}")
            browser.click(f"{tools} {tid('assistant-tool', tool='echo')} {tid('tool-enabled')}")
            browser.click(f"{tools} {tid('assistant-tool', tool='echo')} {tid('tool-approval')}")
            browser.click(tid("assistant-default-input"))
            browser.click(tid("save-assistant"))
            assistant = f"{workspace}/assistants/helper"
            browser.wait_for(tid("assistant", name=assistant, default="true"))
            assert raw_text(browser) == []
            browser.shots(shots / "03-assistant-editor.png")
            made = server.dispatcher.GetAssistant(
                dispatcher_pb2.GetAssistantRequest(name=assistant),
                metadata=owner.md,
                timeout=CALL_DEADLINE_S,
            ).assistant
            assert made.workspace_default
            [binding] = made.tools
            assert binding.integration == integration
            assert sorted(binding.tools) == ["echo", "get-sum"]
            assert list(binding.approval_required_tools) == ["echo"]

            # Changed elsewhere meanwhile: the page's save is refused for its etag, and says so.
            server.dispatcher.UpdateAssistant(
                dispatcher_pb2.UpdateAssistantRequest(
                    assistant=dispatcher_pb2.Assistant(name=assistant, description="by a script"),
                    update_mask=field_mask_pb2.FieldMask(paths=["description"]),
                ),
                metadata=owner.md,
                timeout=CALL_DEADLINE_S,
            )
            browser.fill(tid("assistant-name"), "Helper 2")
            browser.click(tid("save-assistant"))
            browser.wait_for(f"{tid('assistant-editor')} {tid('error', code='ABORTED')}")
            conflict = browser.data(f"{tid('assistant-editor')} {tid('error')}")
            assert conflict["reason"] == "ERROR_REASON_ETAG_MISMATCH"
            assert browser.visible(tid("etag-conflict"))
            browser.click(tid("reload-assistant"))
            browser.wait(
                "(s) => document.querySelector(s).value === 'Helper'", tid("assistant-name")
            )

            # Try it: the editor closes (what was saved is what is tried) and the person is
            # taken to a new conversation, the assistant chosen, the cursor in the composer.
            browser.click(f"{tid('assistant', name=assistant)} {tid('try-assistant')}")
            browser.wait_visible(tid("composer"))
            assert not browser.visible(tid("assistant-editor"))
            browser.wait(
                "(s) => document.activeElement === document.querySelector(s)", tid("message-input")
            )
            browser.wait(
                "([s, a]) => document.querySelector(s).value === a",
                [tid("assistant-select"), assistant],
            )
            conversation = current(browser, "conversation-item")
            assert conversation.startswith(f"{workspace}/conversations/")

            # A sum needs no decision; the echo call waits for one, given in the inspector.
            summed = send(browser, 'call ref__get-sum {"a": 2, "b": 40}')
            done = run_state(browser, summed, "RUN_STATE_SUCCEEDED")
            assert "42" in done["answer"], done
            run = send(browser, 'call ref__echo {"message": "hello"}')
            approve = f"{tid('approval', run=run)} {tid('approve')}"
            browser.wait_visible(approve)
            browser.screenshot(shots / "04-run-waiting-for-approval.png")
            # A reload: the inspector comes back with what it had and resumes WatchRun
            # after the last sequence it saw, so nothing is shown twice.
            before = timeline(browser, run)
            last = max(int(e["sequence"]) for e in before)
            browser.reload()
            browser.wait_visible(approve)
            again = browser.wait(
                "(s) => { const c = document.querySelector(s);"
                " return c?.dataset.watchedAfter && { ...c.dataset }; }",
                tid("run", run=run),
            )
            assert again["restored"] == "true"
            assert again["watchedAfter"] == str(last)
            assert [e["sequence"] for e in timeline(browser, run)] == [
                e["sequence"] for e in before
            ]
            browser.click(approve)
            done = run_state(browser, run, "RUN_STATE_SUCCEEDED")
            assert done["answer"] == "Tool ref__echo returned: Echo: hello", done
            stored_run = server.run(owner, run)
            [decided] = stored_run.required_action.tool_calls
            assert decided.decision == dispatcher_pb2.TOOL_APPROVAL_DECISION_APPROVE
            assert decided.decided_by == owner.name
            # The timeline, live and complete: state changes, the call, who approved it, its
            # result with its duration, the answer's text, usage and cost.
            browser.wait(
                '(run) => [...document.querySelectorAll(`[data-run="${run}"] '
                "[data-testid=\"timeline-entry\"]`)].some((e) => e.dataset.kind === 'usage')",
                run,
            )
            entries = timeline(browser, run)
            kinds = [e["kind"] for e in entries]
            for kind in ("state", "tool-call", "approval", "tool-result", "text", "usage"):
                assert kind in kinds, kinds
            assert kinds.index("tool-call") < kinds.index("approval") < kinds.index("tool-result")
            [approval] = [e for e in entries if e["kind"] == "approval"]
            assert approval["by"] == owner.name
            assert owner.email in approval["text"]
            [result_entry] = [e for e in entries if e["kind"] == "tool-result"]
            assert result_entry["outcome"] == "TOOL_OUTCOME_SUCCEEDED"
            assert int(result_entry["ms"]) >= 0
            states = [e for e in entries if e["kind"] == "state"]
            [waited] = [e for e in states if e["state"] == "RUN_STATE_REQUIRES_ACTION"]
            assert "waiting for approval" in waited["text"]
            assert states[-1]["state"] == "RUN_STATE_SUCCEEDED"
            assert "succeeded" in states[-1]["text"]
            sequences = [int(e["sequence"]) for e in entries]
            assert sequences == sorted(sequences)
            usage = browser.data(f"{tid('run', run=run)} {tid('run-usage')}")
            assert int(usage["inputTokens"]) > 0
            assert float(usage["costUsd"]) > 0
            assert stored_run.usage.estimated_cost_usd == pytest.approx(float(usage["costUsd"]))
            assert raw_text(browser) == []
            browser.shots(shots / "05-run-inspector.png")
            # The sum, finished before the reload, is inspected on demand: its updates
            # replayed from the start.
            browser.click(tid("inspect-run", run=summed))
            run_state(browser, summed, "RUN_STATE_SUCCEEDED")
            replayed = [e["kind"] for e in timeline(browser, summed)]
            for kind in ("state", "tool-call", "tool-result", "text"):
                assert kind in replayed, replayed

            # Readable events: titles, not resource names, and a link to what each is about.
            browser.select(tid("event-filter"), "EVENT_TYPE_MESSAGE_CREATED")
            summaries: list[str] = browser.eval(
                "() => [...document.querySelectorAll('[data-testid=\"event\"]')]"
                ".filter((e) => !e.hidden).map((e) => e.textContent)"
            )
            assert summaries
            types = browser.eval(
                "() => [...document.querySelectorAll('[data-testid=\"event\"]')]"
                ".filter((e) => !e.hidden).map((e) => e.dataset.type)"
            )
            assert set(types) == {"EVENT_TYPE_MESSAGE_CREATED"}, types
            assert all(" message" in t for t in summaries), summaries
            assert all("workspaces/" not in t for t in summaries), summaries
            # The conversation by its title, linked by its name.
            assert any("Trying Helper" in t for t in summaries), summaries
            links = browser.eval(
                "() => [...document.querySelectorAll('[data-testid=\"event\"]')]"
                ".filter((e) => !e.hidden).map((e) => e.querySelector('a').getAttribute('href'))"
            )
            assert f"#{conversation}" in links, links
            assert raw_text(browser) == []
            browser.screenshot(shots / "06-readable-events.png")

            # The webhook's deliveries (the receiver verified each), one sent again.
            deadline = time.monotonic() + 30
            while len(hooks.first_ids()) < 4:  # the two conversations' messages, at least
                assert time.monotonic() < deadline, "the webhook got no deliveries"
                time.sleep(0.05)  # polling the receiver, which says nothing by itself
            browser.click(f"{tid('integration', name=webhook)} {tid('integration-deliveries')}")
            browser.wait_for(f"{tid('delivery', state='DELIVERY_STATE_SUCCEEDED')}")
            first = browser.data(tid("delivery", state="DELIVERY_STATE_SUCCEEDED"))
            delivered = server.integration.ListWebhookDeliveries(
                integration_pb2.ListWebhookDeliveriesRequest(parent=webhook, page_size=100),
                metadata=owner.md,
                timeout=CALL_DEADLINE_S,
            ).deliveries
            [chosen] = [d for d in delivered if d.name == first["name"]]
            assert hooks.attempts[chosen.event_id] == 1
            browser.click(f"{tid('delivery', name=chosen.name)} {tid('redeliver')}")
            while hooks.attempts[chosen.event_id] < 2:
                assert time.monotonic() < deadline + 30, "the redelivery never arrived"
                time.sleep(0.05)  # polling the receiver
            assert hooks.bad == []
            browser.wait_for(tid("delivery", name=chosen.name))
            assert raw_text(browser) == []
            browser.screenshot(shots / "07-webhook-deliveries.png")

            # Members (the viewer, as the owner added it), an API key whose secret is shown
            # once, and the sessions: the one the script registered with signed out.
            member = tid("member", user=viewer.name)
            browser.wait_for(f"{member}[data-role='WORKSPACE_ROLE_VIEWER']")
            browser.click(f"{tid('account')} > summary")
            browser.wait_for(tid("session", current="true"))
            browser.fill(tid("api-key-name"), "ci")
            browser.click(tid("create-api-key"))
            browser.wait_for(tid("api-key-secret"))
            secret = browser.eval(
                "(s) => document.querySelector(s).textContent", tid("api-key-secret")
            )
            [key] = server.auth.ListApiKeys(
                auth_pb2.ListApiKeysRequest(page_size=10),
                metadata=owner.md,
                timeout=CALL_DEADLINE_S,
            ).api_keys
            assert secret.startswith(key.prefix)
            assert key.display_name == "ci"
            browser.wait_for(tid("api-key", name=key.name))
            scripted = [s for s in server.sessions(owner).values() if not s.HasField("revoke_time")]
            assert len(scripted) == 2  # the script's and the page's
            browser.click(tid("revoke-other-sessions"))
            browser.wait(
                "(s) => document.querySelectorAll(s).length === 1",
                tid("session"),
            )
            page_session = browser.data(tid("session-info"))["session"]
            # The script's token went with its session; a new sign-in sees the rest.
            after = server.sessions(server.login(owner.email))
            assert not after[page_session].HasField("revoke_time")
            [revoked] = [s for s in scripted if s.name != page_session]
            assert after[revoked.name].HasField("revoke_time")
            assert raw_text(browser) == []
            browser.shots(shots / "08-account.png")
            assert problems(browser) == []

        # A viewer: nothing to manage on the page, and a forced call refused as the server said.
        with chromium.open(stack.origin + "/") as page:
            sign_in(page, viewer.email)
            page.click(tid("workspace-item", name=workspace))
            page.wait_for(tid("assistant", name=assistant))
            page.wait_for(tid("integration", name=integration))
            for control in (
                "new-assistant",
                "edit-assistant",
                "try-assistant",
                "register-integration",
                "add-member",
            ):
                assert not page.visible(tid(control)), control
            page.eval(
                "(s) => { document.querySelector(s).hidden = false; }", tid("register-integration")
            )
            page.click(f"{tid('register-integration')} > summary")
            page.fill(tid("integration-id"), "forced")
            page.fill(tid("integration-endpoint"), "http://127.0.0.1:9/mcp")
            page.click(tid("create-integration"))
            page.wait_for(tid("error", code="PERMISSION_DENIED", action="create-integration"))
            refused = page.data(tid("error", action="create-integration"))
            assert refused["reason"].startswith("ERROR_REASON_")
            text = page.eval("(s) => document.querySelector(s).textContent", tid("error"))
            assert "StatusCode" not in text
            assert "[permission_denied]" not in text
            assert raw_text(page) == []
            page.screenshot(shots / "09-viewer-refused.png")
    print(f"studio screenshots: {shots}")


def _reason(error: grpc.RpcError) -> str:
    call = cast(grpc.Call, error)  # the error of a failed call is that call
    for key, value in call.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            status = status_pb2.Status.FromString(value)
            for detail in status.details:
                if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                    info = error_details_pb2.ErrorInfo()
                    detail.Unpack(info)
                    return str(info.reason)
    return ""


def test_the_session_survives_a_reload_and_renews_once_when_its_token_is_refused(
    stack: Stack, chromium: Chromium, server: Server
) -> None:
    user = server.register("renew")
    workspace, conversation = server.workspace(user, f"renew-{os.getpid()}")
    # A deep link: once signed in, the page opens the conversation it names.
    with chromium.open(f"{stack.origin}/#{conversation}") as browser:
        session = sign_in(browser, user.email)
        browser.wait_visible(tid("composer"))
        first = browser.storage()
        assert first["identity"]["session"] == session
        assert first["presented"] is False
        seen = server.sessions(user)[session].last_seen_time.ToDatetime()

        # A reload keeps the session: the access token was in memory only, so the page
        # redeems its refresh token once, and keeps the rotated one.
        browser.reload()
        browser.wait_visible(tid("composer"))
        browser.wait_for(tid("connection", state="live"))
        second = browser.storage()
        assert second["identity"]["session"] == session
        assert second["refreshToken"] != first["refreshToken"]
        assert second["presented"] is False
        assert browser.data(tid("session-info"))["renewals"] == "1"
        renewed = server.sessions(user)[session]
        assert not renewed.HasField("revoke_time")
        assert renewed.last_seen_time.ToDatetime() > seen

        # A duplicated tab starts with a copy of the refresh token: it leaves the session
        # to this tab (two tabs rotating one token would look like theft to the server).
        with browser.duplicate() as copy:
            copy.wait_visible(tid("auth"))
            notice = copy.eval("(s) => document.querySelector(s).textContent", tid("notice"))
            assert "open in another tab" in notice
            assert copy.storage() == {}
            calls = grpc_web_calls(copy.network(), stack.origin)
            assert "RefreshToken" not in {method(n) for n in calls}
        assert browser.storage()["refreshToken"] == second["refreshToken"]

        # A new server (dev mode: a new signing key) refuses the access token the page
        # holds; its streams come back through one renewal, wherever they were.
        stack.restart_server()
        browser.wait_for(tid("session-info", renewals="2"))
        browser.wait_for(tid("connection", state="live"))
        browser.wait_for(tid("integrations", live="true"))
        # Unary calls work with the renewed token too.
        browser.fill(tid("new-conversation-title"), "After the restart")
        browser.click(tid("create-conversation"))
        made: str = browser.wait(
            "([s, old]) => { const name = document.querySelector(s)?.dataset.name;"
            " return name !== old && name; }",
            [f"{tid('conversation-item')}.current", conversation],
        )
        assert made.startswith(f"{workspace}/conversations/")
        calls = grpc_web_calls(browser.network(), stack.origin)
        renewals = [n for n in calls if method(n) == "RefreshToken"]
        assert len(renewals) == 2, renewals
        # The second renewal answered a refusal (UNAUTHENTICATED), not a timer.
        assert any(n.get("grpcStatus") == grpc.StatusCode.UNAUTHENTICATED.value[0] for n in calls)
        third = browser.storage()
        assert third["refreshToken"] not in (first["refreshToken"], second["refreshToken"])

        # The first refresh token, spent at the reload, comes back (a stolen copy): the
        # server revokes the session, and the page says why it signed out.
        with pytest.raises(grpc.RpcError) as refused:
            server.auth.RefreshToken(
                auth_pb2.RefreshTokenRequest(refresh_token=first["refreshToken"]),
                timeout=CALL_DEADLINE_S,
            )
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert _reason(refused.value) == "ERROR_REASON_SESSION_REVOKED"
        browser.wait_visible(tid("auth"))
        shown = browser.data(tid("auth-problem"))
        assert shown["code"] == "UNAUTHENTICATED"
        assert shown["reason"] == "ERROR_REASON_SESSION_REVOKED"
        assert browser.storage() == {}
        # (The test's own token was signed by the replaced server: it signs in again.)
        assert server.sessions(server.login(user.email))[session].HasField("revoke_time")
        assert len(stack.restarts) == 1
        assert problems(browser, outage=True) == []


def test_the_only_workspace_opens_by_itself_and_a_phone_gets_one_column(
    stack: Stack, chromium: Chromium, server: Server, tmp_path: Path
) -> None:
    """Signed in with exactly one workspace, it is open and the centre shows it; at 420 px
    the three columns stand one above the other and event text wraps between words."""
    shots = artifacts_dir(tmp_path) / "layout"
    shots.mkdir(parents=True, exist_ok=True)
    user = server.register("single")
    workspace, conversation = server.workspace(user, f"single-{os.getpid()}")
    with chromium.open(stack.origin + "/") as browser:
        sign_in(browser, user.email)
        browser.wait_for(f"{tid('workspace-item', name=workspace)}.current")
        browser.wait_visible(tid("workspace-overview", workspace=workspace))
        title = browser.eval(
            "(s) => document.querySelector(s).textContent", tid("conversation-title")
        )
        assert title == f"Single-{os.getpid()}"
        browser.wait_visible(tid("overview-conversation", name=conversation))
        assert raw_text(browser) == []
        browser.shots(shots / "one-workspace.png")

        # From the overview into the conversation; a run whose events carry long words.
        browser.click(tid("overview-conversation", name=conversation))
        browser.wait_visible(tid("composer"))
        assert not browser.visible(tid("workspace-overview"))
        words = "unbreakable characteristically incomprehensibilities " * 3
        run = send(browser, words.strip(), handler="handlers/echo")
        run_state(browser, run, "RUN_STATE_SUCCEEDED")
        browser.wait("(n) => document.querySelectorAll('[data-testid=\"event\"]').length >= n", 4)

        # A phone: one column, nothing wider than the window, words whole.
        browser.viewport(PHONE_WIDTH, 900)
        browser.wait_stacked()
        assert split_words(browser, tid("event")) == []
        assert split_words(browser, tid("message")) == []
        assert raw_text(browser) == []
        browser.screenshot(shots / f"conversation-{PHONE_WIDTH}.png")
        browser.viewport(DESKTOP_WIDTH, 900)
        assert split_words(browser, tid("event")) == []
        browser.screenshot(shots / "conversation.png")
        assert problems(browser) == []


#: Each element ``selector`` finds: how many rows its buttons take (their distinct tops),
#: and where the first starts and the last ends (rounded), the confirmation's aside.
BUTTON_ROWS_JS: Final = """(s) => [...document.querySelectorAll(s)].map((e) => {
  const boxes = [...e.querySelectorAll(':scope button')]
    .filter((b) => b.checkVisibility() && !b.closest('[data-testid="delete-confirmation"]'))
    .map((b) => b.getBoundingClientRect());
  return {
    rows: new Set(boxes.map((b) => Math.round(b.top))).size,
    left: Math.round(Math.min(...boxes.map((b) => b.left))),
    right: Math.round(Math.max(...boxes.map((b) => b.right))),
  };
})"""


def test_several_workspaces_are_offered_to_pick_and_the_workspaces_panels_fit(
    stack: Stack, chromium: Chromium, server: Server, tmp_path: Path
) -> None:
    """Signed in with two workspaces and none named in the URL, the centre offers both,
    each with the caller's role; one picked opens. Its owner's own member row has no
    Remove (another member's has); each file's buttons stand in one row, inside its
    entry, at a desktop's width and a phone's."""
    shots = artifacts_dir(tmp_path) / "layout"
    shots.mkdir(parents=True, exist_ok=True)
    owner = server.register("picker")
    member = server.register("picker-member")
    first, _ = server.workspace(owner, f"picker-a-{os.getpid()}")
    second, _ = server.workspace(owner, f"picker-b-{os.getpid()}")
    server.context.AddWorkspaceMember(
        context_pb2.AddWorkspaceMemberRequest(
            parent=first, user=member.name, role=context_pb2.WORKSPACE_ROLE_EDITOR
        ),
        metadata=owner.md,
        timeout=CALL_DEADLINE_S,
    )
    names = ("quarterly-planning-notes-for-the-platform-and-infrastructure-teams.txt", "a.txt")
    for display_name in names:
        data = f"notes in {display_name}\n".encode()
        frames = [
            context_pb2.UploadFileRequest(
                header=context_pb2.UploadFileHeader(
                    parent=first,
                    file=context_pb2.File(
                        display_name=display_name, media_type="text/plain", size_bytes=len(data)
                    ),
                )
            ),
            context_pb2.UploadFileRequest(chunk=data),
            context_pb2.UploadFileRequest(sha256=hashlib.sha256(data).hexdigest()),
        ]
        server.context.UploadFile(iter(frames), metadata=owner.md, timeout=CALL_DEADLINE_S)
    with chromium.open(stack.origin + "/") as browser:
        sign_in(browser, owner.email)
        picker = tid("workspace-picker")
        browser.wait_visible(picker)
        offered = browser.eval(
            "(s) => [...document.querySelectorAll(s)].map((c) => c.dataset.name)",
            tid("picker-workspace"),
        )
        assert sorted(offered) == sorted([first, second])
        said = browser.eval(
            "(s) => document.querySelector(s).textContent", tid("picker-workspace", name=first)
        )
        assert said.startswith(f"Picker-A-{os.getpid()}"), said
        assert "owner" in said, said
        assert current(browser, "workspace-item") == ""
        assert overflowing(browser, tid("picker-workspace")) == []
        assert raw_text(browser) == []
        browser.shots(shots / "pick-a-workspace.png")

        browser.click(tid("picker-workspace", name=first))
        browser.wait_for(f"{tid('workspace-item', name=first)}.current")
        browser.wait_visible(tid("workspace-overview", workspace=first))
        assert not browser.visible(picker)

        # The owner's own row: no Remove. The other member's: Remove.
        own = tid("member", user=owner.name)
        other = tid("member", user=member.name)
        browser.wait_visible(own)
        browser.wait_visible(other)
        assert browser.count(f"{own} {tid('remove-member')}") == 0
        assert browser.count(f"{other} {tid('remove-member')}") == 1

        # Each file's buttons in one row, inside its entry.
        browser.wait("(s) => document.querySelectorAll(s).length === 2", tid("file-entry"))
        for width in (DESKTOP_WIDTH, PHONE_WIDTH):
            browser.viewport(width, 900)
            if width == PHONE_WIDTH:
                browser.wait_stacked()
            # One row each, and the same place in every entry: a column of buttons.
            buttons = browser.eval(BUTTON_ROWS_JS, tid("file-entry"))
            assert [b["rows"] for b in buttons] == [1, 1], (width, buttons)
            assert len({(b["left"], b["right"]) for b in buttons}) == 1, (width, buttons)
            assert overflowing(browser, tid("file-entry")) == [], width
        browser.viewport(DESKTOP_WIDTH, 900)
        assert raw_text(browser) == []
        browser.shots(shots / "members-and-files.png")
        assert problems(browser) == []


def test_integrations_and_assistants_are_edited_and_deleted_from_the_page(
    stack: Stack, chromium: Chromium, server: Server, tmp_path: Path
) -> None:
    """An owner edits an integration (UpdateIntegration with the etag and only the changed
    fields), deletes one and an assistant (DeleteIntegration, DeleteAssistant), each after a
    confirmation on the page; a change made elsewhere meanwhile is refused and said so."""
    shots = artifacts_dir(tmp_path) / "manage"
    shots.mkdir(parents=True, exist_ok=True)
    user = server.register("manage")
    workspace, _ = server.workspace(user, f"manage-{os.getpid()}")

    def get(name: str) -> integration_pb2.Integration:
        found: integration_pb2.Integration = server.integration.GetIntegration(
            integration_pb2.GetIntegrationRequest(name=name),
            metadata=user.md,
            timeout=CALL_DEADLINE_S,
        ).integration
        return found

    def rename(name: str, title: str) -> None:
        server.integration.UpdateIntegration(
            integration_pb2.UpdateIntegrationRequest(
                integration=integration_pb2.Integration(name=name, display_name=title),
                update_mask=field_mask_pb2.FieldMask(paths=["display_name"]),
            ),
            metadata=user.md,
            timeout=CALL_DEADLINE_S,
        )

    with McpTestServer() as mcp:
        made = {
            integration_id: server.integration.CreateIntegration(
                integration_pb2.CreateIntegrationRequest(
                    parent=workspace,
                    integration_id=integration_id,
                    integration=integration_pb2.Integration(
                        display_name=title,
                        kind=integration_pb2.INTEGRATION_KIND_MCP_SERVER,
                        endpoint=mcp.url,
                        credential="s3cret",
                        disabled=disabled,
                        retry_safe=retry_safe,
                    ),
                ),
                metadata=user.md,
                timeout=CALL_DEADLINE_S,
            ).integration.name
            for integration_id, title, disabled, retry_safe in (
                ("kit", "Kit", False, True),
                ("idle", "Idle", True, False),
            )
        }
        kit, idle = made["kit"], made["idle"]
        assistant = server.dispatcher.CreateAssistant(
            dispatcher_pb2.CreateAssistantRequest(
                parent=workspace,
                assistant_id="helper",
                assistant=dispatcher_pb2.Assistant(display_name="Helper", workspace_default=True),
            ),
            metadata=user.md,
            timeout=CALL_DEADLINE_S,
        ).assistant.name
        with chromium.open(stack.origin + "/") as browser:
            sign_in(browser, user.email)
            # Never probed (disabled): its health is said in words, as is its kind.
            idle_item = tid("integration", name=idle, health="HEALTH_STATE_UNSPECIFIED")
            browser.wait_for(idle_item)
            browser.wait_for(tid("integration", name=kit, health="HEALTH_STATE_HEALTHY"))
            shown = browser.eval(
                "(s) => document.querySelector(s).textContent",
                f"{idle_item} {tid('integration-health')}",
            )
            assert shown == "not checked yet"
            kind = browser.eval(
                "(s) => document.querySelector(s).textContent",
                f"{idle_item} {tid('integration-kind-label')}",
            )
            assert kind == "MCP server"
            # Whether a call in flight at a crash is sent again by itself, in words.
            kit_item = tid("integration", name=kit)
            assert browser.visible(f"{kit_item} {tid('integration-retry-safe')}")
            assert browser.count(f"{idle_item} {tid('integration-retry-safe')}") == 0
            assert raw_text(browser) == []
            # An integration and an assistant there: the overview's first steps are done.
            browser.wait_visible(tid("assistant", name=assistant))
            browser.wait_visible(tid("workspace-overview", workspace=workspace))
            overview = browser.eval(
                "(s) => document.querySelector(s).textContent", tid("workspace-overview")
            )
            assert "build an assistant" not in overview, overview
            assert not browser.visible(tid("overview-hint"))

            # Edited: renamed, enabled and made safe to call again. Only what changed is
            # sent: the credential stays.
            browser.click(f"{idle_item} {tid('edit-integration')}")
            editor = f"{tid('integration', name=idle)} {tid('integration-editor')}"
            browser.wait_visible(editor)
            browser.fill(f"{editor} {tid('edit-integration-name')}", "Idle kit")
            browser.click(f"{editor} {tid('edit-integration-disabled')}")
            assert not browser.eval(
                "(s) => document.querySelector(s).checked",
                f"{editor} {tid('edit-integration-retry-safe')}",
            )
            browser.click(f"{editor} {tid('edit-integration-retry-safe')}")
            browser.shots(shots / "integration-editor.png")
            browser.click(f"{editor} {tid('save-integration')}")
            browser.wait_for(tid("integration", name=idle, disabled="false"))
            assert browser.count(editor) == 0
            stored = get(idle)
            assert stored.display_name == "Idle kit"
            assert not stored.disabled
            assert stored.retry_safe
            assert stored.has_credential
            assert stored.endpoint == mcp.url
            browser.wait_visible(f"{tid('integration', name=idle)} {tid('integration-retry-safe')}")

            # Changed elsewhere while the form was open: refused for its etag, said so, and
            # the form reloads with what the integration is now.
            item = tid("integration", name=kit)
            browser.click(f"{item} {tid('edit-integration')}")
            editor = f"{item} {tid('integration-editor')}"
            browser.wait_visible(editor)
            rename(kit, "Renamed by a script")
            browser.fill(f"{editor} {tid('edit-integration-name')}", "Kit 2")
            browser.click(f"{editor} {tid('save-integration')}")
            refused = f"{editor} {tid('error', code='ABORTED')}"
            browser.wait_visible(refused)
            assert browser.data(refused)["reason"] == "ERROR_REASON_ETAG_MISMATCH"
            assert browser.visible(f"{editor} {tid('etag-conflict')}")
            assert raw_text(browser) == []
            browser.click(f"{editor} {tid('reload-integration')}")
            browser.wait(
                "(s) => document.querySelector(s)?.value === 'Renamed by a script'",
                f"{editor} {tid('edit-integration-name')}",
            )
            browser.fill(f"{editor} {tid('edit-integration-name')}", "Kit 2")
            browser.click(f"{editor} {tid('save-integration')}")
            browser.wait(
                "(s) => document.querySelector(s) === null", f"{item} {tid('integration-editor')}"
            )
            assert get(kit).display_name == "Kit 2"

            # Deleted, after a confirmation; "Keep it" keeps it.
            browser.click(f"{item} {tid('delete-integration')}")
            confirm = f"{item} {tid('delete-confirmation')}"
            browser.wait_visible(confirm)
            browser.shots(shots / "integration-delete-confirmation.png")
            assert get(kit).name == kit
            browser.click(f"{confirm} {tid('cancel-delete')}")
            assert browser.count(confirm) == 0
            assert get(kit).name == kit
            # Changed elsewhere after the confirmation was asked for: not deleted unseen.
            browser.click(f"{item} {tid('delete-integration')}")
            browser.wait_visible(confirm)
            rename(kit, "Kit 3")
            browser.click(f"{confirm} {tid('confirm-delete')}")
            browser.wait_visible(f"{confirm} {tid('error', code='ABORTED')}")
            assert browser.data(f"{confirm} {tid('error')}")["reason"] == (
                "ERROR_REASON_ETAG_MISMATCH"
            )
            assert get(kit).name == kit
            browser.click(f"{confirm} {tid('cancel-delete')}")
            browser.click(f"{item} {tid('delete-integration')}")
            browser.wait_visible(confirm)
            browser.click(f"{confirm} {tid('confirm-delete')}")
            browser.wait("(s) => document.querySelector(s) === null", item)
            with pytest.raises(grpc.RpcError) as gone:
                get(kit)
            assert gone.value.code() == grpc.StatusCode.NOT_FOUND

            # An assistant deleted the same way; the composer stops offering it.
            entry = tid("assistant", name=assistant)
            browser.wait_visible(entry)
            browser.click(f"{entry} {tid('delete-assistant')}")
            browser.wait_visible(f"{entry} {tid('delete-confirmation')}")
            assert raw_text(browser) == []
            browser.click(f"{entry} {tid('delete-confirmation')} {tid('confirm-delete')}")
            browser.wait("(s) => document.querySelector(s) === null", entry)
            with pytest.raises(grpc.RpcError) as gone:
                server.dispatcher.GetAssistant(
                    dispatcher_pb2.GetAssistantRequest(name=assistant),
                    metadata=user.md,
                    timeout=CALL_DEADLINE_S,
                )
            assert gone.value.code() == grpc.StatusCode.NOT_FOUND
            browser.wait(
                "([s, a]) => ![...document.querySelector(s).options].some((o) => o.value === a)",
                [tid("assistant-select"), assistant],
            )
            browser.wait_visible(tid("assistants-empty"))
            # No assistant any more: the overview says what comes next.
            browser.wait_visible(tid("overview-hint"))
            hint = browser.eval(
                "(s) => document.querySelector(s).textContent", tid("overview-hint")
            )
            assert "build an assistant" in hint.lower(), hint
            calls = {method(n) for n in grpc_web_calls(browser.network(), stack.origin)}
            assert {"UpdateIntegration", "DeleteIntegration", "DeleteAssistant"} <= calls
            assert problems(browser) == []


#: Where the assistant editor stands: its column, its box and its column's, the side
#: column's width, and anything inside it that reaches past its right edge.
EDITOR_LAYOUT_JS: Final = """(s) => {
  const editor = document.querySelector(s);
  const column = editor.closest('.column');
  const box = (e) => e.getBoundingClientRect();
  const e = box(editor);
  const c = box(column);
  return {
    centre: column.classList.contains('chat'),
    within: e.left >= c.left - 0.5 && e.right <= c.right + 0.5,
    wider: e.width > box(document.querySelector('aside.column')).width,
    past: [...editor.querySelectorAll('fieldset, fieldset *')]
      .filter((x) => x.checkVisibility() && box(x).right > e.right + 0.5)
      .map((x) => x.dataset.testid || x.tagName),
    fieldsets: [...editor.querySelectorAll('fieldset')].map((f) => f.dataset.testid),
  };
}"""


def test_the_assistant_editor_takes_the_centre_and_its_fieldsets_fit_it(
    stack: Stack, chromium: Chromium, server: Server, tmp_path: Path
) -> None:
    """The editor is some 2,600 px tall with an integration's tools, delegates and
    handoffs: it opens at the top of the centre column, wider than the side column, every
    fieldset inside it (a handoff's row and its history choice included), and leaves the
    centre when it closes."""
    shots = artifacts_dir(tmp_path) / "editor"
    shots.mkdir(parents=True, exist_ok=True)
    owner = server.register("editor")
    workspace, conversation = server.workspace(owner, f"editor-{os.getpid()}")
    with McpTestServer() as mcp:
        _approval_kit(server, owner, workspace, mcp)
        for assistant_id, title in (("billing", "Billing"), ("support", "Customer support")):
            server.dispatcher.CreateAssistant(
                dispatcher_pb2.CreateAssistantRequest(
                    parent=workspace,
                    assistant_id=assistant_id,
                    assistant=dispatcher_pb2.Assistant(display_name=title),
                ),
                metadata=owner.md,
                timeout=CALL_DEADLINE_S,
            )
        helper = f"{workspace}/assistants/helper"
        with chromium.open(stack.origin + "/") as browser:
            browser.viewport(DESKTOP_WIDTH, 900)
            sign_in(browser, owner.email)
            open_conversation(browser, workspace, conversation)
            browser.click(f"{tid('assistant', name=helper)} {tid('edit-assistant')}")
            editor = tid("assistant-editor")
            browser.wait_visible(f"{editor} {tid('assistant-handoffs')}")
            browser.wait_for(f"{editor} {tid('assistant-tool', tool='echo')}")
            layout = browser.eval(EDITOR_LAYOUT_JS, editor)
            assert layout["fieldsets"][:3] == [
                "assistant-tools",
                "assistant-delegates",
                "assistant-handoffs",
            ], layout
            assert layout["centre"], layout
            assert layout["within"], layout
            assert layout["wider"], layout
            assert layout["past"] == [], layout
            browser.screenshot(shots / "assistant-editor.png")
            # What the centre showed is still there, below the editor.
            assert browser.visible(tid("composer"))

            browser.click(tid("close-editor"))
            browser.wait("(s) => !document.querySelector(s).checkVisibility()", editor)
            assert browser.count(".column.chat.editing") == 0
            assert problems(browser) == []


def test_a_member_is_added_by_user_name_and_an_email_is_explained_not_sent(
    stack: Stack, chromium: Chromium, server: Server
) -> None:
    """AddWorkspaceMember takes a user's name and nothing looks a user up by email: the page
    says so beside the form, shows the caller's own name to copy and give, and answers an
    email typed anyway on the page, without a call."""
    owner = server.register("members")
    colleague = server.register("colleague")
    workspace, _ = server.workspace(owner, f"members-{os.getpid()}")
    with chromium.open(stack.origin + "/") as browser:
        sign_in(browser, owner.email)
        browser.click(tid("workspace-item", name=workspace))
        browser.wait_visible(tid("members-panel"))
        text = "(s) => document.querySelector(s).textContent"
        assert "not by email" in browser.eval(text, tid("member-user-help"))
        browser.click(f"{tid('account')} > summary")
        browser.wait_visible(tid("own-user-name"))
        assert browser.eval(text, tid("own-user-name")) == owner.name

        browser.fill(tid("member-user"), colleague.email)
        browser.click(tid("add-member"))
        refused = tid("error", action="add-member")
        browser.wait_for(refused)
        assert browser.data(refused)["code"] == "INVALID_ARGUMENT"
        assert browser.data(f"{refused} {tid('error-violation')}")["field"] == "user"
        assert "cannot look a user up by email" in browser.eval(text, refused)
        idle(browser)
        calls = grpc_web_calls(browser.network(), stack.origin)
        assert "AddWorkspaceMember" not in [method(c) for c in calls]

        # By name, as the colleague's own page shows it: added.
        browser.fill(tid("member-user"), colleague.name)
        browser.click(tid("add-member"))
        browser.wait_for(tid("member", user=colleague.name))
        assert browser.count(refused) == 0
        assert problems(browser) == []


def test_files_have_a_page_of_their_own_with_each_files_details_by_kind(
    stack: Stack, chromium: Chromium, server: Server, tmp_path: Path
) -> None:
    """The side panel's "All files" opens the Files page (``#workspaces/w/files``) in the
    centre, where the side list steps aside: every file with its type, who stored it and
    whether its text was read, filtered by kind through ListFiles."""
    owner = server.register("filing")
    workspace, _ = server.workspace(owner, f"filing-{os.getpid()}")
    stored = {}
    for display_name, media_type, data in (
        ("notes.txt", "text/plain", b"the ferry leaves at nine\n"),
        ("minutes.txt", "text/plain", b"the minutes of the meeting\n"),
        ("dot.png", "image/png", png_image(2, 2)),
    ):
        frames = [
            context_pb2.UploadFileRequest(
                header=context_pb2.UploadFileHeader(
                    parent=workspace,
                    file=context_pb2.File(
                        display_name=display_name, media_type=media_type, size_bytes=len(data)
                    ),
                )
            ),
            context_pb2.UploadFileRequest(chunk=data),
            context_pb2.UploadFileRequest(sha256=hashlib.sha256(data).hexdigest()),
        ]
        made = server.context.UploadFile(iter(frames), metadata=owner.md, timeout=CALL_DEADLINE_S)
        stored[display_name] = made.file.name
    with chromium.open(stack.origin + "/") as browser:
        sign_in(browser, owner.email)
        browser.click(tid("workspace-item", name=workspace))
        browser.wait("(s) => document.querySelectorAll(s).length === 3", tid("file-entry"))
        browser.click(tid("all-files"))
        page = tid("files-page")
        browser.wait_visible(page)
        assert browser.eval("() => location.hash") == f"#{workspace}/files"
        assert not browser.visible(tid("files-panel"))
        assert browser.eval(
            "(s) => document.querySelector(s).closest('.column.chat') !== null", page
        )
        browser.wait(
            "(s) => document.querySelectorAll(s).length === 3", f"{page} {tid('file-entry')}"
        )
        # Each file once on the page, with what it is, who stored it and its text's state.
        assert browser.count(tid("file-entry")) == 3
        details = browser.eval(
            "(s) => Object.fromEntries([...document.querySelectorAll(s)].map((e) =>"
            " [e.dataset.file, e.querySelector('[data-testid=\"file-details\"]').textContent]))",
            f"{page} {tid('file-entry')}",
        )
        assert set(details) == set(stored.values())
        for name, file in stored.items():
            said = details[file]
            assert said.startswith("text/plain" if name.endswith(".txt") else "image/png"), said
            assert f"by {owner.email}" in said, said

        browser.select(tid("files-kind"), str(context_pb2.FILE_KIND_IMAGE))
        browser.wait(
            "(s) => document.querySelectorAll(s).length === 1", f"{page} {tid('file-entry')}"
        )
        assert browser.data(f"{page} {tid('file-entry')}")["file"] == stored["dot.png"]
        browser.screenshot(artifacts_dir(tmp_path) / "files-page.png")

        # Leaving it: the side list is back.
        browser.click(tid("open-budgets"))
        browser.wait_visible(tid("files-panel"))
        assert not browser.visible(page)
        assert problems(browser) == []


def test_a_search_by_meaning_folds_the_weaker_matches_below_the_others(
    stack: Stack, chromium: Chromium, server: Server
) -> None:
    """A hybrid search answers its page size whatever the query: the semantic list brings
    the nearest vectors however far. Two notes share the query's words; eight share none
    (nearly orthogonal to it): those are folded under "8 weaker matches", closed, with the
    cut-off (half the best similarity) said, and the two are the results."""
    owner = server.register("meaning")
    workspace, _ = server.workspace(owner, f"meaning-{os.getpid()}")
    index = f"{workspace}/semanticIndex"
    server.context.UpdateSemanticIndex(
        context_pb2.UpdateSemanticIndexRequest(
            semantic_index=context_pb2.SemanticIndex(name=index, embedding_model="sb-hash-384"),
            update_mask=field_mask_pb2.FieldMask(paths=["embedding_model"]),
        ),
        metadata=owner.md,
        timeout=CALL_DEADLINE_S,
    )
    related = ["The ferry timetable changes in winter", "Ferry timetable: boats leave hourly"]
    unrelated = [
        "Quarterly budget review with finance",
        "The cat sleeps on the sofa",
        "Paint the kitchen walls green",
        "Dentist appointment on Tuesday",
        "Renew the passport before June",
        "Buy flour, eggs and butter",
        "The printer on floor two is jammed",
        "Water the tomatoes every evening",
    ]
    for content in related + unrelated:
        server.context.CreateMemoryItem(
            context_pb2.CreateMemoryItemRequest(
                parent=workspace,
                memory_item=context_pb2.MemoryItem(
                    kind=context_pb2.MEMORY_KIND_NOTE, content=content
                ),
            ),
            metadata=owner.md,
            timeout=CALL_DEADLINE_S,
        )
    # Indexing is the server's own work: its index says when every note is embedded.
    deadline = time.monotonic() + 60
    while True:
        state = server.context.GetSemanticIndex(
            context_pb2.GetSemanticIndexRequest(name=index),
            metadata=owner.md,
            timeout=CALL_DEADLINE_S,
        ).semantic_index
        if state.indexed_count >= len(related + unrelated) and state.pending_count == 0:
            break
        assert time.monotonic() < deadline, state
        time.sleep(0.2)  # polling the server's stored state, under a deadline
    with chromium.open(stack.origin + "/") as browser:
        sign_in(browser, owner.email)
        browser.click(tid("workspace-item", name=workspace))
        browser.click(tid("open-search"))
        browser.wait_visible(tid("search-page"))
        browser.fill(tid("search-query"), "ferry timetable")
        browser.click(tid("search-mode-hybrid"))
        browser.click(tid("run-search"))
        weaker = tid("search-weaker")
        browser.wait_for(weaker)
        shown = browser.eval(
            "(s) => [...document.querySelectorAll(s)].map((e) =>"
            " e.querySelector('[data-testid=\"result-text\"]').textContent)",
            f"{tid('search-results')} > {tid('search-result')}",
        )
        assert sorted(shown) == sorted(related)
        folded = browser.data(weaker)
        assert folded["count"] == str(len(unrelated))
        assert not browser.eval("(s) => document.querySelector(s).open", weaker)
        status = browser.eval("(s) => document.querySelector(s).textContent", tid("search-status"))
        assert status.startswith(f"2 results, ranked hybrid · {len(unrelated)} weaker below"), (
            status
        )
        assert problems(browser) == []


def test_a_problem_goes_when_its_cause_does_and_covers_nothing(
    stack: Stack, chromium: Chromium, server: Server, tmp_path: Path
) -> None:
    """A refusal is shown beside what was done, in the page's flow; it goes when dismissed
    or when the same action next succeeds; one whose cause passes by itself (the network)
    goes by itself."""
    shots = artifacts_dir(tmp_path) / "problems"
    shots.mkdir(parents=True, exist_ok=True)
    user = server.register("problem")
    taken = f"taken-{os.getpid()}"
    workspace, _ = server.workspace(user, taken)
    with chromium.open(stack.origin + "/") as browser:
        sign_in(browser, user.email)
        browser.wait_for(f"{tid('workspace-item', name=workspace)}.current")

        # A refusal that stays until something is done about it: shown, covering nothing.
        refused = tid("error", action="create-workspace")
        browser.fill(tid("new-workspace-id"), taken)
        browser.fill(tid("new-workspace-name"), "Taken")
        browser.click(tid("create-workspace"))
        browser.wait_visible(refused)
        assert browser.data(refused)["code"] == "ALREADY_EXISTS"
        assert browser.data(refused)["transient"] == "false"
        assert covers(browser, refused) == []
        assert raw_text(browser) == []
        browser.shots(shots / "refused.png")
        # Dismissed, it goes.
        browser.click(f"{refused} {tid('dismiss-problem')}")
        assert browser.count(refused) == 0
        # Shown again, it goes when the same action succeeds.
        browser.fill(tid("new-workspace-id"), taken)
        browser.fill(tid("new-workspace-name"), "Taken")
        browser.click(tid("create-workspace"))
        browser.wait_visible(refused)
        fresh = f"fresh-{os.getpid()}"
        browser.fill(tid("new-workspace-id"), fresh)
        browser.click(tid("create-workspace"))
        browser.wait_for(f"{tid('workspace-item', name=f'workspaces/{fresh}')}.current")
        browser.wait("(s) => document.querySelector(s) === null", refused)

        # No network: the call fails, and once the network is back the problem goes by
        # itself (nothing to do about it), as does the feed's.
        failed = tid("error", action="create-conversation")
        stack.front.cut(refuse=True)
        try:
            browser.wait_for(tid("connection", state="reconnecting"))
            browser.fill(tid("new-conversation-title"), "Offline")
            browser.click(tid("create-conversation"))
            browser.wait_visible(failed)
            assert browser.data(failed)["transient"] == "true"
            assert covers(browser, failed) == []
        finally:
            stack.front.restore()
        browser.wait_for(tid("connection", state="live"))
        browser.wait("(s) => document.querySelector(s) === null", failed)
        assert browser.count(tid("error")) == 0
        assert problems(browser, outage=True) == []


def _budget(server: Server, user: User, name: str) -> dispatcher_pb2.Budget:
    found: dispatcher_pb2.Budget = server.dispatcher.GetBudget(
        dispatcher_pb2.GetBudgetRequest(name=name), metadata=user.md, timeout=CALL_DEADLINE_S
    ).budget
    return found


def test_budgets_are_edited_on_their_page_the_chart_shows_the_days_spend_and_a_refusal_says_why(
    stack: Stack, chromium: Chromium, server: Server, tmp_path: Path
) -> None:
    """The Budgets page (``#workspaces/w/budgets``): a budget created there (a time zone
    that does not exist refused first, the server's violation beside its field), a priced
    run on the local model server, then the day's spend in the chart and in the budget's
    cost bar exactly as the server has them; the cap lowered on the page (UpdateBudget with
    only that field and the etag) below what was spent, and the next message refused in
    the composer with the budget's name and when it resets. A viewer reads the page and
    gets no controls."""
    shots = artifacts_dir(tmp_path) / "budgets"
    shots.mkdir(parents=True, exist_ok=True)
    owner = server.register("budgets")
    viewer = server.register("budgets-viewer")
    workspace, conversation = server.workspace(owner, f"budgets-{os.getpid()}")
    server.context.AddWorkspaceMember(
        context_pb2.AddWorkspaceMemberRequest(
            parent=workspace, user=viewer.name, role=context_pb2.WORKSPACE_ROLE_VIEWER
        ),
        metadata=owner.md,
        timeout=CALL_DEADLINE_S,
    )
    # The llm handler on the local model server's priced echo model answers the messages.
    assistant = server.dispatcher.CreateAssistant(
        dispatcher_pb2.CreateAssistantRequest(
            parent=workspace,
            assistant_id="helper",
            assistant=dispatcher_pb2.Assistant(display_name="Helper", workspace_default=True),
        ),
        metadata=owner.md,
        timeout=CALL_DEADLINE_S,
    ).assistant.name
    budget = f"{workspace}/budgets/daily"
    page_link = tid("open-budgets")
    editor = tid("budget-editor")
    with chromium.open(stack.origin + "/") as browser:
        sign_in(browser, owner.email)
        browser.click(tid("workspace-item", name=workspace))
        browser.click(page_link)
        browser.wait_visible(tid("budgets-page"))
        assert browser.eval("() => location.hash") == f"#{workspace}/budgets"
        browser.wait_visible(tid("usage-empty"))
        browser.wait_visible(tid("budgets-empty"))
        assert not browser.visible(tid("composer"))

        # Created on the page; the server's refusal first, beside the field it names.
        browser.click(tid("new-budget"))
        browser.wait_visible(editor)
        browser.fill(f"{editor} {tid('budget-id')}", "daily")
        browser.fill(f"{editor} {tid('budget-name')}", "Daily spend")
        browser.select(f"{editor} {tid('budget-period')}", str(dispatcher_pb2.BUDGET_PERIOD_DAY))
        browser.fill(f"{editor} {tid('budget-time-zone')}", "Mars/Olympus_Mons")
        browser.fill(f"{editor} {tid('budget-cost')}", "5")
        browser.fill(f"{editor} {tid('budget-thresholds')}", "50, 100")
        browser.click(f"{editor} {tid('save-budget')}")
        beside = f'{editor} label[data-field="time_zone"] {tid("field-violation")}'
        browser.wait_for(beside)
        refusal = browser.data(f"{editor} {tid('error')}")
        assert refusal["code"] == "INVALID_ARGUMENT"
        assert browser.data(beside)["field"].endswith("time_zone")
        with pytest.raises(grpc.RpcError) as absent:
            _budget(server, owner, budget)
        assert absent.value.code() == grpc.StatusCode.NOT_FOUND
        browser.shots(shots / "budget-refused.png")
        browser.fill(f"{editor} {tid('budget-time-zone')}", "UTC")
        browser.click(f"{editor} {tid('save-budget')}")
        item = tid("budget", name=budget)
        browser.wait_for(item)
        assert not browser.visible(editor)
        stored = _budget(server, owner, budget)
        assert stored.display_name == "Daily spend"
        assert stored.scope == workspace
        assert stored.period == dispatcher_pb2.BUDGET_PERIOD_DAY
        assert stored.time_zone == "UTC"
        assert stored.cost_limit_micros == 5_000_000
        assert not stored.HasField("input_token_limit")
        assert list(stored.alert_thresholds) == [50, 100]
        cost_cap = f"{item} {tid('budget-cap', cap='cost')}"
        shown_cap = {k: v for k, v in browser.data(cost_cap).items() if k != "testid"}
        assert shown_cap == {"cap": "cost", "used": "0", "held": "0", "limit": "5000000"}
        reset = browser.data(f"{item} {tid('budget-reset')}")["reset"]
        assert datetime.fromisoformat(reset) == stored.usage.reset_time.ToDatetime(tzinfo=UTC)
        assert raw_text(browser) == []

        # A run that costs something, then its spend on the page.
        open_conversation(browser, workspace, conversation)
        run = send(browser, "hello budgets")
        run_state(browser, run, "RUN_STATE_SUCCEEDED")
        spent = server.run(owner, run).usage.cost_micros
        assert spent > 0
        browser.click(page_link)
        browser.wait_visible(tid("budgets-page"))
        today = time.strftime("%Y-%m-%d", time.gmtime())
        rows = server.dispatcher.QueryUsage(
            dispatcher_pb2.QueryUsageRequest(
                parent=workspace,
                group_by=[
                    dispatcher_pb2.USAGE_DIMENSION_DAY,
                    dispatcher_pb2.USAGE_DIMENSION_ASSISTANT,
                    dispatcher_pb2.USAGE_DIMENSION_MODEL,
                ],
            ),
            metadata=owner.md,
            timeout=CALL_DEADLINE_S,
        ).rows
        [row] = [r for r in rows if r.day == today]
        assert row.assistant == assistant
        assert row.cost_micros == spent
        bar = tid("usage-bar", day=today, assistant=assistant, model=row.model)
        browser.wait_for(bar)
        assert browser.data(bar)["costMicros"] == str(spent)
        assert browser.data(tid("usage-total"))["todayMicros"] == str(spent)
        legend = browser.eval(
            "(s) => document.querySelector(s).textContent",
            tid("usage-series", assistant=assistant, model=row.model),
        )
        assert legend == f"Helper · {row.model}: ${js_fixed(spent / 1e6, 4)}"
        browser.wait_for(f"{cost_cap}[data-used='{spent}']")
        assert browser.data(cost_cap)["held"] == "0"
        assert raw_text(browser) == []
        browser.shots(shots / "budgets-page.png")

        # The cap lowered below what was spent: only that field changes, with the etag.
        browser.click(f"{item} {tid('edit-budget')}")
        browser.wait_visible(editor)
        browser.fill(f"{editor} {tid('budget-cost')}", "0.000001")
        browser.click(f"{editor} {tid('save-budget')}")
        browser.wait_for(f"{tid('budget-cap', cap='cost')}[data-limit='1']")
        lowered = _budget(server, owner, budget)
        assert lowered.cost_limit_micros == 1
        assert lowered.etag != stored.etag
        assert (lowered.display_name, list(lowered.alert_thresholds)) == ("Daily spend", [50, 100])
        update = [
            n
            for n in grpc_web_calls(browser.network(), stack.origin)
            if method(n) == "UpdateBudget"
        ]
        assert len(update) == 1

        # The next message is refused: the composer says which budget and when it resets.
        open_conversation(browser, workspace, conversation)
        before = server.messages(owner, conversation)
        send(browser, "one more", expect_run=False)
        shown = f"{tid('composer')} {tid('error')}"
        browser.wait_for(shown)
        assert browser.data(shown)["reason"] == "ERROR_REASON_BUDGET_EXHAUSTED"
        assert browser.data(shown)["code"] == "RESOURCE_EXHAUSTED"
        assert browser.data(f"{shown} {tid('error-violation')}")["field"] == budget
        summary = browser.eval(
            "(s) => document.querySelector(s).textContent", f"{shown} {tid('error-summary')}"
        )
        assert summary.startswith("Not sent: the budget “Daily spend” has no room left"), summary
        assert "It resets " in summary, summary
        assert (
            browser.eval("(s) => document.querySelector(s).value", tid("message-input"))
            == "one more"
        )
        assert [m.name for m in server.messages(owner, conversation)] == [m.name for m in before]
        assert covers(browser, shown) == []
        assert raw_text(browser) == []
        browser.shots(shots / "message-refused.png")
        assert problems(browser) == []

    # A viewer reads the same page: the budget and its use, no controls.
    with chromium.open(stack.origin + f"/#{workspace}/budgets") as browser:
        sign_in(browser, viewer.email)
        item = tid("budget", name=budget)
        browser.wait_for(item)
        browser.wait_for(tid("usage-bar", day=today))
        assert not browser.visible(tid("new-budget"))
        assert browser.count(f"{item} {tid('edit-budget')}") == 0
        assert browser.count(f"{item} {tid('delete-budget')}") == 0
        assert "Read only" in browser.eval(
            "(s) => document.querySelector(s).textContent", tid("budgets-role")
        )
        assert problems(browser) == []


def test_a_run_paused_at_a_budgets_cap_says_why_in_its_card_and_an_owner_allows_the_overdraft(
    stack: Stack, chromium: Chromium, server: Server, tmp_path: Path
) -> None:
    """A run budget of 66 output tokens and an assistant whose model may write 200: the
    first model call is made with max_tokens lowered to the 66 left (a useful answer fits),
    which its card says in the server's words; the call after its tool has less than a
    useful answer left, so the run pauses (REQUIRES_ACTION with a budget action). Its card
    says which budget, what the step asks and the server's account of the shortfall, with
    no tool approval beside it; "Allow overdraft" (an owner's ResolveBudgetAction) lets it
    finish, and the server records who decided. Its usage then says the answer was limited
    by a budget, as does the Budgets page's row of its day and model."""
    shots = artifacts_dir(tmp_path) / "budgets"
    shots.mkdir(parents=True, exist_ok=True)
    owner = server.register("paused")
    workspace, conversation = server.workspace(owner, f"paused-{os.getpid()}")
    with McpTestServer() as mcp:
        integration = server.integration.CreateIntegration(
            integration_pb2.CreateIntegrationRequest(
                parent=workspace,
                integration_id="kit",
                integration=integration_pb2.Integration(
                    display_name="Tool kit",
                    kind=integration_pb2.INTEGRATION_KIND_MCP_SERVER,
                    endpoint=mcp.url,
                ),
            ),
            metadata=owner.md,
            timeout=CALL_DEADLINE_S,
        ).integration.name
        server.dispatcher.CreateAssistant(
            dispatcher_pb2.CreateAssistantRequest(
                parent=workspace,
                assistant_id="helper",
                assistant=dispatcher_pb2.Assistant(
                    display_name="Helper",
                    model=handler_pb2.ModelSettings(max_output_tokens=200),
                    tools=[dispatcher_pb2.AssistantTools(integration=integration, tools=["echo"])],
                    workspace_default=True,
                ),
            ),
            metadata=owner.md,
            timeout=CALL_DEADLINE_S,
        )
        budget = server.dispatcher.CreateBudget(
            dispatcher_pb2.CreateBudgetRequest(
                parent=workspace,
                budget_id="per-run",
                budget=dispatcher_pb2.Budget(
                    display_name="Per run",
                    scope=workspace,
                    period=dispatcher_pb2.BUDGET_PERIOD_RUN,
                    output_token_limit=66,
                ),
            ),
            metadata=owner.md,
            timeout=CALL_DEADLINE_S,
        ).budget.name
        with chromium.open(stack.origin + "/") as browser:
            sign_in(browser, owner.email)
            open_conversation(browser, workspace, conversation)
            run = send(browser, 'call kit__echo {"message": "over"}')
            card = tid("run", run=run)
            box = f"{card} {tid('budget-action')}"
            browser.wait_for(box)
            paused = server.run(owner, run)
            assert paused.state == dispatcher_pb2.RUN_STATE_REQUIRES_ACTION
            action = paused.required_action.budget
            assert list(action.budgets) == [budget]
            assert action.output_tokens == 200
            assert browser.data(box)["budgets"] == budget
            # The card is shown at once, naming the budget by its resource name, and again
            # once its title has been read (GetBudget): wait for the second.
            said = browser.wait(
                "(s) => { const t = document.querySelector(s)?.textContent ?? '';"
                " return t.includes('the budget Per run') ? t : null; }",
                box,
            )
            assert "does not fit in the budget Per run (it asks" in said, said
            assert f"{action.input_tokens} input and 200 output tokens" in said, said
            # The server's account of it, verbatim: what the call needs, what is left.
            assert action.description
            why = browser.eval(
                "(s) => document.querySelector(s).textContent",
                f"{box} {tid('budget-action-description')}",
            )
            assert why == f"Why: {action.description}", why
            # The first call was made with max_tokens lowered to fit: said, quoted.
            lowered = browser.eval(
                "(s) => document.querySelector(s)?.textContent", f"{card} {tid('run-progress')}"
            )
            assert lowered is not None
            assert lowered.startswith("max_tokens lowered from 200 to 66"), lowered
            badge = browser.eval(
                "(s) => document.querySelector(s).textContent", f"{card} {tid('run-state')}"
            )
            assert badge == "waiting for budget room"
            waited = [
                e for e in timeline(browser, run) if e.get("state") == "RUN_STATE_REQUIRES_ACTION"
            ]
            assert ["waiting for budget room" in e["text"] for e in waited] == [True], waited
            assert browser.count(tid("approval")) == 0
            assert raw_text(browser) == []
            browser.shots(shots / "run-paused.png")
            browser.click(f"{box} {tid('allow-overdraft')}")
            run_state(browser, run, "RUN_STATE_SUCCEEDED")
            browser.wait("(s) => document.querySelector(s) === null", box)
            finished = server.run(owner, run)
            decided = finished.required_action.budget
            assert decided.decision == dispatcher_pb2.BUDGET_DECISION_ALLOW_OVERDRAFT
            assert decided.decided_by == owner.name

            # Its usage: one answer limited by the budget, to the tokens the server says.
            assert finished.usage.budget_lowered_calls == 1
            usage = f"{card} {tid('run-usage')}"
            browser.wait(
                "(s) => document.querySelector(s)?.dataset.budgetLoweredCalls === '1'", usage
            )
            said = browser.eval("(s) => document.querySelector(s).textContent", usage)
            limited = f"answer limited by a budget to {finished.usage.lowest_max_tokens} tokens"
            assert said.endswith(limited), said
            [entry] = [e for e in timeline(browser, run) if e.get("kind") == "usage"]
            assert limited in entry["text"], entry
            # The Budgets page counts the run as limited in its day's row.
            browser.click(tid("open-budgets"))
            row = f"{tid('usage-row')}[data-budget-lowered-runs='1']"
            browser.wait_visible(row)
            assert (
                browser.eval(
                    "(s) => document.querySelector(s).textContent",
                    f"{row} {tid('usage-row-limited')}",
                )
                == "1 run limited by a budget"
            )
            assert raw_text(browser) == []
            browser.shots(shots / "run-limited.png")
            assert problems(browser) == []


#: The Budgets page's token table, a row each: its data-* and its cost as shown.
USAGE_ROWS_JS: Final = """(s) => [...document.querySelectorAll(s)].map((row) => ({
  day: row.dataset.day, assistant: row.dataset.assistant, model: row.dataset.model,
  runs: row.dataset.runs, input: row.dataset.inputTokens, output: row.dataset.outputTokens,
  cost: row.querySelector('[data-testid="usage-row-cost"]').textContent,
  unpriced: row.dataset.unpricedRuns,
}))"""


def test_the_budgets_page_shows_tokens_by_day_and_model_and_an_unpriced_model_as_unpriced(
    stack: Stack, chromium: Chromium, server: Server, tmp_path: Path
) -> None:
    """A run of a model the price table does not have (the local model server's echo
    under another name): its card and its inspector say "unpriced", not "$0.0000", and the
    Budgets page, with nothing priced to chart, still shows its tokens by day, assistant
    and model, as QueryUsage has them. A run of a model priced at 0 (echo-free) costs
    "$0.0000", not "unpriced": the server says which calls went unpriced
    (``Usage.unpriced_calls``, ``UsageRow.unpriced_runs``). After a priced run the table
    has all three, the priced one with its cost."""
    shots = artifacts_dir(tmp_path) / "budgets"
    shots.mkdir(parents=True, exist_ok=True)
    owner = server.register("unpriced")
    workspace, conversation = server.workspace(owner, f"unpriced-{os.getpid()}")

    def assistant(assistant_id: str, title: str, **settings: Any) -> str:
        name: str = server.dispatcher.CreateAssistant(
            dispatcher_pb2.CreateAssistantRequest(
                parent=workspace,
                assistant_id=assistant_id,
                assistant=dispatcher_pb2.Assistant(display_name=title, **settings),
            ),
            metadata=owner.md,
            timeout=CALL_DEADLINE_S,
        ).assistant.name
        return name

    priced = assistant("helper", "Helper", workspace_default=True)
    unpriced = assistant(
        "thrifty", "Thrifty", model=handler_pb2.ModelSettings(model="echo-unpriced")
    )
    free = assistant("gratis", "Gratis", model=handler_pb2.ModelSettings(model="echo-free"))

    def usage() -> list[dict[str, str]]:
        rows = server.dispatcher.QueryUsage(
            dispatcher_pb2.QueryUsageRequest(
                parent=workspace,
                group_by=[
                    dispatcher_pb2.USAGE_DIMENSION_DAY,
                    dispatcher_pb2.USAGE_DIMENSION_ASSISTANT,
                    dispatcher_pb2.USAGE_DIMENSION_MODEL,
                ],
            ),
            metadata=owner.md,
            timeout=CALL_DEADLINE_S,
        ).rows
        return [
            {
                "day": r.day,
                "assistant": r.assistant,
                "model": r.model,
                "runs": str(r.run_count),
                "input": str(r.input_tokens),
                "output": str(r.output_tokens),
                # Grouped by model, a row's runs are all unpriced or none.
                "cost": "unpriced" if r.unpriced_runs else f"${js_fixed(r.cost_micros / 1e6, 4)}",
                "unpriced": str(r.unpriced_runs),
            }
            for r in rows
        ]

    def shown_rows(browser: Page) -> list[dict[str, str]]:
        found: list[dict[str, str]] = browser.eval(USAGE_ROWS_JS, tid("usage-row"))
        return sorted(found, key=lambda r: (r["day"], r["assistant"], r["model"]))

    with chromium.open(stack.origin + "/") as browser:
        sign_in(browser, owner.email)
        open_conversation(browser, workspace, conversation)
        browser.select(tid("assistant-select"), unpriced)
        run = send(browser, "words nobody prices")
        run_state(browser, run, "RUN_STATE_SUCCEEDED")
        stored = server.run(owner, run).usage
        assert stored.output_tokens > 0
        assert (stored.cost_micros, stored.estimated_cost_usd, stored.unpriced_calls) == (0, 0, 1)
        card_usage = browser.wait(
            "(s) => { const t = document.querySelector(s)?.textContent ?? '';"
            " return t.includes('tokens') && t; }",
            f"{tid('run', run=run)} {tid('run-usage')}",
        )
        assert "unpriced" in card_usage, card_usage
        assert "$" not in card_usage, card_usage
        [entry] = [e for e in timeline(browser, run) if e.get("kind") == "usage"]
        assert "unpriced" in entry["text"], entry
        assert "$" not in entry["text"], entry

        # Nothing priced: no chart, but the tokens by day, assistant and model.
        browser.click(tid("open-budgets"))
        browser.wait_visible(tid("usage-empty"))
        browser.wait_visible(tid("usage-table"))
        expected = usage()
        assert [(r["assistant"], r["cost"]) for r in expected] == [(unpriced, "unpriced")]
        assert shown_rows(browser) == expected
        assert raw_text(browser) == []
        browser.shots(shots / "unpriced.png")

        # A model priced at 0: it cost nothing, and that is its price, not "unpriced".
        open_conversation(browser, workspace, conversation)
        browser.select(tid("assistant-select"), free)
        run = send(browser, "words priced at nothing")
        run_state(browser, run, "RUN_STATE_SUCCEEDED")
        stored = server.run(owner, run).usage
        assert stored.output_tokens > 0
        assert (stored.cost_micros, stored.unpriced_calls) == (0, 0)
        card_usage = browser.wait(
            "(s) => { const t = document.querySelector(s)?.textContent ?? '';"
            " return t.includes('tokens') && t; }",
            f"{tid('run', run=run)} {tid('run-usage')}",
        )
        assert card_usage.endswith("$0.0000"), card_usage
        assert "unpriced" not in card_usage, card_usage
        [entry] = [e for e in timeline(browser, run) if e.get("kind") == "usage"]
        assert "$0.000000" in entry["text"], entry
        assert "unpriced" not in entry["text"], entry
        browser.click(tid("open-budgets"))
        browser.wait("(s) => document.querySelectorAll(s).length === 2", tid("usage-row"))
        expected = usage()
        assert sorted((r["assistant"], r["cost"]) for r in expected) == sorted(
            [(unpriced, "unpriced"), (free, "$0.0000")]
        )
        assert shown_rows(browser) == sorted(
            expected, key=lambda r: (r["day"], r["assistant"], r["model"])
        )
        # Still nothing to chart, and the page says which runs had no price.
        empty = browser.eval("(s) => document.querySelector(s).textContent", tid("usage-empty"))
        assert empty.startswith("2 runs, none with a cost: 1 used a model with no price"), empty
        assert raw_text(browser) == []
        browser.shots(shots / "free.png")

        # A priced run beside it: the chart, and both in the table.
        open_conversation(browser, workspace, conversation)
        browser.select(tid("assistant-select"), priced)
        run = send(browser, "words with a price")
        run_state(browser, run, "RUN_STATE_SUCCEEDED")
        browser.click(tid("open-budgets"))
        browser.wait_visible(tid("usage-chart"))
        browser.wait("(s) => document.querySelectorAll(s).length === 3", tid("usage-row"))
        expected = usage()
        assert sorted(r["assistant"] for r in expected) == sorted([priced, unpriced, free])
        # The total under the chart says one run's cost leaves its calls out.
        total = browser.eval("(s) => document.querySelector(s).textContent", tid("usage-total"))
        assert "(3 runs, 1 of them with unpriced model calls)" in total, total
        assert shown_rows(browser) == sorted(
            expected, key=lambda r: (r["day"], r["assistant"], r["model"])
        )
        assert raw_text(browser) == []
        browser.shots(shots / "tokens-by-day.png")
        assert problems(browser) == []


# -- Files -----------------------------------------------------------------------------------


def png_image(width: int, height: int) -> bytes:
    """A real PNG (red pixels), built here: the test needs no image on disk."""
    rows = b"".join(b"\x00" + bytes([200, 30, 30] * width) for _ in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def pdf_document(text: str) -> bytes:
    """A one-page PDF whose text layer is ``text`` (Helvetica), with a correct xref."""
    content = f"BT /F1 18 Tf 20 80 Td ({text}) Tj ET".encode()
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 400 144] "
        b"/Resources << /Font << /F1 4 0 R >> >> /Contents 5 0 R >>",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
        b"<< /Length %d >>\nstream\n" % len(content) + content + b"\nendstream",
    ]
    out = b"%PDF-1.4\n"
    offsets = []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (
        len(objects) + 1,
        xref,
    )
    return out


def test_the_budgets_page_says_which_runs_its_table_leaves_out_and_resets_in_a_named_zone(
    stack: Stack, chromium: Chromium, server: Server
) -> None:
    """A budget is charged as calls are made; QueryUsage sums ended runs. A run paused for a
    decision is in the budget's used amount and not in the table: the open page says so as
    soon as the run pauses, and once the run has ended the budget's tokens and the table's
    total are the same number. When a period resets is said in the budget's own zone, by
    name."""
    owner = server.register("sums")
    workspace, conversation = server.workspace(owner, f"sums-{os.getpid()}")
    zone = "Pacific/Kiritimati"  # UTC+14: never the browser's
    with McpTestServer() as mcp:
        _approval_kit(server, owner, workspace, mcp)
        for budget_id, period, time_zone in (
            ("everything", dispatcher_pb2.BUDGET_PERIOD_TOTAL, ""),
            ("daily", dispatcher_pb2.BUDGET_PERIOD_DAY, zone),
        ):
            server.dispatcher.CreateBudget(
                dispatcher_pb2.CreateBudgetRequest(
                    parent=workspace,
                    budget_id=budget_id,
                    budget=dispatcher_pb2.Budget(
                        display_name=budget_id.title(),
                        scope=workspace,
                        period=period,
                        time_zone=time_zone,
                        total_token_limit=1_000_000,
                    ),
                ),
                metadata=owner.md,
                timeout=CALL_DEADLINE_S,
            )
        everything = f"{workspace}/budgets/everything"
        daily = f"{workspace}/budgets/daily"
        with chromium.open(stack.origin + "/") as browser:
            sign_in(browser, owner.email)
            open_conversation(browser, workspace, conversation)
            ended = send(browser, "an answer that ends")
            run_state(browser, ended, "RUN_STATE_SUCCEEDED")
            browser.click(tid("open-budgets"))
            browser.wait_for(tid("usage-total-row", runs="1"))
            assert browser.count(tid("usage-not-ended")) == 0

            # A script's message pauses for approval after its model call: the open page
            # hears the run's state change and says it has not ended.
            paused = server.dispatcher.SendMessage(
                dispatcher_pb2.SendMessageRequest(
                    conversation=conversation,
                    message=context_pb2.Message(
                        parts=[context_pb2.ContentPart(text='call kit__echo {"message": "later"}')]
                    ),
                ),
                metadata=owner.md,
                timeout=CALL_DEADLINE_S,
            ).run.name
            deadline = time.monotonic() + 60
            while (
                run := server.run(owner, paused)
            ).state != dispatcher_pb2.RUN_STATE_REQUIRES_ACTION:
                assert time.monotonic() < deadline, run
                time.sleep(0.1)  # polling the server's stored run, under a deadline
            browser.wait_for(tid("usage-not-ended", runs="1"))
            note = browser.eval(
                "(s) => document.querySelector(s).textContent", tid("usage-not-ended")
            )
            assert note.startswith("1 run has not ended yet"), note
            total = browser.data(tid("usage-total-row"))
            cap = f"{tid('budget', name=everything)} {tid('budget-cap', cap='total_tokens')}"
            table = int(total["inputTokens"]) + int(total["outputTokens"])
            stored = server.run(owner, ended).usage
            assert (total["runs"], table) == ("1", stored.input_tokens + stored.output_tokens)
            # The paused run's model call is charged already: in the budget, not the table.
            browser.wait(
                "([s, n]) => Number(document.querySelector(s)?.dataset.used) > n", [cap, table]
            )

            # The day's budget resets at midnight in its zone, and says which.
            got = server.dispatcher.GetBudget(
                dispatcher_pb2.GetBudgetRequest(name=daily),
                metadata=owner.md,
                timeout=CALL_DEADLINE_S,
            ).budget
            there = got.usage.reset_time.ToDatetime(UTC).astimezone(ZoneInfo(zone))
            assert (there.hour, there.minute) == (0, 0)
            reset = browser.eval(
                "(s) => document.querySelector(s).textContent",
                f"{tid('budget', name=daily)} {tid('budget-reset')}",
            )
            assert reset.startswith(
                f"Resets {there:%a} {there.day} {there:%b %Y}, 00:00 {zone} ("
            ), reset
            mine = browser.eval("() => Intl.DateTimeFormat().resolvedOptions().timeZone")
            assert reset.endswith(f"{mine}, your time)."), reset

            # Decided and ended: the open page has it in the table, and the totals agree.
            [call] = run.required_action.tool_calls
            server.dispatcher.SubmitToolApprovals(
                dispatcher_pb2.SubmitToolApprovalsRequest(
                    name=paused,
                    approvals=[
                        dispatcher_pb2.ToolApproval(
                            tool_call_id=call.call.id,
                            decision=dispatcher_pb2.TOOL_APPROVAL_DECISION_APPROVE,
                        )
                    ],
                ),
                metadata=owner.md,
                timeout=CALL_DEADLINE_S,
            )
            browser.wait_for(tid("usage-total-row", runs="2"))
            assert browser.count(tid("usage-not-ended")) == 0
            assert server.run(owner, paused).state == dispatcher_pb2.RUN_STATE_SUCCEEDED
            total = browser.data(tid("usage-total-row"))
            table = int(total["inputTokens"]) + int(total["outputTokens"])
            browser.wait(
                "([s, n]) => document.querySelector(s)?.dataset.used === n",
                [cap, str(table)],
            )
            assert problems(browser) == []


def test_files_attached_in_the_page_show_inline_or_as_cards_and_download_byte_for_byte(
    stack: Stack, chromium: Chromium, server: Server, tmp_path: Path
) -> None:
    """A PNG, a PDF and a binary of 2.5 MiB attached from the page (the file chooser),
    uploaded as resumable steps in 1 MiB chunks through Envoy's grpc-web (one chunk failing
    on the way, resumed from GetUpload's committed size), sent with a message: the PNG
    shows inline from the bytes DownloadFile streamed, the PDF as a card whose text is what
    the server extracted, and downloads are the bytes uploaded."""
    user = server.register("files")
    workspace, conversation = server.workspace(user, f"files-{os.getpid()}")
    phrase = "Quarterly otters report"
    files = {
        "otter.png": png_image(24, 16),
        "report.pdf": pdf_document(phrase),
        "blob.bin": os.urandom(5 * 1024 * 1024 // 2),
    }
    uploads = tmp_path / "uploads"
    uploads.mkdir()
    for name, data in files.items():
        (uploads / name).write_bytes(data)
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    with chromium.open(stack.origin + "/", downloads=downloads) as browser:
        sign_in(browser, user.email)
        open_conversation(browser, workspace, conversation)
        # The second chunk sent fails on the way: its upload asks GetUpload where the server
        # is and goes on from there.
        browser.call("failRequest", suffix="/AppendUpload", nth=2)
        browser.call(
            "upload", selector=tid("attach-input"), paths=[str(uploads / n) for n in files]
        )
        # Each uploaded with its progress to the last byte.
        resumes = 0
        for name, data in files.items():
            browser.wait_for(tid("attachment", filename=name, state="stored"))
            shown = browser.data(tid("attachment", filename=name))
            assert shown["sent"] == str(len(data))
            assert shown["file"].startswith(f"{workspace}/files/")
            resumes += int(shown["resumes"])
        assert resumes == 1
        browser.fill(tid("message-input"), "three files")
        browser.click(tid("send"))
        # The message, once stored, names the files; the composer is empty again.
        browser.wait_for(tid("file-image", state="shown"))
        browser.wait("() => document.querySelectorAll('[data-testid=\"file\"]').length === 3")
        assert browser.count(tid("attachment")) == 0
        image = browser.eval(
            "(s) => { const i = document.querySelector(s);"
            " return { w: i.naturalWidth, h: i.naturalHeight, src: i.src.slice(0, 5) }; }",
            tid("file-image"),
        )
        assert image == {"w": 24, "h": 16, "src": "blob:"}
        # The document's text, collapsed until opened, is the server's extraction.
        cards = browser.eval(
            '() => [...document.querySelectorAll(\'[data-testid="file"][data-kind="document"]\')]'
            ".map((c) => ({ file: c.dataset.file,"
            " name: c.querySelector('[data-testid=\"file-name\"]').textContent,"
            " open: c.querySelector('details').open }))"
        )
        assert {c["name"] for c in cards} == {"report.pdf", "blob.bin"}
        assert not any(c["open"] for c in cards)
        report = next(c["file"] for c in cards if c["name"] == "report.pdf")
        browser.click(f"{tid('file', file=report)} summary")
        text = browser.wait(
            "(s) => { const t = document.querySelector(s)?.textContent ?? '';"
            " return t.includes('otters') && t; }",
            f"{tid('file', file=report)} {tid('file-text-body')}",
        )
        assert phrase in text
        assert browser.data(f"{tid('file', file=report)} {tid('file-text')}")["textState"] == (
            "READY"
        )
        browser.screenshot(artifacts_dir(tmp_path) / "console-files.png")
        # Downloads are the bytes uploaded, whichever way the file is shown.
        # The binary's come in 1 MiB frames of DownloadFile through Envoy's grpc-web.
        blob = next(c["file"] for c in cards if c["name"] == "blob.bin")
        for name, selector in (
            ("report.pdf", tid("file", file=report)),
            ("otter.png", tid("file", kind="image")),
            ("blob.bin", tid("file", file=blob)),
        ):
            browser.click(f"{selector} {tid('file-download')}")
            guid = browser.call("downloaded", filename=name)
            assert (downloads / guid).read_bytes() == files[name]
        # The workspace's files, listed beside its assistants; an owner deletes one.
        browser.wait("() => document.querySelectorAll('[data-testid=\"file-entry\"]').length === 3")
        browser.click(f"{tid('file-entry', file=blob)} {tid('delete-file')}")
        browser.click(f"{tid('file-entry', file=blob)} {tid('confirm-delete')}")
        browser.wait("() => document.querySelectorAll('[data-testid=\"file-entry\"]').length === 2")
        # Nothing went wrong on the page but the chunk aborted on purpose, which Chromium logs.
        [aborted] = problems(browser)
        assert "net::ERR_CONNECTION_RESET" in aborted
        network = grpc_web_calls(browser.network(), stack.origin)
    with pytest.raises(grpc.RpcError) as gone:
        server.context.GetFile(
            context_pb2.GetFileRequest(name=blob), metadata=user.md, timeout=CALL_DEADLINE_S
        )
    assert gone.value.code() == grpc.StatusCode.NOT_FOUND
    del files["blob.bin"]
    calls = [method(n) for n in network]
    # Resumable steps (grpc-web cannot stream a request): 1 + 1 + 3 chunks of 1 MiB at most
    # answered (the one that failed on the way never had an answer).
    assert calls.count("StartUpload") == 3
    assert calls.count("AppendUpload") == 5
    assert calls.count("FinishUpload") == 3
    assert calls.count("GetUpload") == 1
    assert {n["status"] for n in network if method(n) == "AppendUpload"} == {200}
    assert all(n.get("grpcStatus", 0) == 0 for n in network if "Upload" in method(n))
    assert {n["protocol"] for n in network} == {"h2"}
    # The server holds the message with its three file parts, and the files.
    [message] = [m for m in server.messages(user, conversation) if m.parts[0].text == "three files"]
    named = {p.file.display_name: p.file for p in message.parts if p.HasField("file")}
    assert set(named) == {*files, "blob.bin"}
    for name, data in files.items():
        stored = server.context.GetFile(
            context_pb2.GetFileRequest(name=named[name].file),
            metadata=user.md,
            timeout=CALL_DEADLINE_S,
        ).file
        assert stored.sha256 == hashlib.sha256(data).hexdigest()
    assert named["otter.png"].mime_type == "image/png"
    assert named["report.pdf"].mime_type == "application/pdf"


def test_a_steer_sent_from_the_page_lands_in_the_running_run_at_its_next_step(
    stack: Stack, chromium: Chromium, server: Server, tmp_path: Path
) -> None:
    """Steer, beside Send while a run is going: the run (the llm handler on the local model
    server) waits for approval of its first step's tool call; a steer written in the
    composer goes to it (SteerRun on that run), shows on its message and its own card as
    accepted; the call approved, the run's second model call takes it: the inspector says
    "steer consumed at step 2", the steer's message links to the run and the step, and the
    server has the same (the steer's run SUCCEEDED, CONSUMED at step 2)."""
    shots = artifacts_dir(tmp_path) / "steer"
    shots.mkdir(parents=True, exist_ok=True)
    user = server.register("steer")
    workspace, conversation = server.workspace(user, f"steer-{os.getpid()}")
    with McpTestServer() as mcp:
        integration = server.integration.CreateIntegration(
            integration_pb2.CreateIntegrationRequest(
                parent=workspace,
                integration_id="kit",
                integration=integration_pb2.Integration(
                    display_name="Tool kit",
                    kind=integration_pb2.INTEGRATION_KIND_MCP_SERVER,
                    endpoint=mcp.url,
                ),
            ),
            metadata=user.md,
            timeout=CALL_DEADLINE_S,
        ).integration.name
        # Its echo tool needs a person: the run stops at its first step boundary until
        # the call is approved, so the steer is there before the second model call.
        server.dispatcher.CreateAssistant(
            dispatcher_pb2.CreateAssistantRequest(
                parent=workspace,
                assistant_id="helper",
                assistant=dispatcher_pb2.Assistant(
                    display_name="Helper",
                    instructions="Use the tools.",
                    tools=[
                        dispatcher_pb2.AssistantTools(
                            integration=integration,
                            tools=["echo"],
                            approval_required_tools=["echo"],
                        )
                    ],
                    workspace_default=True,
                ),
            ),
            metadata=user.md,
            timeout=CALL_DEADLINE_S,
        )
        with chromium.open(stack.origin + "/") as browser:
            sign_in(browser, user.email)
            open_conversation(browser, workspace, conversation)
            # No run going: nothing to steer.
            assert not browser.visible(tid("steer"))
            # The run is asked to cut its answer for a steer (it is paused when the steer
            # comes, so nothing is cut: the steer goes in at the same boundary).
            browser.select(tid("steer-mode"), str(dispatcher_pb2.STEER_MODE_RESTART_STREAM))
            target = send(browser, 'call kit__echo {"message": "first"}')
            assert server.run(user, target).steer_mode == dispatcher_pb2.STEER_MODE_RESTART_STREAM
            pending = f"{tid('approval', run=target)} {tid('pending-call')}"
            browser.wait_for(pending)
            browser.wait_visible(tid("steer", target=target))

            steer_text = "use the other account"
            before = browser.count(tid("run"))
            browser.fill(tid("message-input"), steer_text)
            browser.click(tid("steer"))
            steer_run: str = browser.wait(
                "(n) => { const r = document.querySelectorAll('[data-testid=\"run\"]');"
                " return r.length > n && r[r.length - 1].dataset.run; }",
                before,
            )
            assert steer_run != target
            # Stored at once: the message is in the conversation, waiting for the run.
            landing = tid("steer-landing", target=target)
            browser.wait_for(landing)
            stored = server.run(user, steer_run)
            assert stored.steer.target == target
            assert stored.steer.state in (
                dispatcher_pb2.STEER_STATE_ACCEPTED,
                dispatcher_pb2.STEER_STATE_CONSUMED,
            )
            steer_message = stored.input_message
            assert (
                text_of(
                    next(m for m in server.messages(user, conversation) if m.name == steer_message)
                )
                == steer_text
            )
            assert (
                browser.eval("(s) => document.querySelector(s).value", tid("message-input")) == ""
            )
            # Steering decides nothing: the call still waits for its approval.
            assert server.run(user, target).state == dispatcher_pb2.RUN_STATE_REQUIRES_ACTION
            browser.shots(shots / "accepted.png")

            browser.click(f"{pending} {tid('approve')}")
            done = run_state(browser, target, "RUN_STATE_SUCCEEDED")
            consumed = tid(
                "timeline-entry", kind="steer", steer_state="STEER_STATE_CONSUMED", step="2"
            )
            entry = f"{tid('run', run=target)} {consumed}"
            browser.wait_for(entry)
            said = browser.eval("(s) => document.querySelector(s).textContent", entry)
            assert "steer consumed at step 2" in said
            link = f"{entry} {tid('steer-run')}"
            assert browser.eval("(s) => document.querySelector(s).title", link) == steer_run
            # The model saw the steer after the tool's result: the echo model repeats the
            # last user message, which is the steer.
            assert steer_text in done["answer"] or steer_text in text_of(
                next(
                    m
                    for m in server.messages(user, conversation)
                    if m.name == server.run(user, target).output_message
                )
            )
            # The steer's own card and its message say where it went.
            steer_card = run_state(browser, steer_run, "RUN_STATE_SUCCEEDED")
            assert steer_card["steers"] == "0"
            of = f"{tid('run', run=steer_run)} {tid('steer-of')}"
            assert browser.data(of)["steerState"] == "STEER_STATE_CONSUMED"
            assert browser.data(of)["step"] == "2"
            browser.wait_for(
                tid("steer-landing", target=target, steer_state="STEER_STATE_CONSUMED", step="2")
            )
            assert browser.data(landing)["steerRun"] == steer_run
            assert (
                browser.data(f"{tid('message', name=steer_message)} {tid('steer-landing')}")[
                    "target"
                ]
                == target
            )
            # The server says the same.
            stored = server.run(user, steer_run)
            assert stored.state == dispatcher_pb2.RUN_STATE_SUCCEEDED
            assert stored.steer.state == dispatcher_pb2.STEER_STATE_CONSUMED
            assert stored.steer.step == 2
            # Nothing going any more: nothing to steer.
            browser.wait("(s) => document.querySelector(s).hidden", tid("steer"))
            assert raw_text(browser) == []
            browser.shots(shots / "consumed.png")
            assert problems(browser) == []


def test_schedules_are_made_on_their_page_fire_with_their_runs_and_pause(
    stack: Stack, chromium: Chromium, server: Server, tmp_path: Path
) -> None:
    """The Schedules page (``#workspaces/w/schedules``): a schedule whose cron expression
    does not parse is refused with the server's violation beside the cron field, nothing
    stored; the same one at an interval of 2 s is created (ACTIVE, its next fire time
    shown), its firings list the tick and the run it started (the link opens that run's
    conversation with its card), a save from an editor opened before a change made
    elsewhere is refused as changed elsewhere and done on the current version, and Pause
    pauses it on the server."""
    shots = artifacts_dir(tmp_path) / "schedules"
    shots.mkdir(parents=True, exist_ok=True)
    user = server.register("schedules")
    workspace, _ = server.workspace(user, f"schedules-{os.getpid()}")
    editor = tid("schedule-editor")
    with chromium.open(stack.origin + "/") as browser:
        sign_in(browser, user.email)
        browser.click(tid("workspace-item", name=workspace))
        browser.click(tid("open-schedules"))
        browser.wait_visible(tid("schedules-page"))
        browser.wait_for(tid("schedules-empty"))
        assert browser.eval("() => location.hash") == f"#{workspace}/schedules"

        browser.click(tid("new-schedule"))
        browser.wait_visible(editor)
        browser.fill(f"{editor} {tid('schedule-id')}", "ticker")
        browser.fill(f"{editor} {tid('schedule-name')}", "Ticker")
        browser.select(f"{editor} {tid('schedule-target')}", "handlers/echo")
        browser.fill(f"{editor} {tid('schedule-template')}", "tick for {{schedule}}")
        browser.select(f"{editor} {tid('schedule-kind')}", "cron")
        browser.fill(f"{editor} {tid('schedule-cron')}", "every minute please")
        browser.click(tid("save-schedule"))
        violation = f'{editor} label[data-field="cron"] {tid("field-violation")}'
        browser.wait_for(violation)
        assert browser.data(violation)["field"] == "schedule.cron"
        assert browser.data(f"{editor} {tid('error')}")["code"] == "INVALID_ARGUMENT"
        listed = server.dispatcher.ListSchedules(
            dispatcher_pb2.ListSchedulesRequest(parent=workspace),
            metadata=user.md,
            timeout=CALL_DEADLINE_S,
        )
        assert list(listed.schedules) == []
        browser.shots(shots / "bad-cron.png")

        browser.select(f"{editor} {tid('schedule-kind')}", "interval")
        browser.fill(f"{editor} {tid('schedule-interval')}", "2")
        browser.click(tid("save-schedule"))
        name = f"{workspace}/schedules/ticker"
        entry = tid("schedule", name=name)
        browser.wait_for(f'{entry}[data-state="SCHEDULE_STATE_ACTIVE"]')
        assert not browser.visible(editor)
        stored = server.dispatcher.GetSchedule(
            dispatcher_pb2.GetScheduleRequest(name=name), metadata=user.md, timeout=CALL_DEADLINE_S
        ).schedule
        assert stored.interval.seconds == 2
        assert stored.handler == "handlers/echo"
        assert stored.creator == user.name
        assert browser.data(entry)["next"] != ""

        # Its firings: the page follows SCHEDULE_FIRED and shows each tick's run.
        browser.click(f"{entry} {tid('schedule-firings-toggle')}")
        started = f'{entry} {tid("firing")}[data-outcome="FIRING_OUTCOME_STARTED"]'
        browser.wait("(s) => [...document.querySelectorAll(s)].some((f) => f.dataset.run)", started)
        run = browser.data(started)["run"]
        firings = server.dispatcher.ListScheduleFirings(
            dispatcher_pb2.ListScheduleFiringsRequest(parent=name),
            metadata=user.md,
            timeout=CALL_DEADLINE_S,
        ).firings
        assert run in {f.run for f in firings}
        assert server.run(user, run).schedule == name
        assert raw_text(browser) == []
        browser.shots(shots / "firings.png")

        # Pause: nothing fires until it is resumed (and nothing changes it meanwhile).
        browser.click(f"{entry} {tid('pause-schedule')}")
        browser.wait_for(f'{entry}[data-state="SCHEDULE_STATE_PAUSED"]')
        stored = server.dispatcher.GetSchedule(
            dispatcher_pb2.GetScheduleRequest(name=name), metadata=user.md, timeout=CALL_DEADLINE_S
        ).schedule
        assert stored.state == dispatcher_pb2.SCHEDULE_STATE_PAUSED
        assert not stored.HasField("next_fire_time")
        assert browser.visible(f"{entry} {tid('resume-schedule')}")
        assert raw_text(browser) == []
        browser.shots(shots / "paused.png")

        # Changed elsewhere while the editor is open: refused as such, then saved on the
        # current version.
        browser.click(f"{entry} {tid('edit-schedule')}")
        browser.wait_visible(editor)
        current = server.dispatcher.GetSchedule(
            dispatcher_pb2.GetScheduleRequest(name=name), metadata=user.md, timeout=CALL_DEADLINE_S
        ).schedule
        server.dispatcher.UpdateSchedule(
            dispatcher_pb2.UpdateScheduleRequest(
                schedule=dispatcher_pb2.Schedule(
                    name=name, etag=current.etag, display_name="Ticker (renamed elsewhere)"
                ),
                update_mask=field_mask_pb2.FieldMask(paths=["display_name"]),
            ),
            metadata=user.md,
            timeout=CALL_DEADLINE_S,
        )
        browser.fill(f"{editor} {tid('schedule-template')}", "tock for {{schedule}}")
        browser.click(tid("save-schedule"))
        conflict = f"{editor} {tid('etag-conflict')}"
        browser.wait_for(conflict)
        assert browser.data(f"{editor} {tid('error')}")["reason"] == "ERROR_REASON_ETAG_MISMATCH"
        assert (
            server.dispatcher.GetSchedule(
                dispatcher_pb2.GetScheduleRequest(name=name),
                metadata=user.md,
                timeout=CALL_DEADLINE_S,
            ).schedule.message_template
            == "tick for {{schedule}}"
        )
        browser.click(tid("reload-schedule"))
        browser.wait(
            "(s) => document.querySelector(s)?.value === 'Ticker (renamed elsewhere)'",
            f"{editor} {tid('schedule-name')}",
        )
        browser.fill(f"{editor} {tid('schedule-template')}", "tock for {{schedule}}")
        browser.click(tid("save-schedule"))
        browser.wait("(s) => document.querySelector(s).hidden", editor)
        stored = server.dispatcher.GetSchedule(
            dispatcher_pb2.GetScheduleRequest(name=name), metadata=user.md, timeout=CALL_DEADLINE_S
        ).schedule
        assert stored.message_template == "tock for {{schedule}}"
        assert stored.display_name == "Ticker (renamed elsewhere)"

        # The firing's run link opens its conversation with the run's card.
        browser.wait_for(f"{entry} {tid('firing-run', run=run)}")
        browser.click(f"{entry} {tid('firing-run', run=run)}")
        browser.wait_visible(tid("run", run=run))
        assert browser.eval("() => location.hash") == f"#{run.split('/runs/')[0]}"
        assert problems(browser) == []


#: How the page writes a moment (a schedule's fire times): its weekday, date and time in
#: one zone, in words that do not depend on the browser's language.
WEEKDAYS: Final = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
MONTHS: Final = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def clock(moment: datetime, zone: str, *, seconds: bool) -> str:
    """``Mon 30 Nov 2026, 08:00`` (``08:00:02`` with ``seconds``), in the zone ``zone``."""
    local = moment.astimezone(ZoneInfo(zone))
    time_of_day = f"{local:%H:%M:%S}" if seconds else f"{local:%H:%M}"
    day = f"{WEEKDAYS[local.weekday()]} {local.day} {MONTHS[local.month - 1]} {local.year}"
    return f"{day}, {time_of_day}"


#: What lies outside its own box among what the elements ``selector`` finds hold: each
#: descendant element, and each piece of text (its lines' boxes), that reaches past the
#: element's edges.
OVERFLOW_JS: Final = """(selector) => {
  const out = [];
  for (const box of document.querySelectorAll(selector)) {
    if (!box.checkVisibility()) continue;
    const r = box.getBoundingClientRect();
    const inside = (o) => o.left >= r.left - 0.5 && o.right <= r.right + 0.5
      && o.top >= r.top - 0.5 && o.bottom <= r.bottom + 0.5;
    const walker = document.createTreeWalker(box, NodeFilter.SHOW_ELEMENT | NodeFilter.SHOW_TEXT);
    for (let node = walker.nextNode(); node; node = walker.nextNode()) {
      let rects;
      if (node.nodeType === Node.TEXT_NODE) {
        if (!node.textContent.trim()) continue;
        const range = document.createRange();
        range.selectNodeContents(node);
        rects = [...range.getClientRects()];
      } else {
        if (!node.checkVisibility()) continue;
        rects = [node.getBoundingClientRect()];
      }
      if (rects.some((o) => o.width > 0 && !inside(o))) {
        out.push(`${box.dataset.testid}: ${node.textContent.trim().slice(0, 80)}`);
      }
    }
  }
  return out;
}"""


def overflowing(browser: Page, selector: str) -> list[str]:
    found: list[str] = browser.eval(OVERFLOW_JS, selector)
    return found


def test_a_schedules_times_read_as_dates_in_its_own_zone_and_its_titles_fit_their_cards(
    stack: Stack, chromium: Chromium, server: Server, tmp_path: Path
) -> None:
    """In a browser whose clock is in New York: a weekday cron schedule in Europe/Berlin
    shows its next fire times as dates at 08:00 in Berlin, the zone named, exactly the
    server's ``upcoming_fire_times``; an interval schedule (no zone of its own) names the
    browser's. A per-run schedule's conversations, titled with their tick's time, fit
    their cards in the workspace's overview at a desktop's width and a phone's."""
    shots = artifacts_dir(tmp_path) / "schedules"
    shots.mkdir(parents=True, exist_ok=True)
    user = server.register("schedule-times")
    workspace, _ = server.workspace(user, f"schedule-times-{os.getpid()}")

    def create(schedule_id: str, schedule: dispatcher_pb2.Schedule) -> str:
        name: str = server.dispatcher.CreateSchedule(
            dispatcher_pb2.CreateScheduleRequest(
                parent=workspace, schedule_id=schedule_id, schedule=schedule
            ),
            metadata=user.md,
            timeout=CALL_DEADLINE_S,
        ).schedule.name
        return name

    def get(name: str) -> dispatcher_pb2.Schedule:
        found: dispatcher_pb2.Schedule = server.dispatcher.GetSchedule(
            dispatcher_pb2.GetScheduleRequest(name=name), metadata=user.md, timeout=CALL_DEADLINE_S
        ).schedule
        return found

    weekdays = create(
        "weekday-digest",
        dispatcher_pb2.Schedule(
            display_name="Weekday digest",
            handler="handlers/echo",
            message_template="digest for {{date}}",
            cron="0 8 * * 1-5",
            time_zone="Europe/Berlin",
        ),
    )
    title = "Standup notes for the platform team"
    per_run = create(
        "standup",
        dispatcher_pb2.Schedule(
            display_name=title,
            handler="handlers/echo",
            message_template="notes for {{date}}",
            interval=duration_pb2.Duration(seconds=1),
            conversation_mode=dispatcher_pb2.SCHEDULE_CONVERSATION_MODE_PER_RUN,
        ),
    )
    with chromium.open(stack.origin + "/") as browser:
        browser.call("timezone", timeZone="America/New_York")
        sign_in(browser, user.email)
        browser.wait_visible(tid("workspace-overview", workspace=workspace))
        # A tick's own conversation, titled with the tick's time (a long unbroken token).
        titled = browser.wait(
            "([s, title]) => [...document.querySelectorAll(s)]"
            ".find((c) => c.textContent.startsWith(`${title} · `))?.dataset.name",
            [tid("overview-conversation"), title],
        )
        server.dispatcher.PauseSchedule(
            dispatcher_pb2.PauseScheduleRequest(name=per_run),
            metadata=user.md,
            timeout=CALL_DEADLINE_S,
        )
        browser.wait_visible(tid("overview-conversation", name=titled))
        assert overflowing(browser, tid("overview-conversation")) == []
        browser.viewport(PHONE_WIDTH, 900)
        browser.wait_stacked()
        assert overflowing(browser, tid("overview-conversation")) == []
        browser.screenshot(shots / f"per-run-titles-{PHONE_WIDTH}.png")
        browser.viewport(DESKTOP_WIDTH, 900)
        browser.screenshot(shots / "per-run-titles.png")

        browser.click(tid("open-schedules"))
        browser.wait_visible(tid("schedules-page"))
        entry = tid("schedule", name=weekdays)
        browser.wait_visible(entry)
        stored = get(weekdays)
        ticks = [t.ToDatetime(tzinfo=UTC) for t in stored.upcoming_fire_times]
        assert len(ticks) > 1
        assert stored.next_fire_time.ToDatetime(tzinfo=UTC) == ticks[0]
        berlin = [clock(t, "Europe/Berlin", seconds=False) for t in ticks]
        # The server's times, read in Berlin: weekdays at eight.
        assert all(b.endswith(", 08:00") and b[:3] not in ("Sat", "Sun") for b in berlin)
        shown = browser.eval(
            "(s) => document.querySelector(s).textContent", f"{entry} {tid('schedule-next')}"
        )
        assert shown == f"Next: {berlin[0]} (Europe/Berlin); then {' · '.join(berlin[1:])}"
        moments = browser.eval(
            "(s) => [...document.querySelectorAll(s)].map((t) => t.dateTime)",
            f"{entry} {tid('schedule-next')} time",
        )
        assert [datetime.fromisoformat(m) for m in moments] == ticks

        # The interval schedule has no zone: its times are the browser's, named.
        paused = tid("schedule", name=per_run, state="SCHEDULE_STATE_PAUSED")
        browser.wait_visible(paused)
        last = get(per_run).last_fire_time.ToDatetime(tzinfo=UTC)
        seconds = last.astimezone(ZoneInfo("America/New_York")).second != 0
        last_shown = browser.eval(
            "(s) => document.querySelector(s).textContent", f"{paused} {tid('schedule-last')}"
        )
        assert last_shown.startswith(
            f"Last fired {clock(last, 'America/New_York', seconds=seconds)} (America/New_York)"
        ), last_shown
        assert raw_text(browser) == []
        browser.shots(shots / "schedule-times.png")
        assert problems(browser) == []


def test_search_with_the_mode_switch_shows_each_result_with_its_source(
    stack: Stack, chromium: Chromium, server: Server, tmp_path: Path
) -> None:
    """The Search page (``#workspaces/w/search``): full-text finds a workspace fact and
    shows it as a memory fact of the workspace, with its score and full-text rank; the
    semantic switch, with no embeddings endpoint on this stack, shows the fallback to
    full-text and why; a filter on an unknown field is the server's INVALID_ARGUMENT."""
    shots = artifacts_dir(tmp_path) / "search"
    shots.mkdir(parents=True, exist_ok=True)
    user = server.register("search")
    workspace, conversation = server.workspace(user, f"search-{os.getpid()}")
    fact = server.context.CreateMemoryItem(
        context_pb2.CreateMemoryItemRequest(
            parent=workspace,
            memory_item=context_pb2.MemoryItem(
                kind=context_pb2.MEMORY_KIND_FACT, content="The ferry to the island leaves at nine"
            ),
        ),
        metadata=user.md,
        timeout=CALL_DEADLINE_S,
    ).memory_item
    server.context.CreateMemoryItem(
        context_pb2.CreateMemoryItemRequest(
            parent=conversation,
            memory_item=context_pb2.MemoryItem(
                kind=context_pb2.MEMORY_KIND_PREFERENCE, content="Prefers the ferry's upper deck"
            ),
        ),
        metadata=user.md,
        timeout=CALL_DEADLINE_S,
    )
    result = tid("search-result")
    with chromium.open(stack.origin + "/") as browser:
        sign_in(browser, user.email)
        browser.click(tid("workspace-item", name=workspace))
        browser.click(tid("open-search"))
        browser.wait_visible(tid("search-page"))
        assert browser.eval("() => location.hash") == f"#{workspace}/search"

        browser.fill(tid("search-query"), "ferry island")
        browser.click(tid("search-mode-full-text"))
        browser.click(tid("run-search"))
        browser.wait_for(f'{result}[data-kind="memory"]')
        texts = browser.eval(
            "(s) => [...document.querySelectorAll(s)].map((r) => r.innerText)", result
        )
        first = texts[0]
        assert "The ferry to the island leaves at nine" in first
        assert "memory · fact · workspace memory" in first
        assert "full-text #1" in first
        assert "score " in first
        assert not browser.visible(tid("search-fallback"))
        assert fact.content in first
        # The conversation's own memory links to its conversation.
        assert browser.count(f"{result} {tid('result-conversation')}") == 1
        browser.shots(shots / "full-text.png")

        browser.click(tid("search-mode-semantic"))
        browser.click(tid("run-search"))
        browser.wait_visible(tid("search-fallback"))
        assert browser.data(tid("search-fallback"))["reason"] == "NOT_CONFIGURED"
        assert "ranked full-text" in browser.eval(
            "(s) => document.querySelector(s).innerText", tid("search-status")
        )
        assert browser.count(result) == 2
        browser.shots(shots / "semantic-fell-back.png")

        browser.fill(tid("search-filter"), "colour = blue")
        browser.click(tid("run-search"))
        browser.wait_for(f"{tid('search-problem')} {tid('error')}")
        assert browser.data(f"{tid('search-problem')} {tid('error')}")["code"] == "INVALID_ARGUMENT"
        assert browser.count(result) == 0
        assert raw_text(browser) == []
        browser.shots(shots / "bad-filter.png")
