"""The deployment files: Kubernetes manifests, the compose file, Prometheus and Grafana.

Kubernetes objects are validated against the Kubernetes schemas that
kubernetes-validate ships; KEDA's ScaledObject is a custom resource it has no
schema for, so a structural check asserts the fields KEDA requires (its HPA
behaviour block is validated as the Kubernetes type it is). The compose file is
checked by `docker compose config` (or `docker-compose config`, which `make test`
installs from Debian) and by a structural check. Every PromQL expression
(the dashboard's, KEDA's) may name only metrics that /metrics serves, as
declared by the code that serves them.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml  # type: ignore[import-untyped]
from flask import Flask

from api.metrics import SCOPES, exposed_sample_names
from api.metrics import bp as metrics_bp

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
KUBERNETES = DEPLOY / "kubernetes"
KUBERNETES_VERSION = "1.33.0"  # a version kubernetes-validate ships schemas for
API_HOST = "kolors-farm-api"  # the compose alias, the Kubernetes Service, Prometheus' target
API_PORT = 8000


def kubernetes_documents() -> list[tuple[str, dict[str, Any]]]:
    documents = []
    for path in sorted(KUBERNETES.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            if document:
                documents.append((path.name, document))
    return documents


def by_kind(kind: str) -> list[dict[str, Any]]:
    return [document for _name, document in kubernetes_documents() if document["kind"] == kind]


# ---------------------------------------------------------------- PromQL


_PROMQL_WORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless",
    "bool", "offset", "inf", "nan",
}  # fmt: skip


def promql_metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (functions, keywords, labels left out)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # range selectors
    expr = re.sub(r"\b(offset|@)\s*-?[\w.]+", "", expr)  # offsets and @ times
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", expr):
        if expr[match.end() :].lstrip().startswith("("):
            continue  # a function or an aggregation
        if match.group(0).lower() not in _PROMQL_WORDS:
            names.add(match.group(0))
    return names


def test_promql_names_are_extracted_from_expressions() -> None:
    expr = (
        "histogram_quantile(0.9, sum by (le, tenant) (rate(kolors_farm_render_seconds_bucket"
        '{tenant=~"$tenant"}[$__rate_interval]))) or vector(0) + on(x) up offset 5m'
    )
    assert promql_metric_names(expr) == {"kolors_farm_render_seconds_bucket", "up"}


# ---------------------------------------------------------------- Kubernetes


def test_every_kubernetes_manifest_is_valid_against_the_kubernetes_schemas() -> None:
    validated = 0
    for name, document in kubernetes_documents():
        if document["apiVersion"].startswith("keda.sh/"):
            continue  # a custom resource: see the ScaledObject test below
        version = kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)
        assert version == "1.33", name
        validated += 1
    kinds = {document["kind"] for _name, document in kubernetes_documents()}
    assert {"Deployment", "Service", "ScaledObject"} <= kinds
    assert validated >= 4


def test_a_broken_manifest_is_refused() -> None:
    (deployment, *_rest) = by_kind("Deployment")
    broken = json.loads(json.dumps(deployment))
    broken["spec"]["template"]["spec"]["containers"][0]["ports"] = [{"containerPort": "http"}]
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def test_the_api_service_selects_the_api_pods_on_the_port_prometheus_scrapes() -> None:
    (service,) = (s for s in by_kind("Service") if s["metadata"]["name"] == API_HOST)
    (api,) = (d for d in by_kind("Deployment") if d["metadata"]["name"] == "kolors-farm-api")
    assert service["spec"]["clusterIP"] == "None"  # DNS lists every pod: one target each
    labels = api["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    (port,) = service["spec"]["ports"]
    assert port["port"] == API_PORT
    container = api["spec"]["template"]["spec"]["containers"][0]
    assert {"name": port["targetPort"], "containerPort": API_PORT} in container["ports"]
    env = {item["name"]: item.get("value") for item in container["env"]}
    mounts = {mount["mountPath"] for mount in container["volumeMounts"]}
    assert env["PROMETHEUS_MULTIPROC_DIR"] in mounts  # pod-local, not shared between pods


# KEDA v2's ScaledObjectSpec fields and the ones its CRD requires.
_SCALED_OBJECT_FIELDS = {
    "scaleTargetRef", "pollingInterval", "initialCooldownPeriod", "cooldownPeriod",
    "idleReplicaCount", "minReplicaCount", "maxReplicaCount", "fallback", "advanced", "triggers",
}  # fmt: skip
_TRIGGER_FIELDS = {
    "type",
    "name",
    "metadata",
    "authenticationRef",
    "metricType",
    "useCachedMetrics",
}


def test_keda_scaled_object_structure_scales_the_worker_deployment_on_the_queue() -> None:
    """Structural check of the ScaledObject (KEDA's CRD schema is not vendored here)."""
    (scaled,) = by_kind("ScaledObject")
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    assert scaled["metadata"]["name"]
    spec = scaled["spec"]
    assert set(spec) <= _SCALED_OBJECT_FIELDS
    assert {"scaleTargetRef", "triggers"} <= set(spec)  # required by the CRD
    target = spec["scaleTargetRef"]
    workers = [d for d in by_kind("Deployment") if d["metadata"]["name"] == target["name"]]
    assert len(workers) == 1, f"no Deployment named {target['name']}"
    assert (target.get("apiVersion", "apps/v1"), target.get("kind", "Deployment")) == (
        "apps/v1",
        "Deployment",
    )
    # KEDA owns the replica count; a fixed one would be reset by every `kubectl apply`.
    assert "replicas" not in workers[0]["spec"]
    for field in ("pollingInterval", "cooldownPeriod", "minReplicaCount", "maxReplicaCount"):
        assert isinstance(spec[field], int) and spec[field] >= 0, field
    assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]

    # The HPA behaviour block is a Kubernetes type: validate it as one.
    hpa = {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": "behaviour-check"},
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "w"},
            "maxReplicas": spec["maxReplicaCount"],
            "behavior": spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"],
        },
    }
    kubernetes_validate.validate(hpa, KUBERNETES_VERSION, strict=True)

    (trigger,) = spec["triggers"]
    assert set(trigger) <= _TRIGGER_FIELDS and trigger["type"] == "prometheus"
    assert trigger["metricType"] in {"AverageValue", "Value", "Utilization"}
    metadata = trigger["metadata"]
    assert all(isinstance(value, str) for value in metadata.values())  # the CRD's map of strings
    assert metadata["serverAddress"].startswith("http")
    assert float(metadata["threshold"]) > 0
    assert float(metadata["activationThreshold"]) >= 0
    names = promql_metric_names(metadata["query"])
    assert "kolors_farm_queue_depth" in names
    assert names <= exposed_sample_names(), names - exposed_sample_names()


