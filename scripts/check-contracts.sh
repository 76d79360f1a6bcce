#!/usr/bin/env bash
# Contract checks: buf lint (STANDARD + COMMENTS), buf format, buf breaking
# against every earlier commit that changed proto/, and no drift in gen/.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
BUF=${BUF:-.venv/bin/buf}

echo "contracts: buf lint"
"$BUF" lint
echo "contracts: buf format"
"$BUF" format --diff --exit-code proto
echo "contracts: buf breaking"
compared=0
if git rev-parse --verify -q HEAD >/dev/null; then
  # Two rules are turned off against contracts from before a one-time change, and
  # only against those:
  # - RPC_SAME_IDEMPOTENCY_LEVEL against contracts without idempotency levels
  #   (safe-to-retry marks, read by the Envoy generator): going from "unknown" to a
  #   level is the marking itself. Once a contract has levels, changing one breaks.
  # - FILE_SAME_GO_PACKAGE against contracts whose go_package was
  #   `switchboard/gen/go/...`: that is not a Go import path, so no Go program could
  #   have imported it; the Go module is switchboard.dev/go (clients/go).
  # - FIELD_SAME_NAME and FIELD_SAME_JSON_NAME against the drafts of issue 50's
  #   contract where ResolveBudgetActionRequest's field 1 was `run`: it became
  #   `name` (AIP-136, as SubmitToolApprovals) before any release carried it.
  config=$(mktemp --suffix=.yaml)
  ours=$(mktemp --suffix=.yaml)
  trap 'rm -f "$config" "$ours"' EXIT
  # Our contracts' workspace without the vendored A2A module (checked on its own below):
  # both sides are read with it, so commits from before the vendoring compare alike.
  awk '/^  - path: /{skip = ($3 == "third_party/a2a")} !skip' buf.yaml >"$ours"
  # against REF: buf breaking against the contracts of commit REF (empty: HEAD).
  against() {
    local ref=$1 excepts=()
    git grep -q idempotency_level "$ref" -- proto || excepts+=(RPC_SAME_IDEMPOTENCY_LEVEL)
    git grep -q 'go_package = "switchboard/gen/go/switchboard/api/' "$ref" -- proto &&
      excepts+=(FILE_SAME_GO_PACKAGE)
    if git show "$ref:proto/switchboard/api/dispatcher/v1/dispatcher.proto" 2>/dev/null |
      awk '/^message ResolveBudgetActionRequest /{m = 1} m && /string run = 1;/{f = 1}
           /^}/{m = 0} END{exit !f}'; then
      excepts+=(FIELD_SAME_NAME FIELD_SAME_JSON_NAME)
    fi
    cp "$ours" "$config"
    if ((${#excepts[@]} > 0)); then
      local rules
      rules=$(printf '\\n        - %s' "${excepts[@]}")
      sed "s/^        - FILE\$/        - FILE\\n      except:$rules/" "$ours" >"$config"
      grep -q "${excepts[0]}" "$config"
    fi
    "$BUF" breaking . --config "$config" --against ".git#ref=$ref" --against-config "$config"
  }
  # Uncommitted edits are compared against HEAD; committed history against each
  # earlier commit that touched proto/ (so a break anywhere in a push is caught).
  if ! git diff --quiet HEAD -- proto; then
    against HEAD
    compared=$((compared + 1))
  fi
  for ref in $(git log --format=%H -n 25 HEAD~1 -- proto 2>/dev/null || true); do
    if git cat-file -e "$ref:proto" 2>/dev/null; then
      against "$ref"
      compared=$((compared + 1))
    fi
  done
fi
echo "contracts: no breaking change against $compared earlier contract versions"
# The vendored A2A contract (third_party/a2a): the pinned SDK's descriptor, unchanged,
# and no break against its earlier versions (an SDK upgrade that breaks callers stops here).
echo "contracts: vendored A2A contract"
"$PY" scripts/a2a-proto.py --check
vendored=0
if git rev-parse --verify -q HEAD >/dev/null; then
  if ! git diff --quiet HEAD -- third_party/a2a && git cat-file -e HEAD:third_party/a2a 2>/dev/null; then
    "$BUF" breaking third_party/a2a --against ".git#ref=HEAD,subdir=third_party/a2a"
    vendored=$((vendored + 1))
  fi
  for ref in $(git log --format=%H -n 25 HEAD~1 -- third_party/a2a 2>/dev/null || true); do
    if git cat-file -e "$ref:third_party/a2a" 2>/dev/null; then
      "$BUF" breaking third_party/a2a --against ".git#ref=$ref,subdir=third_party/a2a"
      vendored=$((vendored + 1))
    fi
  done
fi
echo "contracts: vendored A2A contract unbroken against $vendored earlier versions"
echo "contracts: generated code"
"$PY" scripts/gen.py --check
