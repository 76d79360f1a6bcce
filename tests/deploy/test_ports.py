"""The mesh's numbered ports, checked before anything starts, and who holds a taken one."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import pytest

from switchboard.deploy import launcher, processes
from switchboard.deploy.machine import MeshError
from switchboard.deploy.ports import Wanted, bind_error, bind_failure, check_free, holder_of

pytestmark = pytest.mark.unit


@pytest.fixture
def held() -> Iterator[int]:
    """A loopback port this process listens on (as another Envoy would)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


def test_a_taken_port_is_refused_naming_what_it_was_for_and_who_holds_it(held: int) -> None:
    with pytest.raises(MeshError) as caught:
        check_free(
            [
                Wanted("127.0.0.1", 0, "Envoy's listener", "--listen"),
                Wanted("127.0.0.1", held, "Envoy's admin interface", "--admin"),
            ]
        )
    said = str(caught.value)
    assert said.startswith(f"127.0.0.1:{held}, Envoy's admin interface (--admin), is not free: ")
    assert f"pid {os.getpid()} (" in said
    assert "give --admin another HOST:PORT (port 0 picks a free one)" in said
    assert "--listen" not in said  # port 0 is the kernel's choice: never taken


def test_a_held_port_s_holder_is_this_process_with_its_command_line(held: int) -> None:
    assert bind_error("127.0.0.1", held) is not None
    holder = holder_of(held)
    assert holder.startswith(f"pid {os.getpid()} (")
    command = (Path("/proc/self/cmdline").read_bytes().split(b"\0")[0]).decode()
    assert command in holder


def test_two_options_on_one_port_are_refused() -> None:
    with pytest.raises(MeshError) as caught:
        check_free(
            [
                Wanted("127.0.0.1", 1, "Envoy's listener", "--listen"),
                Wanted("127.0.0.1", 1, "Envoy's admin interface", "--admin"),
            ]
        )
    assert "--listen 127.0.0.1:1 and --admin 127.0.0.1:1 name the same port" in str(caught.value)


def test_free_ports_pass() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    # Closed: free again (unless another process took it in between, which it may not
    # listen on in this instant; port 0 is the check's own case above).
    assert bind_error("127.0.0.1", port) is None
    check_free([Wanted("127.0.0.1", 0, "Envoy's listener", "--listen")])


def _fake_proc(root: Path, *, inode: str, uid: int, port: int) -> Path:
    (root / "net").mkdir(parents=True)
    header = (
        "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  "
        "timeout inode\n"
    )
    listening = (
        f"   0: 0100007F:{port:04X} 00000000:0000 0A 00000000:00000000 00:00000000 00000000 "
        f"{uid:>5}        0 {inode} 1 0000000000000000 100 0 0 10 0\n"
    )
    waiting = (  # a TIME_WAIT entry of the same port: no inode, no holder
        f"   1: 0100007F:{port:04X} 0100007F:9C40 06 00000000:00000000 03:00000f0e 00000000 "
        "    0        0 0 3 0000000000000000\n"
    )
    (root / "net" / "tcp").write_text(header + waiting + listening)
    (root / "net" / "tcp6").write_text(header)
    return root


def test_the_holder_is_found_from_proc_s_socket_table_and_fds(tmp_path: Path) -> None:
    proc = _fake_proc(tmp_path / "proc", inode="4242", uid=0, port=9901)
    fds = proc / "77" / "fd"
    fds.mkdir(parents=True)
    (fds / "3").symlink_to("/dev/null")
    (fds / "9").symlink_to("socket:[4242]")
    (proc / "77" / "cmdline").write_bytes(b"envoy\0--config-path\0/x/.mesh/envoy/envoy.yaml\0")
    (proc / "self").mkdir()  # not a process id
    assert holder_of(9901, proc) == "pid 77 (envoy --config-path /x/.mesh/envoy/envoy.yaml)"
    assert holder_of(9902, proc) == ""


def test_a_holder_this_user_cannot_see_is_named_by_its_user(tmp_path: Path) -> None:
    proc = _fake_proc(tmp_path / "proc", inode="4242", uid=0, port=8080)
    assert holder_of(8080, proc) == "a process of user root (its pid is not visible to this user)"


def test_the_mesh_checks_envoy_s_three_ports() -> None:
    from switchboard.cli import _parser

    def wanted(*argv: str) -> list[tuple[str, int, str]]:
        options = launcher.Options.from_args(_parser().parse_args(["mesh", *argv]))
        return [(entry.host, entry.port, entry.option) for entry in options.fixed_ports()]

    assert wanted() == [("127.0.0.1", 8080, "--listen"), ("127.0.0.1", 9901, "--admin")]
    assert wanted("--tls", "--admin=127.0.0.1:0") == [
        ("127.0.0.1", 8080, "--listen"),
        ("127.0.0.1", 0, "--admin"),
        ("127.0.0.1", 8443, "--tls-listen"),
    ]


def test_envoy_s_cannot_bind_line_is_followed_by_who_holds_the_port(held: int) -> None:
    """A port taken after the check (before a restart of Envoy): the start's failure names
    its holder under Envoy's last lines."""
    said = f"[critical][main] cannot bind '127.0.0.1:{held}': Address already in use"
    assert bind_failure(["starting", said]).startswith(
        f"127.0.0.1:{held} is held by pid {os.getpid()} ("
    )
    assert bind_failure(["starting", "all good"]) == ""
    envoy = processes.Child(cast(processes.Host, None), "envoy")
    envoy.tail.extend(["starting", said])
    assert envoy.last_lines().endswith(bind_failure([said]))
    assert said in envoy.last_lines()
