"""Monitoring: Prometheus config and alert rules under promtool, the Grafana dashboard's structure, metric
names cross-checked against what the server exports, the GPU memory gauges, and a real Prometheus scraping a
live fleet (two API replicas and a worker in Redis mode) that evaluates every panel and fires every alert."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest
import yaml

from server.metrics import JOB_FAILURE_REASONS, GpuMemoryCollector, ServerMetrics, cuda_memory_in_use
from tests.conftest import LiveServer, free_port, wait_until

REPO = Path(__file__).resolve().parent.parent
PROMETHEUS_DIR = REPO / "deploy" / "prometheus"
GRAFANA_DIR = REPO / "deploy" / "grafana"
DASHBOARD = GRAFANA_DIR / "dashboards" / "nextstep.json"
METRIC_NAME = re.compile(r"nextstep:[a-zA-Z0-9_]+")
SAMPLE_SUFFIXES = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count")}


def promtool(*args: str) -> subprocess.CompletedProcess:
    binary = shutil.which("promtool")
    if binary is None:
        pytest.skip("promtool is not installed (apt-get install prometheus)")
    return subprocess.run([binary, *args], check=False, cwd=PROMETHEUS_DIR, capture_output=True, text=True, timeout=60)


def dashboard_panels() -> list[dict]:
    return [p for p in json.loads(DASHBOARD.read_text())["panels"] if p["type"] != "row"]


def dashboard_exprs() -> list[str]:
    return [t["expr"] for p in dashboard_panels() for t in p["targets"]]


def alert_rules() -> list[dict]:
    groups = yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def exported_samples() -> dict[str, str]:
    """Every sample name the server can export -> the metric family it belongs to."""
    samples = {}
    for family in ServerMetrics().registry.collect():
        for suffix in SAMPLE_SUFFIXES[family.type]:
            samples[family.name + suffix] = family.name
    return samples


# promtool


@pytest.mark.parametrize(
    "args",
    [
        ("check", "config", "prometheus.yml"),  # compose's Prometheus
        ("check", "config", "kubernetes.yml"),  # the Kubernetes one
        ("check", "rules", "alerts.yml"),
        ("test", "rules", "alerts_test.yml"),  # the alert rules' unit tests
    ],
)
def test_prometheus_files_pass_promtool(args):
    result = promtool(*args)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_unit_test_that_expects_it_to_fire():
    tests = yaml.safe_load((PROMETHEUS_DIR / "alerts_test.yml").read_text())["tests"]
    fired = {case["alertname"] for test in tests for case in test["alert_rule_test"] if case["exp_alerts"]}
    assert fired == {rule["alert"] for rule in alert_rules()}


def test_every_alert_has_a_severity_and_says_what_to_do():
    for rule in alert_rules():
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]


# the dashboard


def test_dashboard_panels_tile_the_grid_without_overlapping():
    taken = set()
    panels = json.loads(DASHBOARD.read_text())["panels"]
    for panel in panels:
        g = panel["gridPos"]
        assert g["x"] >= 0 and g["w"] > 0 and g["x"] + g["w"] <= 24, panel["title"]
        cells = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & taken, f"{panel['title']} overlaps another panel"
        taken |= cells
    assert len({p["id"] for p in panels}) == len(panels)


def test_every_panel_queries_the_provisioned_prometheus_datasource():
    datasources = yaml.safe_load((GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yml").read_text())
    uid = datasources["datasources"][0]["uid"]
    for panel in dashboard_panels():
        assert panel["datasource"] == {"type": "prometheus", "uid": uid}, panel["title"]
        assert panel["targets"], panel["title"]
        assert len({t["refId"] for t in panel["targets"]}) == len(panel["targets"]), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == uid and target["expr"].strip(), panel["title"]


def test_dashboard_queries_use_no_template_variable_but_the_rate_interval():
    for expr in dashboard_exprs():
        assert set(re.findall(r"\$\w+", expr)) <= {"$__rate_interval"}, expr


def test_dashboard_shows_what_the_issue_asks_for():
    titles = " | ".join(p["title"].lower() for p in dashboard_panels())
    for wanted in (
        "waiting / running",
        "images/s",
        "tokens/s",
        "kv cache",
        "batch size",
        "step time",
        "queue time",
        "first preview",
        "end-to-end",
        "errors by reason",
        "workers",
        "gpu memory",
    ):
        assert wanted in titles, wanted


def test_grafana_provisioning_loads_the_folder_compose_mounts():
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    mounts = {m.split(":")[0]: m.split(":")[1] for m in compose["services"]["grafana"]["volumes"]}
    provider = yaml.safe_load((GRAFANA_DIR / "provisioning" / "dashboards" / "nextstep.yml").read_text())
    assert mounts["./deploy/grafana/dashboards"] == provider["providers"][0]["options"]["path"]
    assert mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    datasource = yaml.safe_load((GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yml").read_text())
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090" and "prometheus" in compose["services"]


# what the dashboards use against what the server exports


def test_every_metric_on_a_dashboard_or_in_an_alert_is_exported_by_the_server():
    samples = exported_samples()
    used = {
        name for expr in dashboard_exprs() + [r["expr"] for r in alert_rules()] for name in METRIC_NAME.findall(expr)
    }
    assert used and used <= set(samples), sorted(used - set(samples))


def test_every_metric_the_server_exports_is_on_the_dashboard():
    samples = exported_samples()
    shown = {samples[name] for expr in dashboard_exprs() for name in METRIC_NAME.findall(expr) if name in samples}
    assert shown == set(samples.values()), sorted(set(samples.values()) - shown)


def test_the_autoscaling_metric_is_exported_by_the_server():
    adapter = yaml.safe_load((REPO / "deploy" / "k8s" / "prometheus-adapter.yaml").read_text())
    rules = yaml.safe_load(adapter["data"]["config.yaml"])["externalRules"]
    assert {METRIC_NAME.search(rule["seriesQuery"]).group() for rule in rules} <= set(exported_samples())


# metrics the deployment added to the server


def test_job_failure_reasons_are_exported_at_zero_before_any_failure():
    text = ServerMetrics().exposition().decode()
    for reason in JOB_FAILURE_REASONS:
        assert f'nextstep:job_failures_total{{reason="{reason}"}} 0.0' in text


def test_gpu_memory_gauges_have_no_samples_in_a_process_without_cuda():
    text = ServerMetrics().exposition().decode()
    assert "# TYPE nextstep:gpu_memory_reserved_bytes gauge" in text
    assert not [line for line in text.splitlines() if line.startswith("nextstep:gpu_memory")]
    if not __import__("torch").cuda.is_initialized():
        assert cuda_memory_in_use() == {}


def test_gpu_memory_gauges_report_each_device_of_the_reading():
    reading = {"cuda:0": (1, 2, 3), "cuda:1": (10, 20, 30)}
    families = {f.name: f for f in GpuMemoryCollector(lambda: reading).collect()}
    for position, name in enumerate(("allocated", "reserved", "total")):
        samples = families[f"nextstep:gpu_memory_{name}_bytes"].samples
        assert {(s.labels["device"], s.value) for s in samples} == {(d, v[position]) for d, v in reading.items()}


# a real Prometheus scraping a live fleet

RATE_INTERVAL = "1m"
SCRAPE_S = 1


def prometheus_config(api_targets: list[str], worker_targets: list[str], rules_file: Path) -> dict:
    """deploy/prometheus/prometheus.yml with its job names, its targets replaced by these, scraped every second."""
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    config["global"] = {"scrape_interval": f"{SCRAPE_S}s", "evaluation_interval": f"{SCRAPE_S}s"}
    config["rule_files"] = [str(rules_file)]
    targets = {"nextstep-api": api_targets, "nextstep-worker": worker_targets}
    for job in config["scrape_configs"]:
        del job["dns_sd_configs"]
        job["static_configs"] = [{"targets": targets.pop(job["job_name"])}]
    assert not targets, f"jobs missing from prometheus.yml: {targets}"
    return config


def alerts_firing_at_once(tmp: Path) -> Path:
    """alerts.yml with every `for` removed: the same expressions, firing at their first true evaluation."""
    rules = yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            rule.pop("for", None)
    path = tmp / "alerts.yml"
    path.write_text(yaml.safe_dump(rules))
    return path


class Prometheus:
    def __init__(self, binary: str, config: dict, workdir: Path):
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.num_targets = sum(len(c["targets"]) for job in config["scrape_configs"] for c in job["static_configs"])
        self.url = f"http://127.0.0.1:{free_port()}"
        self.process = subprocess.Popen(
            [
                binary,
                f"--config.file={workdir / 'prometheus.yml'}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address={self.url.removeprefix('http://')}",
                "--log.level=warn",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def __enter__(self):
        wait_until(self._ready, timeout_s=30, what="prometheus to start")
        return self

    def __exit__(self, *exc) -> None:
        self.process.terminate()
        self.process.wait(timeout=15)

    def _ready(self) -> bool:
        try:
            return httpx.get(f"{self.url}/-/ready").status_code == 200
        except httpx.TransportError:
            return False

    def query(self, expr: str) -> list[dict]:
        reply = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}).json()
        assert reply["status"] == "success", f"{expr}: {reply}"
        return reply["data"]["result"]

    def firing(self, since: float) -> set[str]:
        """Alerts that fired at any evaluation since the unix time `since`."""
        window = f"{math.ceil(time.time() - since) + 1}s"
        return {s["metric"]["alertname"] for s in self.query(f'max_over_time(ALERTS{{alertstate="firing"}}[{window}])')}

    def wait_firing(self, alert: str, since: float) -> None:
        wait_until(lambda: alert in self.firing(since), timeout_s=30, interval_s=0.5, what=f"{alert} to fire")

    def wait_scraped(self) -> None:
        """Until every target has been scraped since this call, so the counters include what came before."""
        since = time.time()

        def all_scraped() -> bool:
            targets = httpx.get(f"{self.url}/api/v1/targets").json()["data"]["activeTargets"]
            return len(targets) == self.num_targets and all(_parse_time(t["lastScrape"]) > since for t in targets)

        wait_until(all_scraped, timeout_s=15, what="a fresh scrape of every target")


def _parse_time(stamp: str) -> float:
    """Prometheus's RFC 3339 timestamps (nanoseconds, Z or offset) -> unix seconds."""
    from datetime import datetime

    stamp = re.sub(r"(\.\d{6})\d*", r"\1", stamp).replace("Z", "+00:00")
    return datetime.fromisoformat(stamp).timestamp()


