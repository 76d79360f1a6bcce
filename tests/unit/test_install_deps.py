"""scripts/install-deps.sh, which `make test` and .ci/run run on a fresh machine.

Run with a PATH of stand-ins: which commands exist, whether we are root, and an
apt-get that records what it was asked and "installs" by adding the commands.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "install-deps.sh"
TEST_COMMANDS = (
    "git",
    "make",
    "go",
    "node",
    "npm",
    "redis-server",
    "chromium",
    "jq",
    "espeak-ng",
)
# What each package provides, for the fake apt-get.
PROVIDES = {
    "git": ["git"],
    "make": ["make"],
    "golang-go": ["go"],
    "nodejs": ["node"],
    "npm": ["npm"],
    "redis-server": ["redis-server"],
    "chromium": ["chromium"],
    "jq": ["jq"],
    "espeak-ng": ["espeak-ng"],
    "postgresql": ["pg/15/bin/initdb", "pg/15/bin/pg_ctl", "pg/15/bin/postgres"],
}


class Machine:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.bin = tmp / "bin"
        self.bin.mkdir()
        self.log = tmp / "apt.log"
        for tool in ("dirname", "readlink"):
            found = shutil.which(tool)
            assert found is not None
            (self.bin / tool).symlink_to(found)
        self.stub("python3", "exit 0")  # venv and ensurepip importable
        self.stub("id", "echo 0")  # root

    def stub(self, name: str, body: str = "exit 0") -> None:
        path = self.tmp / name if "/" in name else self.bin / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"#!/bin/sh\n{body}\n")
        path.chmod(0o755)

    def remove(self, name: str) -> None:
        (self.bin / name).unlink()

    def with_everything(self) -> Machine:
        for command in TEST_COMMANDS:
            self.stub(command)
        for command in PROVIDES["postgresql"]:
            self.stub(command)
        return self

    def apt_get(self, *, works: bool = True) -> None:
        installs = "\n".join(
            f"    {package}) {' ; '.join(self._make(c) for c in commands)} ;;"
            for package, commands in PROVIDES.items()
        )
        self.stub(
            "apt-get",
            f'echo "apt-get $*" >> {self.log}\n'
            + ("" if works else "exit 100\n")
            + 'if [ "$1" = install ]; then\n'
            + '  for p in "$@"; do\n    case "$p" in\n'
            + installs
            + "\n    esac\n  done\nfi",
        )

    def _make(self, command: str) -> str:
        path = self.tmp / command if "/" in command else self.bin / command
        mkdir, chmod = shutil.which("mkdir"), shutil.which("chmod")  # not on the stub PATH
        return f"{mkdir} -p {path.parent} && printf '#!/bin/sh\\n' > {path} && {chmod} +x {path}"

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        bash = shutil.which("bash")
        assert bash is not None
        return subprocess.run(
            [bash, str(SCRIPT), *args],
            capture_output=True,
            text=True,
            timeout=60,
            env={"PATH": str(self.bin), "POSTGRES_LIB": str(self.tmp / "pg")},
            check=False,
        )

    def apt_calls(self) -> list[str]:
        return self.log.read_text().splitlines() if self.log.exists() else []


@pytest.fixture
def machine(tmp_path: Path) -> Machine:
    return Machine(tmp_path)


def test_nothing_missing_installs_nothing(machine: Machine) -> None:
    machine.with_everything().apt_get()
    done = machine.run()
    assert done.returncode == 0, done.stderr
    assert machine.apt_calls() == []


def test_missing_packages_are_installed_with_apt_get(machine: Machine) -> None:
    machine.with_everything().apt_get()
    machine.remove("go")
    machine.remove("redis-server")
    (machine.tmp / "pg").rename(machine.tmp / "no-pg")
    done = machine.run()
    assert done.returncode == 0, done.stderr
    assert machine.apt_calls() == [
        "apt-get update -q",
        "apt-get install -y -q --no-install-recommends golang-go redis-server postgresql",
    ]
    assert machine.run().returncode == 0
    assert len(machine.apt_calls()) == 2  # the second run found everything


def test_not_root_installs_through_sudo(machine: Machine) -> None:
    machine.with_everything().apt_get()
    machine.stub("id", "echo 1000")
    machine.stub("sudo", f'echo "sudo $1" >> {machine.log}\nexec "$@"')
    machine.remove("node")
    machine.remove("npm")
    done = machine.run()
    assert done.returncode == 0, done.stderr
    assert "sudo apt-get" in machine.apt_calls()
    assert machine.apt_calls()[-1].endswith("--no-install-recommends nodejs npm")


@pytest.mark.parametrize("why", ["no sudo", "no apt-get", "apt-get fails"])
def test_when_it_cannot_install_it_names_the_packages(machine: Machine, why: str) -> None:
    machine.with_everything()
    machine.remove("go")
    machine.remove("make")
    if why == "no sudo":
        machine.apt_get()
        machine.stub("id", "echo 1000")
    elif why == "apt-get fails":
        machine.apt_get(works=False)
    done = machine.run()
    assert done.returncode == 1
    assert "sudo apt-get install make golang-go" in done.stderr
    assert "golang-go: go (builds grpcurl" in done.stderr
    assert "make: make" in done.stderr


def test_venv_scope_only_needs_python3_venv(machine: Machine) -> None:
    machine.apt_get()  # nothing the tests need is here
    machine.stub("python3", "exit 1")  # no venv/ensurepip
    done = machine.run("venv")
    assert done.returncode == 0, done.stderr
    assert machine.apt_calls()[-1].endswith("--no-install-recommends python3-venv")


def test_the_makefile_and_ci_run_the_installer() -> None:
    makefile = (ROOT / "Makefile").read_text()
    test_recipe = makefile.split("\ntest check:", 1)[1].split("\n\n", 1)[0]
    assert test_recipe.splitlines()[1].strip() == "@bash scripts/install-deps.sh"
    assert "bash scripts/install-deps.sh" in (ROOT / ".ci" / "run").read_text()
    # `make run` needs no database server: only the venv's own prerequisite.
    assert "install-deps.sh venv" in makefile.split("$(STAMP): pyproject.toml", 1)[1]
