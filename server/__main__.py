"""python -m server: the OpenAI-compatible image server (see `python -m server --help`).

Defaults: 127.0.0.1:8000, the default model on CPU, in-process queue, API and worker in one process.
"""

from __future__ import annotations

import logging
import sys

import uvicorn

from .app import create_app
from .config import SettingsError, settings_from_args
from .services import build_services


def main(argv: list[str] | None = None) -> int:
    try:
        settings = settings_from_args(argv)
    except SettingsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        services = build_services(settings)
    except Exception as err:  # noqa: BLE001 - a bad model path or an unreachable Redis: say so and exit
        print(f"error: cannot start: {err}", file=sys.stderr)
        return 2
    uvicorn.run(create_app(services), host=settings.host, port=settings.port, log_level=settings.log_level)
    return 0


if __name__ == "__main__":
    sys.exit(main())
