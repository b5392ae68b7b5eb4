"""Module settings of kernels/ changed for a benchmark run: 'decoder_step.PDL=false,fused_head.FEW_ROWS_TILE=8x4'."""

from __future__ import annotations

import importlib


def parse_settings(text: str, module: str | None = None) -> dict[tuple[str, str], object]:
    """'decoder_step.PDL=false,...' -> {(module, name): value}, typed like the current value;
    names without a module are `module`'s."""
    settings = {}
    for item in text.split(","):
        path, value = item.split("=")
        owner, name = path.rsplit(".", 1) if "." in path else (module, path)
        current = getattr(importlib.import_module(f"kernels.{owner}"), name)  # only existing settings
        if isinstance(current, bool):
            settings[(owner, name)] = value.lower() in ("1", "true")
        elif isinstance(current, tuple):  # '16x8' -> (16, 8)
            settings[(owner, name)] = tuple(int(v) for v in value.split("x"))
        else:
            settings[(owner, name)] = type(current)(value)
    return settings


def apply_settings(settings: dict) -> dict:
    """Set them; returns the previous values (apply_settings(previous) restores)."""
    previous = {}
    for (module, name), value in settings.items():
        target = importlib.import_module(f"kernels.{module}")
        previous[(module, name)] = getattr(target, name)
        setattr(target, name, value)
    return previous
