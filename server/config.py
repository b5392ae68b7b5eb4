"""Server settings: every knob has a command-line flag and a NEXTSTEP_* environment variable.

Precedence: flag, then environment, then the default written here. `--help` lists them all.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from dataclasses import dataclass

from model.demo import WEIGHTS_DIR

# The model served when neither --model nor --preset is given: the demo trained on coloured shapes
# (model/demo/, 64x64 pictures), committed in the published layout.
DEFAULT_MODEL = str(WEIGHTS_DIR)

ROLES = ("both", "api", "worker")
DTYPES = ("float32", "bfloat16", "float16")


class SettingsError(ValueError):
    """Settings that cannot start a server."""


@dataclass(frozen=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8000
    model: str = DEFAULT_MODEL  # a model directory or a preset name
    vae: str | None = None
    served_model_name: str | None = None  # the id clients send as `model`; default: the model's name
    device: str = "cpu"
    dtype: str = "float32"
    seed: int = 0  # weight seed for presets (random weights)
    api_keys: tuple[str, ...] = ()
    role: str = "both"
    redis_url: str | None = None
    redis_prefix: str = "nextstep"
    worker_name: str | None = None
    public_url: str | None = None  # base of `url` results; default: the URL the client called
    max_prompt_tokens: int = 1024
    max_upload_bytes: int = 20 * 2**20
    max_input_pixels: int = 4096 * 4096
    max_pixels: int = 1024 * 1024
    max_n: int = 10
    max_steps: int = 250
    default_size: str | None = None  # None: the model's native size (base_image_grid_size tokens a side)
    max_queued_jobs: int = 256
    retry_after_s: int = 2
    request_timeout_s: float = 600.0
    url_ttl_s: int = 3600
    worker_prefetch: int = 2
    claim_idle_s: float = 60.0
    max_deliveries: int = 3
    log_level: str = "info"

    def validate(self) -> None:
        if self.role not in ROLES:
            raise SettingsError(f"role must be one of {', '.join(ROLES)}; got {self.role!r}")
        if self.role != "both" and not self.redis_url:
            raise SettingsError(f"role {self.role!r} needs --redis-url: api and worker processes meet in Redis")
        if self.dtype not in DTYPES:
            raise SettingsError(f"dtype must be one of {', '.join(DTYPES)}; got {self.dtype!r}")
        if not 1 <= self.max_n <= 10:
            raise SettingsError(f"max_n must be within 1..10 (the OpenAI API's range); got {self.max_n}")
        positive = (
            "port", "max_prompt_tokens", "max_upload_bytes", "max_input_pixels", "max_pixels", "max_steps",
            "max_queued_jobs", "retry_after_s", "request_timeout_s", "url_ttl_s", "worker_prefetch",
            "claim_idle_s", "max_deliveries",
        )  # fmt: skip
        for name in positive:
            if getattr(self, name) <= 0:
                raise SettingsError(f"{name} must be positive; got {getattr(self, name)}")


# (flag, Settings field, type, help); the environment variable is NEXTSTEP_ + the field in capitals.
_OPTIONS: tuple[tuple[str, str, type, str], ...] = (
    ("--host", "host", str, "address to listen on"),
    ("--port", "port", int, "port to listen on (a worker-only process serves /metrics, /health, /ready there)"),
    ("--model", "model", str, f"model directory as published, or a preset name (default {DEFAULT_MODEL})"),
    ("--vae", "vae", str, "VAE directory (default: the model's own vae/)"),
    ("--served-model-name", "served_model_name", str, "model id in /v1/models and requests (default: model name)"),
    ("--device", "device", str, "torch device of the worker: cpu, cuda, cuda:1, ..."),
    ("--dtype", "dtype", str, f"weights dtype: {', '.join(DTYPES)}"),
    ("--seed", "seed", int, "weight seed of preset models (random weights)"),
    ("--role", "role", str, "both: API and worker in one process; api or worker: one side, meeting in Redis"),
    ("--redis-url", "redis_url", str, "redis://host:port/db: use Redis Streams instead of the in-process queue"),
    ("--redis-prefix", "redis_prefix", str, "prefix of every Redis key (one prefix per served model)"),
    ("--worker-name", "worker_name", str, "consumer name of this worker in Redis (default: host-pid)"),
    ("--public-url", "public_url", str, "base URL for `url` results (default: the URL the client called)"),
    ("--max-prompt-tokens", "max_prompt_tokens", int, "longest prompt, in tokens"),
    ("--max-upload-bytes", "max_upload_bytes", int, "largest edit input image, in bytes"),
    ("--max-input-pixels", "max_input_pixels", int, "largest edit input image, in pixels"),
    ("--max-pixels", "max_pixels", int, "largest output image, width x height"),
    ("--max-n", "max_n", int, "most images per request (1-10)"),
    ("--max-steps", "max_steps", int, "most num_inference_steps a request may ask for"),
    ("--default-size", "default_size", str, "size used for size=auto or no size (default: the model's native size)"),
    ("--max-queued-jobs", "max_queued_jobs", int, "jobs accepted but not finished before answering 429"),
    ("--retry-after", "retry_after_s", int, "Retry-After seconds sent with 429"),
    ("--request-timeout", "request_timeout_s", float, "seconds before a request is cancelled and answered 504"),
    ("--url-ttl", "url_ttl_s", int, "seconds a `url` result (and a Redis job result) is kept"),
    ("--worker-prefetch", "worker_prefetch", int, "jobs a worker keeps waiting inside its engine"),
    ("--claim-idle", "claim_idle_s", float, "Redis: seconds without heartbeat before a job is reclaimed"),
    ("--max-deliveries", "max_deliveries", int, "Redis: deliveries before a job goes to the dead-letter stream"),
    ("--log-level", "log_level", str, "debug, info, warning or error"),
)


def env_name(field_name: str) -> str:
    return "NEXTSTEP_" + field_name.upper()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m server",
        description="OpenAI-compatible image generation server for NextStep models. "
        "Every flag can also be set by the environment variable named after it.",
    )
    defaults = Settings()
    for flag, name, kind, text in _OPTIONS:
        default = getattr(defaults, name)
        parser.add_argument(flag, dest=name, type=kind, help=f"{text} [env {env_name(name)}; default {default!r}]")
    parser.add_argument("--preset", help="preset name (tiny, nextstep-1-large, nextstep-1.1); same as --model NAME")
    parser.add_argument(
        "--api-key",
        dest="api_keys",
        action="append",
        help="accepted bearer token; repeat for several [env NEXTSTEP_API_KEYS, comma-separated; default: no auth]",
    )
    return parser


def settings_from_args(argv: list[str] | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Settings from flags, then NEXTSTEP_* variables, then defaults; raises SettingsError if unusable."""
    environ = os.environ if environ is None else environ
    args = build_parser().parse_args(argv)
    values: dict = {}
    for _, name, kind, _ in _OPTIONS:
        value = getattr(args, name)
        if value is None and env_name(name) in environ:
            try:
                value = kind(environ[env_name(name)])
            except ValueError:
                raise SettingsError(f"{env_name(name)}={environ[env_name(name)]!r} is not a valid {kind.__name__}")
        if value is not None:
            values[name] = value
    if args.preset:
        if args.model:
            raise SettingsError("give --model or --preset, not both")
        values["model"] = args.preset
    keys = args.api_keys or [k for k in environ.get("NEXTSTEP_API_KEYS", "").split(",")]
    values["api_keys"] = tuple(k.strip() for k in keys if k.strip())
    settings = Settings(**values)
    settings.validate()
    return settings
