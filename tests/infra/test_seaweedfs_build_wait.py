"""The wait for a background SeaweedFS build ends when the build does, whatever became of
the number in its pid file (tests/infra/seaweedfs.py, scripts/install-tools.sh)."""

from __future__ import annotations

import os
import subprocess
import threading
from pathlib import Path

import pytest

from tests.infra.seaweedfs import _building

pytestmark = pytest.mark.unit


def test_a_pid_file_naming_a_thread_of_another_program_is_no_build(tmp_path: Path) -> None:
    pid_file = tmp_path / "weed-build.pid"
    seen: list[int] = []
    done = threading.Event()

    def note_own_id() -> None:
        seen.append(threading.get_native_id())
        done.wait(30)

    thread = threading.Thread(target=note_own_id)
    thread.start()
    try:
        while not seen:
            thread.join(0.01)
        pid_file.write_text(f"{seen[0]}\n")
        assert not _building(pid_file)
        pid_file.write_text(f"{os.getpid()}\n")
        assert not _building(pid_file)
    finally:
        done.set()
        thread.join()


def test_a_running_install_script_is_a_build_and_its_end_is_not(tmp_path: Path) -> None:
    pid_file = tmp_path / "weed-build.pid"
    script = tmp_path / "install-tools.sh"
    script.write_text("echo started\nread -r line\n")
    build = subprocess.Popen(
        ["bash", str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        # Popen returns once the exec has begun, and the kernel fills the new image's
        # command line only later: a loaded machine read it empty in that gap. A line
        # from the script itself says the exec is done.
        assert build.stdout is not None
        assert build.stdout.readline() == "started\n"
        pid_file.write_text(f"{build.pid}\n")
        assert _building(pid_file)
    finally:
        assert build.stdin is not None
        build.stdin.write("done\n")
        build.stdin.close()
        build.wait(timeout=30)
        if build.stdout is not None:
            build.stdout.close()
    assert not _building(pid_file)


def test_no_file_or_a_bad_number_is_no_build(tmp_path: Path) -> None:
    assert not _building(tmp_path / "absent.pid")
    (tmp_path / "bad.pid").write_text("not a number")
    assert not _building(tmp_path / "bad.pid")
    (tmp_path / "zero.pid").write_text("0")
    assert not _building(tmp_path / "zero.pid")
