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
  # Contracts from before methods were given idempotency levels (safe-to-retry
  # marks, read by the Envoy generator) are compared with that one rule off:
  # going from "unknown" to a level is the marking itself. Once a contract has
  # levels, changing one is a break like any other.
  prelevels=$(mktemp --suffix=.yaml)
  trap 'rm -f "$prelevels"' EXIT
  sed 's/^        - FILE$/        - FILE\n      except:\n        - RPC_SAME_IDEMPOTENCY_LEVEL/' buf.yaml >"$prelevels"
  grep -q RPC_SAME_IDEMPOTENCY_LEVEL "$prelevels"
  # Uncommitted edits are compared against HEAD; committed history against each
  # earlier commit that touched proto/ (so a break anywhere in a push is caught).
  if ! git diff --quiet HEAD -- proto; then
    if git grep -q idempotency_level HEAD -- proto; then
      "$BUF" breaking proto --against ".git#ref=HEAD,subdir=proto"
    else
      "$BUF" breaking . --against ".git#ref=HEAD" --config "$prelevels"
    fi
    compared=$((compared + 1))
  fi
  for ref in $(git log --format=%H -n 25 HEAD~1 -- proto 2>/dev/null || true); do
    if git cat-file -e "$ref:proto" 2>/dev/null; then
      if git grep -q idempotency_level "$ref" -- proto; then
        "$BUF" breaking proto --against ".git#ref=$ref,subdir=proto"
      else
        "$BUF" breaking . --against ".git#ref=$ref" --config "$prelevels"
      fi
      compared=$((compared + 1))
    fi
  done
fi
echo "contracts: no breaking change against $compared earlier contract versions"
echo "contracts: generated code"
"$PY" scripts/gen.py --check