def kv_cache_holding_one_image(bundle, prompts: list[str], size: str) -> int:
    """KV blocks that hold one image of any of these prompts, by the engine's own arithmetic; checks that
    each image fills over 95% of them from its admission on (prompt blocks are allocated at admission)."""
    from model.reference import token_grid
    from server.config import Settings
    from server.engine.engine import BatchedEngine, EngineConfig
    from server.schemas import ImageGenerationRequest
    from server.served_model import load_served_model
    from server.validation import build_job

    settings = Settings(model="tiny")
    served = load_served_model(settings)
    engine = BatchedEngine(bundle, lambda event: None, EngineConfig(num_blocks=1))
    needs = []
    for prompt in prompts:
        request = build_job(ImageGenerationRequest(prompt=prompt, size=size), served, settings).engine_request().request
        grid_h, grid_w = token_grid(bundle.config, request.width, request.height)
        branches = [len(p.token_ids) for p in engine.generator.prompt_branches(request)]
        needs.append(
            (
                sum(engine.blocks.blocks_for(n) for n in branches),
                sum(engine.blocks.blocks_for(n + grid_h * grid_w) for n in branches),
            )
        )
    blocks = max(total for _, total in needs)
    assert all(at_admission / blocks > 0.95 for at_admission, _ in needs), (needs, blocks)
    return blocks


