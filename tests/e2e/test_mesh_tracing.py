"""One request across the mesh is one trace: Envoy, the dispatcher, the context service
in another process and a remote expert, exported by each to a real OTLP receiver.

Separate real processes, each exporting with its own ``service.name``
(tests/infra/otlp.py): the context process (auth, context, events, integration),
a dispatcher process that reaches the context service by address
(``SWITCHBOARD_CONTEXT_ADDRESS``), both on one PostgreSQL and one Redis with
shared signing keys; a remote domain expert (examples/expert/expert.py's
servicer, served with this module's ``__main__`` by a process that traces its
calls with Switchboard's telemetry and prints the ``traceparent`` each call
brought); Envoy in front, in the mesh shape, with its OpenTelemetry tracer.

The client sends SendMessage through Envoy with a ``traceparent`` of its own,
routed to the expert. The trace then reads::

    client span (the test's traceparent)
    └─ switchboard-envoy SERVER ingress
       └─ switchboard-envoy CLIENT router dispatcher egress
          └─ dispatcher SERVER .../DispatcherService/SendMessage
             ├─ dispatcher CLIENT .../ContextService/<M>
             │  └─ context SERVER .../ContextService/<M>
             └─ dispatcher "run weather"
                ├─ dispatcher CLIENT .../ContextService/<M>  → context SERVER
                └─ dispatcher CLIENT .../HandlerService/Handle
                   └─ expert SERVER .../HandlerService/Handle

``Run.trace_id`` is the client's trace id, and the JSON log lines of both
Switchboard processes for that request carry it.
"""

from __future__ import annotations

import asyncio
import os
import queue
import secrets
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Final

import pytest
from grpc import aio

from switchboard.api.auth.v1 import auth_pb2, auth_pb2_grpc
from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.deploy.edge.envoy import ENVOY_SERVICE_NAME
from tests.conftest import CALL_DEADLINE_S
from tests.e2e.envoy import EnvoyProcess
from tests.e2e.expertproc import ListeningProcess
from tests.e2e.procs import ROOT, ServeProcess, shared_secrets
from tests.infra.otlp import OtlpReceiver, Span, traceparent
from tests.infra.redis import RedisServer
from tests.kits.authkit import PASSWORD, unique_email
from tests.kits.contextkit import Caller, context_stub, create_conversation, create_workspace
from tests.kits.dispatchkit import dispatcher_stub, request, watch_all

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

CONTEXT_SERVICE: Final = "mesh-context"
DISPATCHER_SERVICE: Final = "mesh-dispatcher"
EXPERT_SERVICE: Final = "mesh-expert"
EXPERT_ID: Final = "weather"
SEND: Final = "/switchboard.api.dispatcher.v1.DispatcherService/SendMessage"
CONTEXT_PREFIX: Final = "/switchboard.api.context.v1.ContextService/"
HANDLE: Final = "/switchboard.api.handler.v1.HandlerService/Handle"
#: What the expert prints on stdout for each call it gets (after ``LISTENING <port>``).
CALL_LINE: Final = "CALL"


