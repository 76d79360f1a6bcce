#!/usr/bin/env python3
"""Render the deployment files that come from the Envoy generator (``make deploy-files``).

    scripts/render-deploy.py           write them
    scripts/render-deploy.py --check   write nothing; exit 1 with a diff when one is stale

Both shapes of the mesh get their Envoy config from ``switchboard envoy --shape mesh``
(services/switchboard/deploy/edge/envoy.py), run in-process with the command's own parser:

- deploy/compose-envoy.yaml for deploy/compose.yaml: a cluster per service, its replicas
  the compose services whose SWITCHBOARD_SERVICES serve it;
- deploy/k8s/envoy-config.yaml, a ConfigMap for deploy/k8s/envoy.yaml: each service at its
  headless Service's cluster DNS name, which resolves to every ready pod;
- the config digest annotation of deploy/k8s/envoy.yaml, so a changed config rolls Envoy.

Both route health and reflection to ``switchboard edge-health`` (the compose service and the
Deployment named ``edge-health``), whose ``--service`` list must be the one Envoy's config is
rendered from: the script refuses to render when they differ.

The upstreams are read from the manifests, and so are the server limits Envoy must agree
with (ServerLimits: the SWITCHBOARD_* values the processes get there, else the defaults);
nothing is read from this machine's environment. tests/deploy/test_deploy.py runs ``--check``.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import hashlib
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final

import yaml

from switchboard.deploy import commands
from switchboard.deploy.edge.envoy import API, ServerLimits, Tracing, render

ROOT: Final = Path(__file__).resolve().parents[1]
DEPLOY: Final = ROOT / "deploy"
COMPOSE: Final = DEPLOY / "compose.yaml"
COMPOSE_ENVOY: Final = DEPLOY / "compose-envoy.yaml"
K8S: Final = DEPLOY / "k8s"
K8S_ENVOY_CONFIG: Final = K8S / "envoy-config.yaml"
K8S_ENVOY: Final = K8S / "envoy.yaml"
K8S_SETTINGS: Final = K8S / "config.yaml"
#: The port every Switchboard container serves on (SWITCHBOARD_PORT in the Dockerfile).
PORT: Final = 50051
NAMESPACE: Final = "switchboard"
CLUSTER_DOMAIN: Final = "cluster.local"
#: The line of deploy/k8s/envoy.yaml this script owns (the rest is written by hand).
DIGEST_ANNOTATION: Final = "switchboard.dev/envoy-config-sha256"
_DIGEST_LINE: Final = re.compile(rf'^(\s*{re.escape(DIGEST_ANNOTATION)}: )"[0-9a-f]*"$', re.M)

# Where Envoy finds its TLS files, in each shape (compose secrets; the Secret "envoy-tls").
COMPOSE_TLS: Final = ("/run/secrets/dev-cert.pem", "/run/secrets/dev-key.pem")
K8S_TLS: Final = ("/etc/envoy-tls/tls.crt", "/etc/envoy-tls/tls.key")


#: The compose service and the Kubernetes Deployment (and headless Service) of ``switchboard
#: edge-health``, which answers health and reflection for the whole mesh.
EDGE_HEALTH: Final = "edge-health"


class DeployError(Exception):
    """The manifests do not describe a mesh the generator can front."""


def _load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def _load_all(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def envoy_text(argv: Sequence[str], settings: Mapping[str, str]) -> str:
    """What ``switchboard envoy ARGV`` prints beside processes that get ``settings``."""
    parser = argparse.ArgumentParser(prog="switchboard")
    commands.add_envoy_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["envoy", *argv])
    # The command reads the limits (and the OTEL_* tracing) from its environment, as the
    # servers do; here the servers' environment is the manifest's, not this machine's.
    spec = dataclasses.replace(
        commands.envoy_spec(args),
        limits=ServerLimits.from_environment(settings),
        tracing=Tracing.from_environment(settings),
    )
    # The command line, one option a line, for an operator who renders it by hand.
    lines = ["switchboard envoy"]
    for arg in argv:
        if arg.startswith("--"):
            lines.append(arg)
        else:
            lines[-1] += f" {arg}"
    command = " \\\n#     ".join(lines)
    header = f"# Rendered by scripts/render-deploy.py (make deploy-files) as:\n#   {command}\n"
    return header + render(spec)


def _service_args(upstreams: Mapping[str, Sequence[str]]) -> list[str]:
    missing = [name for name in API if not upstreams.get(name)]
    if missing:
        raise DeployError(f"no process serves {', '.join(missing)}")
    args: list[str] = []
    for name in API:
        args += ["--service", f"{name}={','.join(upstreams[name])}"]
    return args


def _check_edge_health(command: Sequence[str], service_args: Sequence[str], where: str) -> None:
    """edge-health must know the replicas Envoy routes to (the same ``--service`` list)."""
    expected = [f"--service={value}" for value in service_args[1::2]]
    given = [str(arg) for arg in command if str(arg).startswith("--service")]
    if given != expected:
        raise DeployError(
            f"{where}: edge-health's --service arguments must be Envoy's: {' '.join(expected)}"
        )


def _edge_args(cert: str, key: str) -> list[str]:
    """The listeners both deployments share: plain 8080, TLS 8443, admin on loopback."""
    return [
        "--listen",
        "0.0.0.0:8080",
        "--tls-listen",
        "0.0.0.0:8443",
        "--tls-cert",
        cert,
        "--tls-key",
        key,
        "--admin",
        "127.0.0.1:9901",
    ]


def _served(settings: Mapping[str, Any]) -> list[str]:
    return [part.strip() for part in str(settings.get("SWITCHBOARD_SERVICES", "")).split(",")]


# Compose.


def compose_settings(compose: Mapping[str, Any]) -> dict[str, str]:
    """The SWITCHBOARD_* settings every Switchboard service of the compose file shares."""
    shared = compose["x-switchboard"]["environment"]
    return {str(key): str(value) for key, value in shared.items()}


def compose_envoy() -> str:
    compose = _load(COMPOSE)
    upstreams: dict[str, list[str]] = {}
    for name, service in compose["services"].items():
        for served in _served(service.get("environment") or {}):
            if served:
                upstreams.setdefault(served, []).append(f"{name}:{PORT}")
    cert, key = COMPOSE_TLS
    services = _service_args(upstreams)
    edge_health = compose["services"].get(EDGE_HEALTH)
    if edge_health is None:
        raise DeployError(f"{COMPOSE.name} has no service {EDGE_HEALTH}")
    _check_edge_health(edge_health.get("command", []), services, COMPOSE.name)
    argv = [
        "--shape",
        "mesh",
        *services,
        *_edge_args(cert, key),
        "--edge-health",
        f"{EDGE_HEALTH}:{PORT}",
    ]
    return envoy_text(argv, compose_settings(compose))


# Kubernetes.


def k8s_documents() -> list[dict[str, Any]]:
    """Every resource under deploy/k8s except the rendered ConfigMap and the kustomization."""
    documents: list[dict[str, Any]] = []
    for path in sorted(K8S.glob("*.yaml")):
        if path in (K8S_ENVOY_CONFIG, K8S / "kustomization.yaml"):
            continue
        documents += _load_all(path)
    return documents


def k8s_settings(documents: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    for doc in documents:
        if doc["kind"] == "ConfigMap" and doc["metadata"]["name"] == "switchboard-config":
            return {str(key): str(value) for key, value in doc["data"].items()}
    raise DeployError(f"{K8S_SETTINGS.name} has no ConfigMap switchboard-config")


def _env(container: Mapping[str, Any]) -> dict[str, str]:
    return {e["name"]: str(e.get("value", "")) for e in container.get("env", [])}


def k8s_upstreams(documents: Sequence[Mapping[str, Any]]) -> dict[str, list[str]]:
    """Each service's headless Service, by the cluster DNS name Envoy resolves."""
    services = [doc for doc in documents if doc["kind"] == "Service"]
    upstreams: dict[str, list[str]] = {}
    for doc in documents:
        if doc["kind"] != "Deployment":
            continue
        labels = doc["spec"]["template"]["metadata"]["labels"]
        for container in doc["spec"]["template"]["spec"]["containers"]:
            for served in _served(_env(container)):
                if not served:
                    continue
                fronting = [
                    svc
                    for svc in services
                    if svc["spec"].get("clusterIP") == "None"
                    and all(labels.get(k) == v for k, v in svc["spec"]["selector"].items())
                ]
                if len(fronting) != 1:
                    raise DeployError(
                        f"Deployment {doc['metadata']['name']} ({served}) needs exactly one "
                        f"headless Service, found {len(fronting)}"
                    )
                svc = fronting[0]
                host = f"{svc['metadata']['name']}.{svc['metadata']['namespace']}.svc"
                upstreams.setdefault(served, []).append(f"{host}.{CLUSTER_DOMAIN}:{PORT}")
    return upstreams


