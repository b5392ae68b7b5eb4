"""Draw deploy/grafana/dashboards/nextstep.json from a Prometheus's data into one PNG, with matplotlib.

Not a Grafana screenshot: the same panels at the same grid positions, running the same queries, so the
README can show the dashboard where Grafana is not at hand. Needs matplotlib (`pip install matplotlib`).

    python deploy/render_dashboard.py --prometheus http://127.0.0.1:9090 --minutes 30 --out dashboard.png
"""

from __future__ import annotations

import argparse
import json
import math
import re
import time
from pathlib import Path

import httpx

DASHBOARD = Path(__file__).resolve().parent / "grafana" / "dashboards" / "nextstep.json"
BACKGROUND, PANEL, TEXT, GRID = "#111217", "#181b1f", "#ccccdc", "#2c3235"
UNIT_SCALE = {"bytes": (2**30, "GiB"), "percentunit": (0.01, "%"), "s": (1.0, "s"), "reqps": (1.0, "req/s")}


def query_range(prometheus: str, expr: str, start: float, end: float, step: float) -> list[tuple[dict, list, list]]:
    """(labels, times, values) of each series `expr` gives over [start, end]."""
    reply = httpx.get(
        f"{prometheus}/api/v1/query_range", params={"query": expr, "start": start, "end": end, "step": step}
    )
    reply.raise_for_status()
    series = []
    for item in reply.json()["data"]["result"]:
        times = [float(t) - end for t, _ in item["values"]]
        values = [float(v) for _, v in item["values"]]
        series.append((item["metric"], times, values))
    return series


def legend(template: str, labels: dict) -> str:
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), template) or "value"


def render(
    prometheus: str, start: float, end: float, out: Path, note: str, rate_interval: str = "1m", step: float = 5.0
) -> None:
    """Draw every panel of the dashboard over [start, end] (unix seconds) into the PNG `out`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dashboard = json.loads(DASHBOARD.read_text())
    panels = dashboard["panels"]
    rows = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in panels)
    unit_h = 0.42  # inches per Grafana grid row
    fig = plt.figure(figsize=(24, rows * unit_h + 0.8), facecolor=BACKGROUND)
    fig.text(0.01, 1 - 0.35 / fig.get_figheight(), f"{dashboard['title']}  ·  {note}", color=TEXT, fontsize=13)
    width, height = fig.get_figwidth(), fig.get_figheight()
    for panel in panels:
        g = panel["gridPos"]
        left, right = g["x"] / 24 * width, (g["x"] + g["w"]) / 24 * width  # inches
        top, bottom = height - 0.8 - g["y"] * unit_h, height - 0.8 - (g["y"] + g["h"]) * unit_h
        if panel["type"] == "row":
            fig.text(
                left / width + 0.003,
                (top + bottom) / 2 / height,
                panel["title"],
                color=TEXT,
                fontsize=12,
                weight="bold",
                va="center",
            )
            continue
        # room for the title above, and for tick labels left of and below a time series
        margin_left, margin_bottom = (0.7, 0.55) if panel["type"] == "timeseries" else (0.1, 0.1)
        rect = (
            (left + margin_left) / width,
            (bottom + margin_bottom) / height,
            (right - left - margin_left - 0.15) / width,
            (top - bottom - margin_bottom - 0.35) / height,
        )
        ax = fig.add_axes(rect, facecolor=PANEL)
        ax.set_title(panel["title"], color=TEXT, fontsize=10, loc="left")
        for spine in ax.spines.values():
            spine.set_color(GRID)
        scale, suffix = UNIT_SCALE.get(panel["fieldConfig"]["defaults"].get("unit", ""), (1.0, ""))
        drawn = []
        for target in panel["targets"]:
            expr = target["expr"].replace("$__rate_interval", rate_interval)
            for labels, times, values in query_range(prometheus, expr, start, end, step):
                drawn.append((legend(target.get("legendFormat", ""), labels), times, [v / scale for v in values]))
        if panel["type"] == "stat":
            _draw_stat(ax, drawn, suffix)
        else:
            _draw_timeseries(ax, drawn, suffix)
    fig.savefig(out, dpi=80, facecolor=BACKGROUND)
    plt.close(fig)


def _draw_stat(ax, drawn: list, suffix: str) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    finite = [v for _, _, values in drawn for v in values[-1:] if math.isfinite(v)]
    text = f"{finite[0]:.3g}{suffix and ' ' + suffix}" if finite else "no data"
    ax.text(
        0.5,
        0.4,
        text,
        color="#73bf69" if finite else TEXT,
        fontsize=26,
        ha="center",
        va="center",
        transform=ax.transAxes,
    )


def _draw_timeseries(ax, drawn: list, suffix: str) -> None:
    ax.tick_params(colors=TEXT, labelsize=8)
    ax.grid(color=GRID, linewidth=0.5)
    for name, times, values in drawn:
        ax.plot(times, values, linewidth=1.2, label=name[:48])
    if not drawn:
        ax.text(0.5, 0.5, "no data", color=TEXT, ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("seconds before the end", color=TEXT, fontsize=8)
    if suffix:
        ax.set_ylabel(suffix, color=TEXT, fontsize=8)
    if drawn:
        ax.legend(loc="upper left", fontsize=7, facecolor=PANEL, edgecolor=GRID, labelcolor=TEXT, ncol=2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prometheus", default="http://127.0.0.1:9090")
    parser.add_argument("--minutes", type=float, default=30.0, help="time range, ending now")
    parser.add_argument("--rate-interval", default="1m", help="what $__rate_interval stands for")
    parser.add_argument("--out", type=Path, default=Path("dashboard.png"))
    args = parser.parse_args()
    end = time.time()
    note = f"last {args.minutes:g} min from {args.prometheus}, drawn by deploy/render_dashboard.py"
    render(args.prometheus, end - 60 * args.minutes, end, args.out, note, args.rate_interval, max(1.0, args.minutes))


if __name__ == "__main__":
    main()