class TracedExpert(ListeningProcess):
    """The example expert's servicer in a process of its own (this module's ``__main__``),
    its calls traced by Switchboard's telemetry from the ``OTEL_*`` variables."""

    def __init__(self, env: dict[str, str]) -> None:
        super().__init__("switchboard-traced-expert-")
        self.extra_env = env

    def start(self) -> TracedExpert:
        env = {**os.environ, **self.extra_env}
        paths = [str(ROOT), str(ROOT / "services"), str(ROOT / "gen"), env.get("PYTHONPATH", "")]
        env["PYTHONPATH"] = os.pathsep.join(path for path in paths if path)
        argv = [sys.executable, "-m", "tests.e2e.test_mesh_tracing", "--id", EXPERT_ID]
        self._launch(argv, "the traced expert", env=env, cwd=ROOT)
        return self

    def traceparent_of(self, method: str, timeout_s: float = CALL_DEADLINE_S) -> str:
        """The ``traceparent`` the next call of ``method`` brought ("-" for none), as the
        expert printed it (every call to it before that one is passed over)."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                line = self._stdout.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail(f"the expert printed no {method} within {timeout_s}s; {self._stderr()}")
            if line is None:
                pytest.fail(f"the expert exited before printing {method}; {self._stderr()}")
            word, _, rest = line.partition(" ")
            called, _, sent = rest.partition(" ")
            if word == CALL_LINE and called == method:
                return sent


@pytest.fixture
def shared(tmp_path: Path, postgres_url: str, redis_server: RedisServer) -> dict[str, str]:
    """What both Switchboard processes share: keys, the database and Redis."""
    return {
        **shared_secrets(tmp_path),
        "SWITCHBOARD_DATABASE_URL": postgres_url,
        "SWITCHBOARD_REDIS_URL": redis_server.url,
    }


@pytest.fixture
def otlp() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as receiver:
        yield receiver


async def _sign_up(channel: aio.Channel) -> Caller:
    answer = await auth_pb2_grpc.AuthServiceStub(channel).Register(
        auth_pb2.RegisterRequest(email=unique_email("traced"), password=PASSWORD),
        timeout=CALL_DEADLINE_S,
    )
    return Caller(answer.user.name.removeprefix("users/"), answer.tokens.access_token)


def _log_line(
    process: ServeProcess, match: Callable[[dict[str, Any]], bool], what: str
) -> dict[str, Any]:
    """The first JSON log line of ``process`` that ``match`` accepts, waiting (bounded) on
    its stderr for one that has not been written yet."""
    for seen in process.log:
        if match(seen):
            return seen
    deadline = time.monotonic() + CALL_DEADLINE_S
    while True:
        try:
            entry = process.lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            pytest.fail(f"no log line of {what} within {CALL_DEADLINE_S}s; log: {process.log}")
        if entry is None:
            pytest.fail(f"the process ended before logging {what}; log: {process.log}")
        process.log.append(entry)
        if match(entry):
            return entry


def _one(spans: Sequence[Span], what: str, tree: str) -> Span:
    assert len(spans) == 1, f"expected one {what}, got {len(spans)}:\n{tree}"
    return spans[0]


def _under(span: Span, ancestor: Span, by_id: dict[str, Span]) -> bool:
    """Whether ``ancestor`` is on ``span``'s chain of parents."""
    seen = span
    while seen.parent_span_id in by_id:
        seen = by_id[seen.parent_span_id]
        if seen.span_id == ancestor.span_id:
            return True
    return False


def _complete(spans: list[Span]) -> bool:
    """Every hop's span has arrived: Envoy's two, the dispatcher's call and run, the
    expert's server span and context server spans both inside the call and inside the run."""

    def has(service: str, kind: str, test: Callable[[str], bool]) -> int:
        return sum(1 for s in spans if s.service == service and s.kind == kind and test(s.name))

    def is_context(name: str) -> bool:
        return name.startswith(CONTEXT_PREFIX)

    return (
        has(ENVOY_SERVICE_NAME, "SERVER", lambda _: True) >= 1
        and has(ENVOY_SERVICE_NAME, "CLIENT", lambda _: True) >= 1
        and has(DISPATCHER_SERVICE, "SERVER", lambda n: n == SEND) >= 1
        and has(DISPATCHER_SERVICE, "INTERNAL", lambda n: n == f"run {EXPERT_ID}") >= 1
        and has(DISPATCHER_SERVICE, "CLIENT", lambda n: n == HANDLE) >= 1
        and has(EXPERT_SERVICE, "SERVER", lambda n: n == HANDLE) >= 1
        # The context service's spans for the dispatcher's calls, and that they match.
        and has(CONTEXT_SERVICE, "SERVER", is_context) >= 2
        and has(CONTEXT_SERVICE, "SERVER", is_context)
        == has(DISPATCHER_SERVICE, "CLIENT", is_context)
    )


