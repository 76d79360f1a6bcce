"""The ports the mesh binds by number, checked before anything starts, and who holds one.

Every process of ``switchboard mesh`` takes a free port of its own except Envoy's
listeners and admin interface (``--listen``, ``--tls-listen``, ``--admin``), which a
reader connects to by number. Envoy starts last, once PostgreSQL, Redis and every
service are up: a port another process held used to fail the start there, most of a
minute in, with Envoy's "cannot bind". The launcher tries each such port first and
stops at once, naming the port, what it was for and what holds it: the process id and
command line when this user may see them (``/proc/net/tcp*`` gives the socket's inode
and owner, ``/proc/*/fd`` the process that has it open), else the owner's user name.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import socket
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from switchboard.deploy.machine import MeshError

#: /proc/net/tcp's state of a listening socket (include/net/tcp_states.h: TCP_LISTEN).
_LISTEN: Final = "0A"
#: A command line is shown up to this many characters.
_COMMAND_CHARS: Final = 200
_PROC: Final = Path("/proc")
#: Envoy's words for a listener or admin port it cannot have.
_CANNOT_BIND: Final = re.compile(r"cannot bind '(.+):(\d+)': Address already in use")


@dataclass(frozen=True)
class Wanted:
    """A port the mesh will bind: where, what for, and the option that moves it."""

    host: str
    port: int
    what: str  # "Envoy's admin interface"
    option: str  # "--admin"

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def check_free(wanted: Sequence[Wanted]) -> None:
    """MeshError naming every port of ``wanted`` that is taken (port 0 is always free: the
    kernel picks one), or that two of them share."""
    fixed = [entry for entry in wanted if entry.port]
    problems = []
    for index, entry in enumerate(fixed):
        twin = next((other for other in fixed[:index] if other.port == entry.port), None)
        if twin is not None:
            problems.append(
                f"{twin.option} {twin.address} and {entry.option} {entry.address} name the "
                f"same port: give {entry.option} another"
            )
            continue
        refused = bind_error(entry.host, entry.port)
        if refused is None:
            continue
        holder = holder_of(entry.port)
        problems.append(
            f"{entry.address}, {entry.what} ({entry.option}), is not free: {refused}"
            f"{f'; {holder} holds it' if holder else ''}. Stop that, or give {entry.option} "
            "another HOST:PORT (port 0 picks a free one)"
        )
    if problems:
        raise MeshError("; ".join(problems))


def bind_error(host: str, port: int) -> str | None:
    """Why a listener could not bind ``host:port`` now; None when it could."""
    try:
        found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        return f"{host} does not resolve ({exc.strerror})"
    family, kind, proto, _, address = found[0]
    with socket.socket(family, kind, proto) as probe:
        # As a listener binds: a port whose old connections wait out TIME_WAIT is free.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
            # A socket bound elsewhere with SO_REUSEADDR but not yet listening lets the
            # bind through; listening is what clashes then.
            probe.listen()
        except OSError as exc:
            return exc.strerror or str(exc)
    return None


def bind_failure(lines: Iterable[str]) -> str:
    """Who holds the port a process's ``lines`` say it could not bind, in words; "" when
    they say no such thing. The check before the start cannot rule out a port taken later
    (before a restart of Envoy, which keeps its ports): this names that one's holder too."""
    for line in lines:
        found = _CANNOT_BIND.search(line)
        if found is None:
            continue
        address, port = f"{found[1]}:{found[2]}", int(found[2])
        holder = holder_of(port)
        return f"{address} is held by {holder or 'another process'}"
    return ""


@dataclass(frozen=True)
class _Socket:
    inode: str
    uid: int
    listening: bool


def holder_of(port: int, proc: Path = _PROC) -> str:
    """What holds TCP ``port`` on this machine, in words: ``pid 123 (envoy --config-path
    ...)``, or ``a process of user postgres`` when its process cannot be seen; "" when
    nothing shows (another network namespace, no /proc)."""
    sockets = sorted(_sockets(port, proc), key=lambda found: not found.listening)
    if not sockets:
        return ""
    inodes = {found.inode for found in sockets}
    for pid, inode in _open_sockets(proc):
        if inode in inodes:
            return f"pid {pid} ({_command(proc, pid)})"
    try:
        user = pwd.getpwuid(sockets[0].uid).pw_name
    except KeyError:
        user = str(sockets[0].uid)
    return f"a process of user {user} (its pid is not visible to this user)"


def _sockets(port: int, proc: Path) -> Iterator[_Socket]:
    """The TCP sockets bound to ``port`` (IPv4 and IPv6) with an inode (TIME_WAIT's have none)."""
    for table in ("tcp", "tcp6"):
        try:
            lines = (proc / "net" / table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 10:
                continue
            local_port = int(fields[1].rpartition(":")[2], 16)
            if local_port == port and fields[9] != "0":
                yield _Socket(fields[9], int(fields[7]), fields[3] == _LISTEN)


def _open_sockets(proc: Path) -> Iterator[tuple[int, str]]:
    """Each process's open sockets, as (pid, inode), where this user may read them."""
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):  # another user's, or it ended meanwhile
            for fd in (entry / "fd").iterdir():
                with contextlib.suppress(OSError):
                    target = os.readlink(fd)
                    if target.startswith("socket:["):
                        yield int(entry.name), target[len("socket:[") : -1]


def _command(proc: Path, pid: int) -> str:
    try:
        raw = (proc / str(pid) / "cmdline").read_bytes()
    except OSError:
        return "its command line is not readable"
    # One line: an argument may hold newlines (python -c's program).
    command = " ".join(raw.replace(b"\0", b" ").decode(errors="replace").split())
    if len(command) > _COMMAND_CHARS:
        command = command[: _COMMAND_CHARS - 3] + "..."
    return command or "no command line"
