"""The Go module from another module's point of view, as clients/go/README.md says to use it:
a fresh module requires ``switchboard.dev/go`` at the project's version and points it at this
checkout with a ``replace`` directive (nothing serves the module path for ``go get``), then
``go mod tidy``, builds, and its program signs up against ``switchboard serve --dev``.

Modules come only from the local cache, as in every Go test here (``make tools`` fills it).
"""

from __future__ import annotations

import re
import subprocess
import tomllib
from pathlib import Path

import pytest

from tests.e2e.goclient import BUILD_TIMEOUT_S, GO_DIR, go_env
from tests.e2e.procs import ROOT, ServeProcess, tool

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

README = GO_DIR / "README.md"
PROGRAM = """package main

import (
	"context"
	"fmt"
	"os"
	"time"

	contextv1 "switchboard.dev/go/gen/switchboard/api/context/v1"
	"switchboard.dev/go/switchboard"
)

func main() {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	client, err := switchboard.Dial(os.Args[1], switchboard.WithInsecure())
	if err != nil {
		panic(err)
	}
	defer client.Close()
	registered, err := client.Register(ctx, "gopher@example.com", "a long passphrase 42", "Gopher")
	if err != nil {
		panic(err)
	}
	request := &contextv1.CreateWorkspaceRequest{WorkspaceId: "gophers"}
	fmt.Println(registered.GetUser().GetName(), request.GetWorkspaceId())
}
"""


def go(directory: Path, *args: str) -> str:
    env = go_env()
    # go mod tidy writes go.mod and go.sum of the new module (never clients/go's).
    env["GOFLAGS"] = "-mod=mod -buildvcs=false"
    # Offline: the module cache was verified against the checksum database when `make
    # tools` filled it; the new module's go.sum is written from it.
    env["GOSUMDB"] = "off"
    done = subprocess.run(
        [tool("go"), *args],
        cwd=directory,
        env=env,
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT_S,
        check=False,
    )
    assert done.returncode == 0, f"go {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def test_a_module_of_its_own_uses_the_client_through_the_documented_replace(
    tmp_path: Path,
) -> None:
    # The module's version is the project's (pyproject.toml), as a Go semantic version.
    version = "v" + tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    # The README's command, with the checkout's real path for ../switchboard.
    documented = re.search(r"^go mod edit (.*)$", README.read_text(), re.M)
    assert documented, "clients/go/README.md shows no `go mod edit`"
    edit = documented[1].replace("../switchboard/clients/go", str(GO_DIR)).split()
    assert f"-require=switchboard.dev/go@{version}" in edit

    app = tmp_path / "app"
    app.mkdir()
    go(app, "mod", "init", "example.com/app")
    go(app, "mod", "edit", *edit)
    (app / "main.go").write_text(PROGRAM)
    # -e: tidy also looks up the modules grpc-go's own tests import (go-cmp, gonum), which a
    # connected machine downloads and the offline cache does not hold; nothing built needs them.
    go(app, "mod", "tidy", "-e")
    go(app, "build", "-o", str(tmp_path / "app-bin"), ".")
    with ServeProcess("--dev") as served:
        done = subprocess.run(
            [str(tmp_path / "app-bin"), served.address],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert done.returncode == 0, done.stderr
    assert re.fullmatch(r"users/\S+ gophers\n", done.stdout), done.stdout