async def test_one_request_is_one_trace_across_envoy_dispatcher_context_and_expert(
    shared: dict[str, str], otlp: OtlpReceiver
) -> None:
    trace_id, client_span = secrets.token_hex(16), secrets.token_hex(8)
    with (
        TracedExpert(otlp.env(EXPERT_SERVICE)) as expert,
        ServeProcess(
            "--services",
            "auth,context,events,integration",
            env={**shared, **otlp.env(CONTEXT_SERVICE)},
        ) as context_process,
        ServeProcess(
            "--services",
            "dispatcher",
            env={
                **shared,
                **otlp.env(DISPATCHER_SERVICE),
                "SWITCHBOARD_CONTEXT_ADDRESS": context_process.address,
                "SWITCHBOARD_DISPATCHER_REMOTE_HANDLERS": f"{EXPERT_ID}={expert.address}",
            },
        ) as dispatcher_process,
        EnvoyProcess(
            services={
                "auth": [context_process.address],
                "context": [context_process.address],
                "events": [context_process.address],
                "integration": [context_process.address],
                "dispatcher": [dispatcher_process.address],
            },
            env=otlp.env(),
        ) as envoy,
    ):
        # Everything through Envoy, as a client would.
        async with aio.insecure_channel(f"127.0.0.1:{envoy.port}") as channel:
            owner = await _sign_up(channel)
            stub, dstub = context_stub(channel), dispatcher_stub(channel)
            workspace = await create_workspace(stub, owner, "Traced")
            conversation = (await create_conversation(stub, owner, workspace.name)).name
            sent = await dstub.SendMessage(
                request(conversation, "rain tomorrow?", handler=f"handlers/{EXPERT_ID}"),
                metadata=(*owner.md, ("traceparent", traceparent(trace_id, client_span))),
                timeout=CALL_DEADLINE_S,
            )
            # The run carries the caller's trace.
            assert sent.run.trace_id == trace_id
            seen = await watch_all(dstub, owner, sent.run.name)
        assert seen.final.state == pb.RUN_STATE_SUCCEEDED, seen.final.error.message
        assert seen.final.trace_id == trace_id
        assert seen.text.startswith(f"expert {EXPERT_ID} heard: rain tomorrow?"), seen.text

        spans = await otlp.trace_arrives(trace_id, _complete, "every hop's spans")
        tree = otlp.tree(trace_id)
        by_id = {s.span_id: s for s in spans}

        def of(service: str, kind: str, name: Callable[[str], bool]) -> list[Span]:
            return [s for s in spans if s.service == service and s.kind == kind and name(s.name)]

        # Client → Envoy ingress → Envoy egress → the dispatcher's SendMessage.
        ingress = _one(of(ENVOY_SERVICE_NAME, "SERVER", lambda _: True), "Envoy ingress", tree)
        assert ingress.parent_span_id == client_span, tree
        assert ingress.attributes.get("grpc.path") == SEND, ingress.attributes
        egress = _one(of(ENVOY_SERVICE_NAME, "CLIENT", lambda _: True), "Envoy egress", tree)
        assert egress.parent_span_id == ingress.span_id, tree
        assert egress.attributes.get("upstream_cluster") == "dispatcher", egress.attributes
        send = _one(of(DISPATCHER_SERVICE, "SERVER", lambda n: n == SEND), "SendMessage", tree)
        assert send.parent_span_id == egress.span_id, tree

        # Every call the dispatcher made to the context service has the context
        # process's server span as its child; some within SendMessage itself.
        context_clients = of(DISPATCHER_SERVICE, "CLIENT", lambda n: n.startswith(CONTEXT_PREFIX))
        assert context_clients, tree
        for client in context_clients:
            served = otlp.children_of(client)
            assert [(s.service, s.kind, s.name) for s in served] == [
                (CONTEXT_SERVICE, "SERVER", client.name)
            ], tree
        in_send = [c for c in context_clients if _under(c, send, by_id)]
        assert in_send, f"no call to the context service within SendMessage:\n{tree}"

        # The run continues the trace, a child of SendMessage, in the dispatcher's process.
        run = _one(
            of(DISPATCHER_SERVICE, "INTERNAL", lambda n: n == f"run {EXPERT_ID}"), "run", tree
        )
        assert run.parent_span_id == send.span_id, tree
        assert run.attributes["switchboard.run"] == sent.run.name
        assert run.attributes["switchboard.run.state"] == "RUN_STATE_SUCCEEDED"
        # ... its context: the window it sent the expert came over gRPC, traced.
        assert [c for c in context_clients if _under(c, run, by_id)], tree

        # The run's call to the expert, and the expert's server span as its child.
        handle = _one(of(DISPATCHER_SERVICE, "CLIENT", lambda n: n == HANDLE), "Handle", tree)
        assert _under(handle, run, by_id), tree
        answered = _one(of(EXPERT_SERVICE, "SERVER", lambda n: n == HANDLE), "expert span", tree)
        assert answered.parent_span_id == handle.span_id, tree
        # What went over the wire: the traceparent of the dispatcher's client span.
        version, carried_trace, carried_parent, flags = expert.traceparent_of(HANDLE).split("-")
        assert (version, carried_trace, carried_parent) == ("00", trace_id, handle.span_id), tree
        assert int(flags, 16) & 1, f"not sampled: {flags}"

        for span in spans:
            assert span.status != "ERROR", tree
        # One trace: nothing of it is orphaned (every parent arrived, except the client's).
        assert [s for s in spans if s.parent_span_id not in by_id] == [ingress], tree

        # The processes' JSON log lines for this request carry its trace id.
        def traced(message: str, **fields: str) -> Callable[[dict[str, Any]], bool]:
            return lambda entry: (
                entry.get("message") == message
                and entry.get("trace_id") == trace_id
                and all(entry.get(k) == v for k, v in fields.items())
            )

        access = _log_line(dispatcher_process, traced("rpc finished", method=SEND), "SendMessage")
        assert access["span_id"] == send.span_id
        started = _log_line(
            dispatcher_process, traced("run started", run=sent.run.name), "the run's start"
        )
        assert started["span_id"] == run.span_id
        _log_line(dispatcher_process, traced("run ended", run=sent.run.name), "the run's end")
        for client in context_clients:
            [server] = otlp.children_of(client)
            _log_line(
                context_process,
                traced("rpc finished", method=client.name, span_id=server.span_id),
                f"{client.name} (span {server.span_id})",
            )

        assert envoy.terminate() == 0
        assert dispatcher_process.terminate() == 0
        assert context_process.terminate() == 0
        assert expert.terminate() == 0