# ---------------------------------------------------------------- compose

_COMPOSE_TOP = {"version", "name", "services", "networks", "volumes", "configs", "secrets"}
_COMPOSE_SERVICE = {
    "build", "command", "container_name", "depends_on", "deploy", "entrypoint", "env_file",
    "environment", "expose", "healthcheck", "image", "labels", "logging", "networks", "ports",
    "profiles", "restart", "stop_grace_period", "stop_signal", "tmpfs", "ulimits", "user",
    "volumes", "working_dir", "extra_hosts", "shm_size", "init",
}  # fmt: skip


def compose_file() -> dict[str, Any]:
    compose: dict[str, Any] = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    return compose


def compose_cli() -> list[str] | None:
    """`docker compose` (v2) or `docker-compose` (v1), whichever is installed."""
    docker = shutil.which("docker")
    if docker is not None:
        probe = subprocess.run([docker, "compose", "version"], capture_output=True, timeout=60)
        if probe.returncode == 0:
            return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy else None


def test_compose_file_is_valid() -> None:
    compose = compose_file()
    assert {key for key in compose if not key.startswith("x-")} <= _COMPOSE_TOP
    services: dict[str, Any] = compose["services"]
    volumes = set(compose.get("volumes") or {})
    for name, service in services.items():
        assert set(service) <= _COMPOSE_SERVICE, (name, set(service) - _COMPOSE_SERVICE)
        assert "image" in service or "build" in service, name
        for dependency in service.get("depends_on", []):
            assert dependency in services, (name, dependency)
        for value in (service.get("environment") or {}).values():
            assert isinstance(value, str | int | float | bool), (name, value)
        for mount in service.get("volumes", []):
            source = mount.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), (name, source)  # relative to the file
            else:
                assert source in volumes, (name, source)
        if "build" in service:
            assert (DEPLOY / service["build"]["context"] / service["build"]["dockerfile"]).exists()
    # The name Prometheus scrapes reaches the API.
    assert API_HOST in services["api"]["networks"]["default"]["aliases"]
    assert "PROMETHEUS_MULTIPROC_DIR" in services["api"]["environment"]

    cli = compose_cli()
    # The compose CLI checks the file against the compose specification.
    assert cli is not None, "install a compose CLI (apt-get install docker-compose; make test does)"
    for profile in ([], ["--profile", "monitoring"]):
        checked = subprocess.run(
            [*cli, "-f", str(DEPLOY / "compose.yaml"), *profile, "config", "--quiet"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert checked.returncode == 0, checked.stderr


def test_compose_monitoring_serves_the_shipped_prometheus_and_grafana_files() -> None:
    services = compose_file()["services"]
    for name, files in (
        ("prometheus", ["./prometheus/prometheus.yml"]),
        ("grafana", ["./grafana/kolors-farm.json", "./grafana/provisioning"]),
    ):
        assert services[name]["profiles"] == ["monitoring"]
        mounted = {mount.split(":")[0] for mount in services[name]["volumes"]}
        assert set(files) <= mounted, name


# ---------------------------------------------------------------- Prometheus and Grafana


def test_prometheus_scrapes_the_api_metrics_route() -> None:
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    app = Flask(__name__)
    app.register_blueprint(metrics_bp)
    routes = app.url_map.bind("localhost")
    scopes = set()
    for job in config["scrape_configs"]:
        path = job["metrics_path"]
        endpoint, _args = routes.match(path, method="GET")
        assert endpoint == "metrics.metrics", path
        (scope,) = job["params"]["scope"]
        assert scope in SCOPES
        scopes.add(scope)
        targets = [
            target for static in job.get("static_configs", []) for target in static["targets"]
        ]
        for discovery in job.get("dns_sd_configs", []):
            targets += [f"{name}:{discovery['port']}" for name in discovery["names"]]
        assert targets == [f"{API_HOST}:{API_PORT}"], job["job_name"]
        if scope == "farm":
            # Farm-wide values are the same on every replica: one target, else counted twice.
            assert "dns_sd_configs" not in job
    assert scopes == {"farm", "api"}


def dashboard_panels() -> list[dict[str, Any]]:
    dashboard = json.loads((DEPLOY / "grafana" / "kolors-farm.json").read_text())
    panels = []
    for panel in dashboard["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))  # a collapsed row holds its panels
    return panels


def test_dashboard_queries_only_metrics_that_metrics_serves() -> None:
    dashboard = json.loads((DEPLOY / "grafana" / "kolors-farm.json").read_text())
    exposed = exposed_sample_names()
    used: set[str] = set()
    panels = dashboard_panels()
    assert len({panel["id"] for panel in panels}) == len(panels)
    for panel in panels:
        for target in panel.get("targets", []):
            names = promql_metric_names(target["expr"])
            assert names, (panel["title"], target["expr"])
            assert names <= exposed, (panel["title"], names - exposed)
            used |= names
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            (metric,) = re.findall(r"label_values\((\w+),", variable["definition"])
            assert metric in exposed
    # What the dashboard is for: queues, rates, latencies, output, credits, workers, memory.
    assert {
        "kolors_farm_queue_depth",
        "kolors_farm_queue_oldest_age_seconds",
        "kolors_farm_requests_submitted_total",
        "kolors_farm_requests_finished_total",
        "kolors_farm_queue_wait_seconds_bucket",
        "kolors_farm_render_seconds_bucket",
        "kolors_farm_images_rendered_total",
        "kolors_farm_credits_captured_total",
        "kolors_farm_workers_live",
        "kolors_farm_worker_busy_fraction",
        "kolors_farm_worker_memory_used_bytes",
    } <= used


def test_grafana_provisioning_points_at_the_dashboard_and_prometheus() -> None:
    provisioning = DEPLOY / "grafana" / "provisioning"
    sources = yaml.safe_load((provisioning / "datasources" / "prometheus.yaml").read_text())
    (source,) = sources["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    providers = yaml.safe_load((provisioning / "dashboards" / "kolors-farm.yaml").read_text())
    (provider,) = providers["providers"]
    grafana = compose_file()["services"]["grafana"]
    mounted = {mount.split(":")[1] for mount in grafana["volumes"]}
    assert f"{provider['options']['path']}/kolors-farm.json" in mounted