def k8s_replicas(documents: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    """How many pods serve each service: a headless Service's name stands for all of them."""
    counts: dict[str, int] = {}
    for doc in documents:
        if doc["kind"] != "Deployment":
            continue
        for container in doc["spec"]["template"]["spec"]["containers"]:
            for served in _served(_env(container)):
                if served:
                    counts[served] = counts.get(served, 0) + int(doc["spec"].get("replicas", 1))
    return counts


def k8s_envoy_config(documents: Sequence[Mapping[str, Any]]) -> str:
    cert, key = K8S_TLS
    replicas = k8s_replicas(documents)
    services = _service_args(k8s_upstreams(documents))
    edge_health = [
        doc
        for doc in documents
        if doc["kind"] == "Deployment" and doc["metadata"]["name"] == EDGE_HEALTH
    ]
    if len(edge_health) != 1:
        raise DeployError(f"deploy/k8s needs one Deployment {EDGE_HEALTH}")
    (container,) = edge_health[0]["spec"]["template"]["spec"]["containers"]
    _check_edge_health(container.get("args", []), services, f"{EDGE_HEALTH}.yaml")
    argv = [
        "--shape",
        "mesh",
        *services,
        *[arg for name in API for arg in ("--replicas", f"{name}={replicas[name]}")],
        *_edge_args(cert, key),
        "--edge-health",
        f"{EDGE_HEALTH}.{NAMESPACE}.svc.{CLUSTER_DOMAIN}:{PORT}",
    ]
    config = envoy_text(argv, k8s_settings(documents))
    body = "".join(f"    {line}" if line.strip() else "\n" for line in config.splitlines(True))
    return (
        "# Envoy's bootstrap for deploy/k8s/envoy.yaml. Generated: do not edit; change the\n"
        "# manifests or the generator and run `make deploy-files` (scripts/render-deploy.py).\n"
        "apiVersion: v1\n"
        "kind: ConfigMap\n"
        "metadata:\n"
        "  name: envoy-config\n"
        f"  namespace: {NAMESPACE}\n"
        "  labels:\n"
        "    app.kubernetes.io/name: envoy\n"
        "    app.kubernetes.io/component: edge\n"
        "    app.kubernetes.io/part-of: switchboard\n"
        "data:\n"
        "  envoy.yaml: |\n"
        f"{body.rstrip()}\n"
    )


def with_digest(deployment: str, config_map: str) -> str:
    """deploy/k8s/envoy.yaml with its config digest annotation set for ``config_map``."""
    digest = hashlib.sha256(config_map.encode()).hexdigest()
    updated, count = _DIGEST_LINE.subn(rf'\g<1>"{digest}"', deployment)
    if count != 1:
        raise DeployError(f'{K8S_ENVOY.name} needs one `{DIGEST_ANNOTATION}: "..."` line')
    return updated


def render_all() -> dict[Path, str]:
    """Every file this script owns, as it should read."""
    documents = k8s_documents()
    config_map = k8s_envoy_config(documents)
    return {
        COMPOSE_ENVOY: compose_envoy(),
        K8S_ENVOY_CONFIG: config_map,
        K8S_ENVOY: with_digest(K8S_ENVOY.read_text(), config_map),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--check", action="store_true", help="write nothing; exit 1 if a file is not current"
    )
    args = parser.parse_args(argv)
    try:
        files = render_all()
    except DeployError as exc:
        print(f"render-deploy: {exc}", file=sys.stderr)
        return 2
    stale = 0
    for path, text in files.items():
        current = path.read_text() if path.exists() else ""
        if current == text:
            continue
        name = str(path.relative_to(ROOT))
        if args.check:
            stale += 1
            diff = difflib.unified_diff(
                current.splitlines(True), text.splitlines(True), name, f"{name} (rendered)", n=1
            )
            sys.stdout.writelines(list(diff)[:200])
        else:
            path.write_text(text)
            print(f"wrote {name}")
    if stale:
        print(f"render-deploy: {stale} file(s) not current; run `make deploy-files`")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
