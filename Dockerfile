# Switchboard's image: `switchboard serve` (every service, or those in SWITCHBOARD_SERVICES),
# `switchboard migrate`, `switchboard envoy` and the other subcommands.
#
#   docker build -t switchboard:0.2.0 .
#
# deploy/compose.yaml runs the mesh shape from it; deploy/k8s/ deploys it on Kubernetes.
# docs/operations.md ("Deploying") explains both. tests/unit/test_deploy.py checks this file
# (stages, a non-root USER, what it copies against .dockerignore); CI builds no image.

ARG PYTHON_IMAGE=python:3.11-slim

# The builder: a wheel of the project, installed with its dependencies into a virtualenv
# that the runtime stage copies as it is (same base image, same path).
FROM ${PYTHON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
RUN python -m venv /opt/switchboard
# gen/ is committed and checked against a fresh generation (scripts/check-contracts.sh), so
# the image takes it as it is: no protoc, no grpcio-tools in the build.
COPY pyproject.toml README.md ./
COPY clients/python/ clients/python/
COPY services/ services/
COPY gen/ gen/
# Two wheels: switchboard-client (the client and the generated contracts) and the server,
# which depends on it; installed together, the client comes from here, never an index. No
# extra: pyproject.toml's dependencies are what `serve`, `migrate`, `envoy` and `edge-health`
# need (`make run` installs the same); its extras are the local servers, `make mesh`'s Envoy
# and PostgreSQL, and the development tools.
RUN pip wheel --no-deps --wheel-dir /wheels ./clients/python . \
    && /opt/switchboard/bin/pip install /wheels/*.whl
# The all-in-one shape's Envoy config, rendered by the image's own generator, for an Envoy
# beside the server (same pod or host network). The mesh shape's configs depend on service
# addresses: deploy/ holds them, rendered by scripts/render-deploy.py.
RUN mkdir -p /opt/envoy \
    && /opt/switchboard/bin/switchboard envoy --shape all-in-one \
        --upstream 127.0.0.1:50051 --listen 0.0.0.0:8080 --admin 127.0.0.1:9901 \
        --output /opt/envoy/all-in-one.yaml

FROM ${PYTHON_IMAGE} AS runtime
# A fixed uid and gid, so volume and secret permissions can be set for them
# (Kubernetes: runAsUser/fsGroup 10001).
RUN groupadd --system --gid 10001 switchboard \
    && useradd --system --uid 10001 --gid 10001 --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin switchboard \
    && install -d -o 10001 -g 10001 -m 0700 /var/lib/switchboard
COPY --from=builder /opt/switchboard /opt/switchboard
COPY --from=builder /opt/envoy /etc/switchboard/envoy
# Bytecode was compiled at install time; the root filesystem may be read-only.
# SWITCHBOARD_HOST: a container serves on every interface (the server's default is loopback).
ENV PATH=/opt/switchboard/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    SWITCHBOARD_HOST=0.0.0.0 \
    SWITCHBOARD_PORT=50051
# The working directory is the only one the user may write: `switchboard serve --dev` keeps
# its SQLite file there (mount a volume on it to keep the data).
WORKDIR /var/lib/switchboard
USER 10001:10001
EXPOSE 50051
ENTRYPOINT ["switchboard"]
CMD ["serve"]
