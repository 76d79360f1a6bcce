"""A real browser through Envoy: why browsers belong on the TLS listener.

Debian's Chromium (headless, driven by puppeteer-core: tests/browser/drive.mjs)
loads tests/browser/edge.html from a small HTTP server of this test, an origin
Envoy's CORS policy allows, and speaks grpc-web with ``fetch`` to a real
``switchboard serve --dev`` behind a real Envoy (``EnvoyProcess(tls=True)``).

- TLS listener (ALPN h2, the dev certificate trusted by its key hash only):
  12 Subscribe streams each get a heartbeat, a CreateApiKey call completes well
  within its deadline, every stream gets its event, and Resource Timing says
  ``h2``.
- Plain listener (HTTP/1.1): with 6 Subscribe streams open, Chromium's 6
  connections per origin are all taken, so the same call is still queued inside
  the browser at its deadline; once the streams close it goes through.

The page keeps everything it saw and the test decodes it with the generated
classes. A screenshot of the page is written under ``SWITCHBOARD_TEST_ARTIFACTS``
(else the test's tmp_path).
"""

from __future__ import annotations

import base64
import json
import subprocess
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Final, TypeVar

import pytest
from google.protobuf.message import Message

from switchboard.api.auth.v1 import auth_pb2
from switchboard.api.events.v1 import events_pb2
from switchboard.deploy.edge.envoy import PLAIN_LISTENER, TLS_LISTENER
from tests.conftest import CALL_DEADLINE_S
from tests.e2e.chromium import artifacts_dir, required, spki_sha256
from tests.e2e.envoy import EnvoyProcess
from tests.e2e.procs import ROOT, ServeProcess
from tests.kits.authkit import PASSWORD, unique_email

pytestmark = pytest.mark.e2e

BROWSER_DIR: Final = ROOT / "tests" / "browser"
PAGE: Final = BROWSER_DIR / "edge.html"
DRIVER: Final = BROWSER_DIR / "drive.mjs"
PUPPETEER: Final = BROWSER_DIR / "node_modules" / "puppeteer-core" / "package.json"
HEARTBEAT_S: Final = 0.5
#: Over HTTP/2 one connection carries them all.
H2_STREAMS: Final = 12
#: Chromium's limit of HTTP/1.1 connections per origin (net::ClientSocketPoolManager).
HTTP1_STREAMS: Final = 6
#: A unary call's deadline on the page; over HTTP/2 it completes far sooner.
DEADLINE_MS: Final = 3_000
#: How long the driver waits for any one page condition (streams' frames, a call).
WAIT_MS: Final = int(CALL_DEADLINE_S * 1000)
#: Above WAIT_MS, so a condition that never comes fails with the driver's own message.
DRIVER_TIMEOUT_S: Final = 2 * CALL_DEADLINE_S

M = TypeVar("M", bound=Message)


class _PageHandler(BaseHTTPRequestHandler):
    """Serves the one page; anything else is 404."""

    def do_GET(self) -> None:
        if self.path != "/":
            self.send_error(HTTPStatus.NOT_FOUND)
            return
        body = PAGE.read_bytes()
        self.send_response(HTTPStatus.OK)
        self.send_header("content-type", "text/html; charset=utf-8")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the test's output is the page's results."""


@contextmanager
def page_server() -> Iterator[str]:
    """The page's origin, http://127.0.0.1:PORT on a port bound here (no pick-then-bind)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _PageHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=CALL_DEADLINE_S)


