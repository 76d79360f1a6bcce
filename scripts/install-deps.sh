#!/usr/bin/env bash
# Installs the system packages Switchboard needs, when they are missing:
#   scripts/install-deps.sh        everything `make test` needs: the tools scope's, and git,
#                                  redis-server and PostgreSQL's server binaries (the suite
#                                  starts its own servers and never skips them), Chromium (the
#                                  browser test)
#   scripts/install-deps.sh tools  what the README's steps need (`make tools`): make, Go
#                                  (grpcurl, the Go client), Node.js and npm (the MCP server,
#                                  the Node clients), jq (the docs' examples keep values with
#                                  it), eSpeak NG (the local audio server speaks with it),
#                                  python3-venv
#   scripts/install-deps.sh venv   only what creating .venv needs (`make run`)
# `make test`, `make tools` and `.ci/run` run it. Idempotent: nothing missing, nothing done
# (quick).
# It installs with apt-get, as root or through sudo; where it cannot, it names the packages
# to install and exits 1.
# POSTGRES_LIB (default /usr/lib/postgresql) is where Debian keeps the server binaries.
set -euo pipefail

scope=${1:-test}
if [[ $scope != test && $scope != tools && $scope != venv ]]; then
  echo "usage: $0 [test|tools|venv]" >&2
  exit 2
fi

missing=() # Debian/Ubuntu package names
reasons=() # what each one is for
want() {
  missing+=("$1")
  reasons+=("$2")
}
absent() { ! command -v "$1" >/dev/null 2>&1; }

postgres_present() {
  # What tests/infra/postgres.py looks for: initdb, pg_ctl and postgres side by side.
  local initdb dir
  if initdb=$(command -v initdb 2>/dev/null); then
    dir=$(dirname "$(readlink -f "$initdb")")
    [[ -x $dir/pg_ctl && -x $dir/postgres ]] && return 0
  fi
  for dir in "${POSTGRES_LIB:-/usr/lib/postgresql}"/*/bin; do
    [[ -x $dir/initdb && -x $dir/pg_ctl && -x $dir/postgres ]] && return 0
  done
  return 1
}

python3 -c 'import venv, ensurepip' 2>/dev/null || want python3-venv "python3 -m venv (.venv)"
if [[ $scope == test ]]; then
  absent git && want git "git (the contract checks compare proto/ with its history)"
fi
if [[ $scope == test || $scope == tools ]]; then
  absent make && want make "make"
  absent go && want golang-go "go (builds grpcurl and grpc-health-probe; the Go client)"
  absent node && want nodejs "node (the MCP server of the README's steps; the Node.js clients)"
  absent npm && want npm "npm (the MCP server's and the Node.js clients' packages)"
fi
if [[ $scope == test ]]; then
  absent redis-server && want redis-server "redis-server (the suite starts its own)"
  postgres_present || want postgresql "initdb, pg_ctl, postgres (the suite starts its own)"
  absent chromium && want chromium "chromium (tests/e2e/test_browser.py drives it headless)"
  absent turnserver && want coturn "turnserver (coturn: the WebRTC tests' TURN relay, with minted credentials)"
  absent baresip && want baresip-core "baresip (a SIP phone of another stack than the server's: tests/dispatcher/talk/sip)"
fi
if [[ $scope == test || $scope == tools ]]; then
  absent jq && want jq "jq (the README's examples keep values with it; tests/e2e/test_docs_run.py)"
  absent espeak-ng && want espeak-ng "espeak-ng (the local audio server speaks with it; the transcription tests)"
fi
((${#missing[@]} == 0)) && exit 0

cannot() {
  {
    echo "deps: $1; missing:"
    local i
    for i in "${!missing[@]}"; do
      echo "  ${missing[$i]}: ${reasons[$i]}"
    done
    echo "deps: install them (Debian/Ubuntu: sudo apt-get install ${missing[*]}) and run again"
  } >&2
  exit 1
}

sudo=()
if [[ $(id -u) -ne 0 ]]; then
  absent sudo && cannot "not root and no sudo to install with"
  sudo=(sudo)
fi
absent apt-get && cannot "no apt-get to install with"
echo "deps: installing ${missing[*]} with apt-get"
export DEBIAN_FRONTEND=noninteractive
${sudo[@]+"${sudo[@]}"} apt-get update -q || cannot "apt-get update failed"
${sudo[@]+"${sudo[@]}"} apt-get install -y -q --no-install-recommends "${missing[@]}" ||
  cannot "apt-get install failed"
