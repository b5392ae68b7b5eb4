"""The Kubernetes manifests: strict schema validation with kubernetes-validate (the official API schemas),
and their wiring checked against the server: probes, settings, GPUs, autoscaling, Prometheus targets."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest
import yaml

from server.config import Settings, env_name, settings_from_args
from server.routes import ops_router

REPO = Path(__file__).resolve().parent.parent
K8S = REPO / "deploy" / "k8s"
MANIFESTS = sorted(K8S.glob("*.yaml"))
SETTING_VARS = {env_name(f.name) for f in fields(Settings)}


def resources() -> list[dict]:
    return [doc for path in MANIFESTS for doc in yaml.safe_load_all(path.read_text()) if doc]


def find(kind: str, name: str) -> dict:
    return next(r for r in resources() if r["kind"] == kind and r["metadata"]["name"] == name)


def container(deployment: str) -> dict:
    (only,) = find("Deployment", deployment)["spec"]["template"]["spec"]["containers"]
    return only


def env_of(deployment: str) -> dict[str, dict]:
    return {e["name"]: e for e in container(deployment).get("env", [])}


@pytest.mark.parametrize("version", ["1.29.0", "1.37.0"])
def test_manifests_pass_strict_validation_against_the_kubernetes_api_schemas(version):
    pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
    command = [sys.executable, "-m", "kubernetes_validate", "--strict", "--quiet", "-k", version, *map(str, MANIFESTS)]
    result = subprocess.run(command, check=False, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_setting_the_manifests_give_is_a_server_setting_the_server_accepts():
    config = find("ConfigMap", "nextstep-config")["data"]
    assert set(config) <= SETTING_VARS
    for deployment in ("nextstep-api", "nextstep-worker"):
        env = env_of(deployment)
        assert set(env) <= SETTING_VARS
        assert container(deployment)["envFrom"] == [{"configMapRef": {"name": "nextstep-config"}}]
        plain = {name: e["value"] for name, e in env.items() if "value" in e}
        settings = settings_from_args([], environ={**config, **plain})
        assert settings.role == plain["NEXTSTEP_ROLE"] and settings.redis_url == config["NEXTSTEP_REDIS_URL"]


def test_api_and_workers_reach_redis_through_its_service():
    service = find("Service", "nextstep-redis")
    url = find("ConfigMap", "nextstep-config")["data"]["NEXTSTEP_REDIS_URL"]
    assert url == f"redis://{service['metadata']['name']}:{service['spec']['ports'][0]['port']}/0"


def test_roles_are_api_and_worker():
    assert env_of("nextstep-api")["NEXTSTEP_ROLE"]["value"] == "api"
    assert env_of("nextstep-worker")["NEXTSTEP_ROLE"]["value"] == "worker"


def test_probes_use_the_servers_health_and_ready_routes_on_its_port():
    routes = {route.path for route in ops_router.routes}
    for deployment in ("nextstep-api", "nextstep-worker"):
        spec = container(deployment)
        ports = {p["name"]: p["containerPort"] for p in spec["ports"]}
        assert ports == {"http": Settings().port}
        assert (
            spec["livenessProbe"]["httpGet"]["path"] == "/health"
            and spec["readinessProbe"]["httpGet"]["path"] == "/ready"
        )
        assert {"/health", "/ready"} <= routes


def test_each_worker_pod_takes_one_gpu_and_names_itself_after_the_pod():
    worker = container("nextstep-worker")
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert env_of("nextstep-worker")["NEXTSTEP_DEVICE"]["value"] == "cuda"
    name = env_of("nextstep-worker")["NEXTSTEP_WORKER_NAME"]["valueFrom"]["fieldRef"]["fieldPath"]
    assert name == "metadata.name"


def test_pods_run_as_the_images_non_root_user_with_checkpoints_mounted_read_only():
    user = next(line.split()[1] for line in (REPO / "Dockerfile").read_text().splitlines() if line.startswith("USER"))
    for deployment in ("nextstep-api", "nextstep-worker"):
        pod = find("Deployment", deployment)["spec"]["template"]["spec"]
        assert pod["securityContext"] == {"runAsNonRoot": True, "runAsUser": int(user.split(":")[0])}
        (mount,) = container(deployment)["volumeMounts"]
        assert mount["mountPath"] == "/models" and mount["readOnly"]
        assert pod["volumes"][0]["persistentVolumeClaim"]["claimName"] == "nextstep-models"


def test_workers_scale_on_the_queue_depth_metric_the_adapter_serves():
    hpa = find("HorizontalPodAutoscaler", "nextstep-worker")["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "nextstep-worker"}
    (metric,) = hpa["metrics"]
    adapter = yaml.safe_load(find("ConfigMap", "prometheus-adapter")["data"]["config.yaml"])
    (rule,) = adapter["externalRules"]
    assert metric["type"] == "External" and metric["external"]["metric"]["name"] == rule["name"]["as"]
    assert rule["seriesQuery"].startswith("nextstep:queue_depth")
    assert 1 <= hpa["minReplicas"] < hpa["maxReplicas"]


def test_redis_keeps_its_streams_on_a_persistent_volume():
    redis = find("StatefulSet", "nextstep-redis")["spec"]
    (only,) = redis["template"]["spec"]["containers"]
    assert "--appendonly" in only["args"] and only["args"][only["args"].index("--appendonly") + 1] == "yes"
    assert only["volumeMounts"][0]["mountPath"] == "/data"
    assert redis["volumeClaimTemplates"][0]["metadata"]["name"] == only["volumeMounts"][0]["name"]


def test_prometheus_finds_every_api_and_worker_pod_through_headless_services():
    config = yaml.safe_load((REPO / "deploy" / "prometheus" / "kubernetes.yml").read_text())
    for job in config["scrape_configs"]:
        component = job["job_name"].removeprefix("nextstep-")
        service = find("Service", f"nextstep-{component}-metrics")
        assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"]
        assert (
            service["spec"]["selector"]
            == find("Deployment", f"nextstep-{component}")["spec"]["selector"]["matchLabels"]
        )
        (sd,) = job["dns_sd_configs"]
        assert sd["names"] == [f"nextstep-{component}-metrics.nextstep.svc.cluster.local"]
        assert sd["port"] == service["spec"]["ports"][0]["port"] == Settings().port
