"""A real webhook receiver for the tests: an HTTP server on a free port that verifies
every request with the ``standardwebhooks`` library, as a customer's would.

Each endpoint (``/hooks/<name>``) has the secrets that must each verify every
request on their own (two during a secret rotation), secrets that must no
longer verify, and a failure plan (the first N requests answer 503, or all
of them). It records what it accepted in arrival order, how often each
``webhook-id`` was tried, and every request that did not verify (a test
asserts there were none).

An endpoint may also answer as a webhook tool does: ``answer`` makes the
response of each accepted request (a path under the endpoint, as a tool's
``path`` adds, is recorded with it).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from standardwebhooks.webhooks import Webhook, WebhookVerificationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tests.conftest import CALL_DEADLINE_S

# A ceiling, not a wait: generous, because retries back off and a loaded machine
# (four test workers on two cores) can take many seconds to run them.
DEADLINE_S = 90.0


@dataclass
class Received:
    """One accepted delivery."""

    webhook_id: str
    body: dict[str, Any]
    headers: dict[str, str]
    #: What followed the endpoint's own path ("" for none).
    path: str = ""


@dataclass
class Endpoint:
    """What one path expects and what it saw."""

    name: str
    #: Every one of these must verify each request.
    secrets: list[str]
    #: None of these may verify a request (a rotated-out secret).
    rejected: list[str] = field(default_factory=list)
    #: Answer the first this many requests with ``fail_status``.
    fail_first: int = 0
    fail_status: int = 503
    retry_after: str | None = None
    #: Answer every request with ``fail_status``.
    always_fail: bool = False
    #: Hold each answer this long (a slow receiver).
    delay_s: float = 0.0
    #: The answer to each accepted request (a webhook tool's); None: 204.
    answer: Callable[[Received], Response] | None = None
    requests: int = 0
    accepted: list[Received] = field(default_factory=list)
    attempts: collections.Counter[str] = field(default_factory=collections.Counter)
    bad: list[str] = field(default_factory=list)

    @property
    def ids(self) -> list[str]:
        """Accepted ``webhook-id``s in arrival order (repeats included)."""
        return [item.webhook_id for item in self.accepted]

    def first_ids(self) -> list[str]:
        """Accepted ids in the order of their first acceptance (repeats dropped)."""
        return list(dict.fromkeys(self.ids))


class WebhookReceiver:
    """The server; ``url(name)`` is where an endpoint receives."""

    def __init__(self) -> None:
        self.endpoints: dict[str, Endpoint] = {}
        app = Starlette(
            routes=[
                Route("/hooks/{name}", self._handle, methods=["POST"]),
                Route("/hooks/{name}/{path:path}", self._handle, methods=["POST"]),
            ]
        )
        config = uvicorn.Config(
            app, host="127.0.0.1", port=0, log_level="warning", lifespan="off", access_log=False
        )
        self._server = uvicorn.Server(config)
        self._task: asyncio.Task[None] | None = None
        self.port = 0

    def endpoint(self, name: str, secrets: list[str], **options: Any) -> Endpoint:
        endpoint = Endpoint(name, list(secrets), **options)
        self.endpoints[name] = endpoint
        return endpoint

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/hooks/{name}"

    async def start(self) -> None:
        self._task = asyncio.create_task(self._server.serve())
        deadline = time.monotonic() + DEADLINE_S
        while not self._server.started:
            if self._task.done() or time.monotonic() > deadline:
                raise RuntimeError("the webhook receiver did not start")
            await asyncio.sleep(0.01)  # polling the server's start flag
        (server,) = self._server.servers
        self.port = server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        self._server.should_exit = True
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                async with asyncio.timeout(CALL_DEADLINE_S):
                    await self._task

    async def _handle(self, request: Request) -> Response:
        endpoint = self.endpoints.get(request.path_params["name"])
        if endpoint is None:
            return Response(status_code=404)
        body = await request.body()
        headers = dict(request.headers)
        webhook_id = headers.get("webhook-id", "")
        parsed: Any = None
        if not endpoint.secrets:
            # An endpoint that checks no signature (an A2A push config with a bearer
            # credential): the body as it came.
            try:
                parsed = json.loads(body)
            except ValueError:
                endpoint.bad.append(f"{webhook_id}: the body is not JSON")
                return Response("not JSON", status_code=400)
        for secret in endpoint.secrets:
            try:
                parsed = Webhook(secret).verify(body, headers)
            except WebhookVerificationError as exc:
                endpoint.bad.append(f"{webhook_id}: {exc}")
                return Response("signature does not verify", status_code=401)
        for secret in endpoint.rejected:
            with contextlib.suppress(WebhookVerificationError):
                Webhook(secret).verify(body, headers)
                endpoint.bad.append(f"{webhook_id}: a rotated-out secret still verifies")
        endpoint.requests += 1
        endpoint.attempts[webhook_id] += 1
        if endpoint.delay_s:
            await asyncio.sleep(endpoint.delay_s)  # the slow receiver under test
        if endpoint.always_fail or endpoint.requests <= endpoint.fail_first:
            extra = {"retry-after": endpoint.retry_after} if endpoint.retry_after else {}
            return Response("try later", status_code=endpoint.fail_status, headers=extra)
        received = Received(webhook_id, parsed, headers, request.path_params.get("path", ""))
        endpoint.accepted.append(received)
        if endpoint.answer is not None:
            return endpoint.answer(received)
        return Response(status_code=204)


@contextlib.asynccontextmanager
async def running_receiver() -> AsyncIterator[WebhookReceiver]:
    receiver = WebhookReceiver()
    await receiver.start()
    try:
        yield receiver
    finally:
        await receiver.close()


async def until(condition: Callable[[], bool], what: str, timeout_s: float = DEADLINE_S) -> None:
    """Wait for ``condition`` (polled); fail naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)  # polling a condition with a deadline