def drive(config: dict[str, Any]) -> dict[str, Any]:
    """Run the puppeteer driver; its one JSON object, or fail with what it printed."""
    if not PUPPETEER.is_file():
        pytest.fail("puppeteer-core is not installed; run `make tools` (scripts/install-tools.sh)")
    node = required("node", "scripts/install-deps.sh")
    driver = subprocess.Popen(
        [node, str(DRIVER), json.dumps(config)],
        cwd=BROWSER_DIR,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        stdout, stderr = driver.communicate(timeout=DRIVER_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        # SIGTERM: puppeteer closes Chromium on it (a SIGKILL would leave that to the pipe).
        driver.terminate()
        stdout, stderr = driver.communicate(timeout=10)
        pytest.fail(f"the browser driver ran past {DRIVER_TIMEOUT_S}s: {stderr}")
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait(timeout=CALL_DEADLINE_S)
    assert driver.returncode == 0, f"driver exited {driver.returncode}: {stderr}"
    result: dict[str, Any] = json.loads(stdout)
    assert "error" not in result, json.dumps(result, indent=1)
    return result


def _message(cls: type[M], encoded: str) -> M:
    assert encoded, f"the page saw no {cls.DESCRIPTOR.name}"
    return cls.FromString(base64.b64decode(encoded))


def _assert_heartbeats(streams: list[dict[str, Any]], count: int) -> None:
    assert len(streams) == count
    for stream in streams:
        assert not stream["ended"], stream
        first = _message(events_pb2.SubscribeResponse, stream.get("heartbeat", ""))
        assert first.WhichOneof("frame") == "heartbeat"


def _calls(network: list[dict[str, Any]]) -> dict[str, int]:
    """How many responses each method got, by its short name."""
    return dict(Counter(n["path"].rsplit("/", 1)[1] for n in network))


def test_chromium_keeps_12_streams_and_calls_on_tls_but_runs_out_over_http1(
    tmp_path: Path,
) -> None:
    chromium = required("chromium", "scripts/install-deps.sh")
    screenshot = artifacts_dir(tmp_path) / "browser-edge.png"
    env = {
        "SWITCHBOARD_EVENTS_HEARTBEAT_S": str(HEARTBEAT_S),
        "SWITCHBOARD_DISPATCHER_HEARTBEAT_S": str(HEARTBEAT_S),
    }
    with (
        ServeProcess("--dev", env=env) as serve,
        page_server() as origin,
        EnvoyProcess(serve.address, allow_origins=(origin,), tls=True) as envoy,
    ):
        run = {"password": PASSWORD, "deadlineMs": DEADLINE_MS}
        result = drive(
            {
                "chromium": chromium,
                "page": origin + "/",
                "spki": spki_sha256(envoy.cert_file),
                "screenshot": str(screenshot),
                "waitMs": WAIT_MS,
                "tls": {
                    **run,
                    "base": envoy.tls_url,
                    "email": unique_email("browser-h2"),
                    "streams": H2_STREAMS,
                },
                "plain": {
                    **run,
                    "base": envoy.url,
                    "email": unique_email("browser-http1"),
                    "streams": HTTP1_STREAMS,
                },
            }
        )
        stats = envoy.stats("http.grpc_web")
    print(f"browser screenshot: {screenshot}")
    assert screenshot.stat().st_size > 0

    # TLS: every stream open, and the call completes within its deadline ...
    tls = result["tls"]
    assert tls["register"]["code"] == 0
    created = tls["created"]
    assert created.get("code") == 0, created
    assert created["ms"] < DEADLINE_MS
    key = _message(auth_pb2.CreateApiKeyResponse, created["reply"]).api_key
    assert key.display_name == "browser-h2"
    # ... and each of the 12 streams saw its event.
    for stream in tls["streams"]:
        batch = _message(events_pb2.SubscribeResponse, stream.get("batch", ""))
        [event] = batch.batch.events
        assert event.security.kind == events_pb2.SECURITY_EVENT_KIND_API_KEY_CREATED
        assert event.security.api_key == key.name
    _assert_heartbeats(tls["streams"], H2_STREAMS)
    # One HTTP/2 connection carried every call and stream (DevTools' network events) ...
    assert _calls(tls["network"]) == {"Register": 1, "Subscribe": H2_STREAMS, "CreateApiKey": 1}
    assert {n["protocol"] for n in tls["network"]} == {"h2"}, tls["network"]
    assert len({n["connection"] for n in tls["network"]}) == 1, tls["network"]
    # ... which the page's own Resource Timing agrees with, where Chromium shows it: for a
    # cross-origin response without Timing-Allow-Origin, nextHopProtocol is "".
    assert {p["path"].rsplit("/", 1)[1] for p in tls["protocols"]} == {"Register", "CreateApiKey"}
    assert {p["protocol"] for p in tls["protocols"]} <= {"h2", ""}, tls["protocols"]
    assert stats[f"http.{TLS_LISTENER}.downstream_cx_http1_total"] == 0

    # Plain HTTP/1.1: 6 open streams take every connection the origin gets ...
    plain = result["plain"]
    assert plain["register"]["code"] == 0
    _assert_heartbeats(plain["streams"], HTTP1_STREAMS)
    blocked = plain["blocked"]
    assert blocked.get("error") == "AbortError", blocked
    assert blocked["ms"] >= DEADLINE_MS * 0.9
    # ... and the same call, once they are closed, goes through.
    after = plain["after"]
    assert after.get("code") == 0, after
    assert _message(auth_pb2.CreateApiKeyResponse, after["reply"]).api_key.name
    streams = [n for n in plain["network"] if n["path"].endswith("/Subscribe")]
    assert len(streams) == HTTP1_STREAMS
    assert {n["protocol"] for n in plain["network"]} == {"http/1.1"}, plain["network"]
    assert len({n["connection"] for n in streams}) == HTTP1_STREAMS, streams
    assert {p["protocol"] for p in plain["protocols"]} <= {"http/1.1", ""}, plain["protocols"]
    assert stats[f"http.{PLAIN_LISTENER}.downstream_cx_http2_total"] == 0