# -- the traced expert's process -------------------------------------------------------


async def _serve_expert(handler_id: str) -> None:
    """The example expert's servicer behind Switchboard's tracing interceptor and one that
    prints each call's method and traceparent; ``LISTENING <port>`` first."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_health.v1._async import HealthServicer

    from examples.expert.expert import Expert, SideEffects, capabilities
    from switchboard.api.handler.v1 import handler_pb2_grpc
    from switchboard.platform.observe.telemetry import Tracing

    tracing = Tracing.from_environ(service_name=EXPERT_SERVICE)
    assert tracing is not None, "the traced expert needs OTEL_* variables"

    class Printer(aio.ServerInterceptor):  # type: ignore[type-arg]
        async def intercept_service(self, continuation: Any, details: Any) -> Any:
            method = details.method
            if isinstance(method, bytes):
                method = method.decode()
            if not method.startswith("/grpc.health."):
                metadata = dict(details.invocation_metadata or ())
                print(f"{CALL_LINE} {method} {metadata.get('traceparent', '-')}", flush=True)
            return await continuation(details)

    server = aio.server(interceptors=[tracing.server_interceptor(), Printer()])
    effects = SideEffects(None)
    handler_pb2_grpc.add_HandlerServiceServicer_to_server(
        Expert(capabilities(handler_id, [handler_id]), effects), server
    )
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    await health.set("", health_pb2.HealthCheckResponse.SERVING)
    print(f"LISTENING {port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(1.0)
    tracing.shutdown()


if __name__ == "__main__":
    asyncio.run(_serve_expert(sys.argv[sys.argv.index("--id") + 1]))
