"""Shared fixtures of the server tests: one tiny model, live servers on free ports, a private redis-server."""

from __future__ import annotations

import os

import torch

# Triton reads this when it loads: without a GPU, its kernels run on the CPU interpreter
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import contextlib
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import asdict, replace

import httpx
import pytest


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(condition, timeout_s: float = 30.0, interval_s: float = 0.05, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


def metric(url: str, name: str, **labels) -> float:
    """The value of one sample on a server's /metrics (0 when absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


def make_job(job_id: str = "j1", **fields):
    """A valid JobSpec for a 32x32 image with 2 sampling steps; `fields` override anything."""
    from model.sampling import published_defaults
    from server.jobs import JobSpec

    params = asdict(replace(published_defaults("nextstep-1", edit=False), num_steps=2))
    now = time.time()
    base = {"job_id": job_id, "prompt": "a cat", "width": 32, "height": 32, "n": 1, "seed": 1, "params": params,
            "enqueued_at": now, "deadline": now + 60}  # fmt: skip
    return JobSpec(**{**base, **fields})


@pytest.fixture(scope="session")
def tiny_bundle():
    from model.bundle import load_bundle

    return load_bundle("tiny", seed=0)


class LiveServer:
    """A uvicorn server in a thread, on a free loopback port."""

    def __init__(self, app):
        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        wait_until(lambda: self.server.started, what="uvicorn to start")
        wait_until(lambda: httpx.get(f"{self.url}/ready").status_code == 200, what="the server to be ready")
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)


@pytest.fixture(scope="session")
def start_server(tiny_bundle):
    """start_server(**settings) -> context manager of a LiveServer running the tiny model in-process."""
    from server.app import create_app
    from server.config import Settings
    from server.services import build_services

    def start(**overrides) -> contextlib.AbstractContextManager[LiveServer]:
        settings = replace(Settings(model="tiny"), **overrides)
        settings.validate()
        services = build_services(settings, load_bundle=lambda: tiny_bundle)
        return LiveServer(create_app(services))

    return start


@pytest.fixture(scope="session")
def redis_url():
    """A redis-server of our own on a free port (skipped when redis-server is not installed)."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="nextstep-redis-") as workdir:
        process = subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", workdir],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            import redis

            client = redis.Redis(port=port)
            wait_until(lambda: _pings(client), timeout_s=10, what="redis-server")
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            process.terminate()
            process.wait(timeout=10)


def _pings(client) -> bool:
    import redis

    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False