def host_port(server: LiveServer) -> str:
    return server.url.removeprefix("http://")


def generate(url: str, timeout_s: float = 60, **body) -> httpx.Response:
    return httpx.post(
        f"{url}/v1/images/generations", json={"prompt": "a cat", "size": "64x64", **body}, timeout=timeout_s
    )


def stream_events(url: str, stop_after: int | None = None, **body) -> list[str]:
    """The event names of a streamed generation; with stop_after, hang up after that many events."""
    events = []
    body = {"prompt": "a cat", "size": "64x64", "stream": True, **body}
    with httpx.stream("POST", f"{url}/v1/images/generations", json=body, timeout=60) as reply:
        for line in reply.iter_lines():
            if line.startswith("event:"):
                events.append(line.split(":", 1)[1].strip())
                if stop_after is not None and len(events) >= stop_after:
                    break
    return events


def test_prometheus_scraping_a_live_fleet_evaluates_every_panel_and_fires_every_alert(
    tiny_bundle, redis_url, start_server, tmp_path
):
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("prometheus is not installed (apt-get install prometheus)")
    import redis

    from server.app import create_app
    from server.config import Settings
    from server.engine.engine import BatchedEngine, EngineConfig
    from server.services import build_services

    prefix = f"deploy-{uuid.uuid4().hex[:8]}"
    # long prompts that differ from their first token (no shared prefix blocks), each filling the KV cache
    long_prompts = [" ".join(["red"] * 900), " ".join(["blue"] * 900)]
    saturating = {"size": "64x64", "num_inference_steps": 200}
    kv_blocks = kv_cache_holding_one_image(tiny_bundle, long_prompts, saturating["size"])

    # the worker's KV cache holds exactly one such image, so a second one waits: KV saturation on demand
    worker_services = build_services(
        Settings(model="tiny", role="worker", redis_url=redis_url, redis_prefix=prefix), load_bundle=lambda: tiny_bundle
    )
    worker_services.worker.engine_factory = lambda bundle, sink: BatchedEngine(
        bundle, sink, EngineConfig(num_blocks=kv_blocks)
    )
    # a CPU host has no GPU memory to report: a fixed reading stands in for CUDA's allocator
    worker_services.metrics.gpu_memory.read = lambda: {"cuda:0": (60 * 2**30, 120 * 2**30, 141 * 2**30)}
    render_to = os.environ.get("NEXTSTEP_DASHBOARD_PNG")
    started = time.time()

    with ExitStack() as stack:
        worker = stack.enter_context(LiveServer(create_app(worker_services)))
        api = stack.enter_context(start_server(role="api", redis_url=redis_url, redis_prefix=prefix))
        # a second replica that gives up after 2 s: requests it takes while no worker is alive answer 504
        impatient_api = stack.enter_context(
            start_server(role="api", redis_url=redis_url, redis_prefix=prefix, request_timeout_s=2)
        )
        config = prometheus_config(
            [host_port(api), host_port(impatient_api)], [host_port(worker)], alerts_firing_at_once(tmp_path)
        )
        prometheus = stack.enter_context(Prometheus(binary, config, tmp_path))
        prometheus.wait_scraped()  # counters are seen at 0 before the traffic moves them
        traffic_started = time.time()

        # traffic: successes with previews, a bad request, a poison job, KV saturation, a client that hangs up
        rounds = 8 if render_to else 1
        for _ in range(rounds):
            for seed in range(3):
                events = stream_events(api.url, partial_images=1, num_inference_steps=10, seed=seed)
                assert events[-1] == "image_generation.completed", events
            assert generate(api.url, size="13x13").status_code == 400
            redis.Redis.from_url(redis_url).xadd(f"{prefix}:jobs", {"job": b"{not json"})
            with ThreadPoolExecutor(len(long_prompts)) as pool:
                replies = list(pool.map(lambda prompt: generate(api.url, prompt=prompt, **saturating), long_prompts))
            assert [r.status_code for r in replies] == [200, 200], [r.text for r in replies]
            stream_events(api.url, stop_after=1, prompt=long_prompts[0], partial_images=3, **saturating)
        wait_until(
            lambda: float(prometheus.query("sum(nextstep:request_aborted_total)")[0]["value"][1]) >= 1,
            timeout_s=30,
            what="the worker to abort the job whose client hung up",
        )
        prometheus.wait_scraped()
        prometheus.wait_scraped()

        # every panel's every query returns data, with at least one finite value
        empty = []
        for panel in dashboard_panels():
            for target in panel["targets"]:
                expr = target["expr"].replace("$__rate_interval", RATE_INTERVAL)
                values = [float(s["value"][1]) for s in prometheus.query(expr)]
                if not any(math.isfinite(v) for v in values):
                    empty.append(f"{panel['title']}: {expr} -> {values}")
        assert not empty, "\n".join(empty)
        assert {"NextstepKVCacheSaturated", "NextstepDeadLetters"} <= prometheus.firing(traffic_started)
        if render_to:
            from deploy.render_dashboard import render

            note = (
                "rendered from Prometheus data of tests/test_deploy_monitoring.py (tiny model on CPU, "
                "GPU memory panel fed a stand-in reading); not a Grafana screenshot"
            )
            render(prometheus.url, started, time.time(), Path(render_to), note, rate_interval="10s", step=1.0)

        # induced failures: the only worker dies, jobs pile up and time out, then the API replicas go
        # (each stopped here is stopped again, harmlessly, when the stack closes)
        failures_started = time.time()
        worker.__exit__(None, None, None)
        prometheus.wait_firing("NextstepNoWorkerAlive", failures_started)
        for _ in range(2 + rounds):  # one at a time, so Prometheus sees the 5xx counter rise and not only appear
            assert generate(impatient_api.url, prompt="nobody renders this").status_code == 504
            prometheus.wait_scraped()
        prometheus.wait_firing("NextstepQueueBackingUp", failures_started)
        prometheus.wait_firing("NextstepHighErrorRate", failures_started)
        api.__exit__(None, None, None)
        impatient_api.__exit__(None, None, None)
        prometheus.wait_firing("NextstepApiDown", failures_started)
        assert prometheus.firing(traffic_started) == {rule["alert"] for rule in alert_rules()}
