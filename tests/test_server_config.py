"""Settings: flags, then NEXTSTEP_* environment variables, then defaults; unusable settings are refused."""

from __future__ import annotations

import subprocess
import sys

import pytest

from model.demo.train import demo_config
from model.presets import preset_config

from server.config import DEFAULT_MODEL, Settings, SettingsError, settings_from_args
from server.validation import parse_size


def test_defaults_serve_the_default_model_locally_on_loopback():
    settings = settings_from_args([], environ={})
    assert (settings.host, settings.port, settings.model, settings.role) == ("127.0.0.1", 8000, DEFAULT_MODEL, "both")
    assert settings.redis_url is None and settings.api_keys == () and settings.device == "cpu"


def test_flags_win_over_environment_which_wins_over_defaults():
    environ = {"NEXTSTEP_PORT": "9000", "NEXTSTEP_HOST": "0.0.0.0", "NEXTSTEP_MAX_N": "4"}
    settings = settings_from_args(["--port", "9100"], environ=environ)
    assert (settings.port, settings.host, settings.max_n) == (9100, "0.0.0.0", 4)


def test_api_keys_from_repeated_flags_or_a_comma_separated_variable():
    assert settings_from_args(["--api-key", "a", "--api-key", "b"], environ={}).api_keys == ("a", "b")
    assert settings_from_args([], environ={"NEXTSTEP_API_KEYS": "x, y,"}).api_keys == ("x", "y")


def test_preset_flag_names_the_model():
    assert settings_from_args(["--preset", "nextstep-1.1"], environ={}).model == "nextstep-1.1"
    with pytest.raises(SettingsError):
        settings_from_args(["--preset", "tiny", "--model", "/m"], environ={})


@pytest.mark.parametrize(
    "argv, environ",
    [
        (["--role", "api"], {}),
        (["--role", "judge", "--redis-url", "redis://x"], {}),
        (["--max-n", "11"], {}),
        (["--max-queued-jobs", "0"], {}),
        (["--dtype", "int4"], {}),
        ([], {"NEXTSTEP_PORT": "eighty"}),
    ],
)
def test_unusable_settings_are_refused(argv, environ):
    with pytest.raises(SettingsError):
        settings_from_args(argv, environ=environ)


def test_size_auto_is_the_models_native_size_unless_configured():
    large, demo = preset_config("nextstep-1-large"), demo_config()
    assert parse_size("auto", Settings(), large) == (512, 512) == parse_size(None, Settings(), large)
    assert parse_size("auto", Settings(), demo) == (64, 64) == parse_size(None, Settings(), demo)
    assert parse_size(None, Settings(default_size="128x96"), demo) == (128, 96)


def test_help_documents_every_flag_and_its_variable():
    text = subprocess.run([sys.executable, "-m", "server", "--help"], capture_output=True, text=True, check=True).stdout
    for flag in ("--host", "--port", "--model", "--vae", "--preset", "--device", "--dtype", "--api-key",
                 "--redis-url", "--role", "--max-queued-jobs", "--request-timeout"):  # fmt: skip
        assert flag in text
    assert "NEXTSTEP_REDIS_URL" in text and "NEXTSTEP_API_KEYS" in text
