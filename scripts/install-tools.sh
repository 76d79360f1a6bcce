#!/usr/bin/env bash
# Installs the external tools the tests drive, into .tools/bin (pinned versions):
#   grpcurl, grpc-health-probe, protoc-gen-go and protoc-gen-go-grpc (Go; `make gen`
#   runs the last two), SeaweedFS's `weed` (Go; the S3-compatible server the blob
#   store's tests run), the Node client's packages, the A2A client's (clients/a2a-js:
#   the official @a2a-js/sdk and the peers of its gRPC transport), the browser console's
#   packages (clients/web: protoc-gen-es, Connect-ES, esbuild, TypeScript), the MCP
#   reference server the connector tests run (tests/mcp, npm ci) and puppeteer-core
#   for the browser test (tests/browser, npm ci; it drives the system's Chromium),
#   and the Go client's modules (clients/go, go mod download).
# Idempotent: a tool already at the pinned version is left alone.
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
# SeaweedFS (the S3-compatible server of the blob store's tests, tests/infra/seaweedfs.py).
# Its release tags are not semantic versions, so the module proxy lists none: we pin a
# commit's pseudo-version and its hash. Its go.mod has a replace directive, which
# `go install module@version` refuses, so we build it from the downloaded module like
# grpc-health-probe. It is the slowest step here: 7 min 35 s from nothing on a 2-core
# machine that was busy with other work (2.2 GB of modules downloaded, then compiled),
# 10 s again while Go's build cache is warm, nothing once its stamp is there.
SEAWEEDFS_VERSION=v0.0.0-20261109003541-7506e5f91cd6
SEAWEEDFS_SUM="h1:LOYZFToHq9F7pSR6lkPGfkM8RmHlVFrzndKdhmNZjrU="

stamp() { echo "$BIN/.$1-$2"; }

if [[ ! -x "$BIN/grpcurl" || ! -e "$(stamp grpcurl $GRPCURL_VERSION)" ]]; then
  echo "tools: installing grpcurl $GRPCURL_VERSION"
  go install "github.com/fullstorydev/grpcurl/cmd/grpcurl@$GRPCURL_VERSION"
  touch "$(stamp grpcurl $GRPCURL_VERSION)"
fi

if [[ ! -x "$BIN/grpc-health-probe" || ! -e "$(stamp health-probe $HEALTH_PROBE_VERSION)" ]]; then
  echo "tools: installing grpc-health-probe $HEALTH_PROBE_VERSION"
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
fi

build_weed() {
  echo "tools: building SeaweedFS $SEAWEEDFS_VERSION (the slowest step: a few minutes)"
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

# `--weed-in-background` (make test): the build runs beside everything else (the lint and
# the type check use one core of two, the build the other), and tests/infra/seaweedfs.py
# waits for it; its pid and log are in .tools/. Any later run of this script while it
# builds leaves it alone.
WEED_PID="$ROOT/.tools/weed-build.pid"
WEED_LOG="$ROOT/.tools/weed-build.log"
weed_building() { [[ -s "$WEED_PID" ]] && kill -0 "$(cat "$WEED_PID")" 2>/dev/null; }

if [[ "${1:-}" == "--weed-only" ]]; then
  build_weed
  exit
fi
if [[ ! -x "$BIN/weed" || ! -e "$(stamp weed $SEAWEEDFS_VERSION)" ]] && ! weed_building; then
  if [[ "${1:-}" == "--weed-in-background" ]]; then
    echo "tools: building SeaweedFS in the background (log: .tools/weed-build.log)"
    nohup bash "$ROOT/scripts/install-tools.sh" --weed-only >"$WEED_LOG" 2>&1 &
    echo $! >"$WEED_PID"
  else
    build_weed
  fi
fi

for plugin in "protoc-gen-go google.golang.org/protobuf/cmd/protoc-gen-go $PROTOC_GEN_GO_VERSION" \
  "protoc-gen-go-grpc google.golang.org/grpc/cmd/protoc-gen-go-grpc $PROTOC_GEN_GO_GRPC_VERSION"; do
  read -r name module version <<<"$plugin"
  if [[ ! -x "$BIN/$name" || ! -e "$(stamp "$name" "$version")" ]]; then
    echo "tools: installing $name $version"
    go install "$module@$version"
    touch "$(stamp "$name" "$version")"
  fi
done

# The Go client's modules, pinned by clients/go/go.sum: its tests build it with
# GOPROXY=off, so nothing is downloaded while they run.
if [[ ! -e "$BIN/.go-client-modules" || clients/go/go.sum -nt "$BIN/.go-client-modules" ]]; then
  echo "tools: downloading the Go client's modules"
  (cd clients/go && go mod download)
  touch "$BIN/.go-client-modules"
fi

if [[ ! -d clients/node/node_modules/@grpc/grpc-js ]] \
  || [[ clients/node/package-lock.json -nt clients/node/node_modules/.package-lock.json ]]; then
  echo "tools: installing the Node client's packages"
  (cd clients/node && npm ci --no-audit --no-fund --loglevel=error)
fi
if [[ ! -d clients/a2a-js/node_modules/@a2a-js/sdk ]] \
  || [[ clients/a2a-js/package-lock.json -nt clients/a2a-js/node_modules/.package-lock.json ]]; then
  echo "tools: installing the A2A JavaScript SDK client's packages"
  (cd clients/a2a-js && npm ci --no-audit --no-fund --loglevel=error)
fi
if [[ ! -x clients/web/node_modules/.bin/protoc-gen-es ]] \
  || [[ clients/web/package-lock.json -nt clients/web/node_modules/.package-lock.json ]]; then
  echo "tools: installing the browser console's packages"
  (cd clients/web && npm ci --no-audit --no-fund --loglevel=error)
fi
if [[ ! -f tests/mcp/node_modules/@modelcontextprotocol/server-everything/dist/index.js ]] \
  || [[ tests/mcp/package-lock.json -nt tests/mcp/node_modules/.package-lock.json ]]; then
  echo "tools: installing the MCP test servers' packages"
  (cd tests/mcp && npm ci --no-audit --no-fund --loglevel=error)
fi
if [[ ! -f tests/browser/node_modules/puppeteer-core/package.json ]] \
  || [[ tests/browser/package-lock.json -nt tests/browser/node_modules/.package-lock.json ]]; then
  echo "tools: installing the browser test's packages"
  (cd tests/browser && npm ci --no-audit --no-fund --loglevel=error)
fi
echo "tools: ready in $BIN"
