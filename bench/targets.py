"""Issue 4's speed targets, measured in one go on a GPU machine and printed against the targets.

    python -m bench.targets --out $OUT --tag h200_s27          # needs a GPU; about 5 min on an H200
    python -m bench.targets --out $OUT --baseline decoder_step.STREAM_LINEAR_MAX_ROWS=0

Each measurement is its own process, as the targets are stated (`nextstep-1-large`, random bf16
weights, 512x512, 50 steps, text guidance 7.5):
  1. one image at concurrency 1, --repeats times; the first process on a machine is run and
     discarded (it compiles the kernels and fills the caches); with --baseline, processes with
     those kernel settings alternate with the defaults, for a side-by-side ratio;
  2. 256 images at once over a 104 GiB KV cache (skipped on cards with less memory than that needs);
  3. the fused head at 256 rows, 50 steps, against its computed floor.
Raw JSON and logs go to --out; the last lines printed are each target, what was measured, and
whether it is met.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ONE_IMAGE_MAX_S = 12.0
IMAGES_PER_S_MIN = 5.0
HEAD_VS_FLOOR_MAX = 2.0
WAVE_IMAGES = 256
WAVE_KV_CACHE_GB = 104
WAVE_MIN_GPU_GIB = 135  # the 14B weights, the KV cache and the engine's headroom
HEAD_ROWS = 256

ENGINE = [
    *("-m", "bench.engine_bench", "--model", "nextstep-1-large", "--device", "cuda", "--dtype", "bfloat16"),
    *("--size", "512x512", "--steps", "50", "--guidance", "7.5", "--reference-tokens", "1", "--overlap"),
]
ONE_IMAGE = [*ENGINE, "--concurrency", "1", "--kv-cache-gb", "20"]
WAVE = [*ENGINE, "--concurrency", str(WAVE_IMAGES), "--kv-cache-gb", str(WAVE_KV_CACHE_GB)]
HEAD = ["-m", "bench.head_bench", "--rows", str(HEAD_ROWS), "--steps", "50"]


def gpu() -> tuple[str, float]:
    """(name, memory in GiB) of the first GPU, from nvidia-smi (no CUDA context in this process)."""
    line = subprocess.run(
        ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"],
        capture_output=True, text=True, check=True,
    ).stdout.splitlines()[0]  # fmt: skip
    name, mib = line.rsplit(",", 1)
    return name.strip(), float(mib) / 1024


def run(name: str, args: list[str], out: Path, timeout_s: float):
    """python args... --json out/name.json, its output in out/name.log -> the JSON, or None if it
    failed or ran past timeout_s (the log says why)."""
    path, log = out / f"{name}.json", out / f"{name}.log"
    print(f"== {name}: {' '.join(args)}", flush=True)
    try:
        with open(log, "w") as f:
            subprocess.run([sys.executable, *args, "--json", str(path)], stdout=f, stderr=subprocess.STDOUT,
                           timeout=timeout_s, check=True)  # fmt: skip
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as err:
        print(f"   failed ({err.__class__.__name__}); see {log}", flush=True)
        return None
    return json.loads(path.read_text())


def wall_s(result) -> float | None:
    return None if result is None else result["engine"][0]["wall_s"]


def verdicts(one_image_s: list[float], images_per_s: float | None, head_vs_floor: float | None) -> list[str]:
    """One line per target: the target, what was measured, and MET / NOT MET / NOT MEASURED."""

    def line(target: str, measured: str | None, met: bool) -> str:
        verdict = "NOT MEASURED" if measured is None else "MET" if met else "NOT MET"
        return f"{target:<34} {measured or '-':<34} {verdict}"

    median = statistics.median(one_image_s) if one_image_s else None
    runs = ", ".join(f"{s:.2f}" for s in one_image_s)
    return [
        line(f"one image <= {ONE_IMAGE_MAX_S:g} s", median and f"median {median:.2f} s ({runs})",
             median is not None and median <= ONE_IMAGE_MAX_S),
        line(f"{WAVE_IMAGES} images >= {IMAGES_PER_S_MIN:g} images/s", images_per_s and f"{images_per_s:.2f} images/s",
             images_per_s is not None and images_per_s >= IMAGES_PER_S_MIN),
        line(f"head, {HEAD_ROWS} rows <= {HEAD_VS_FLOOR_MAX:g}x floor", head_vs_floor and f"{head_vs_floor:.2f}x",
             head_vs_floor is not None and head_vs_floor <= HEAD_VS_FLOOR_MAX),
    ]  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="folder for the raw JSON, logs and targets.json")
    p.add_argument("--tag", default="", help="suffix of every file name, e.g. h200_s27")
    p.add_argument("--repeats", type=int, default=2, help="one-image processes timed (after the discarded one)")
    p.add_argument("--baseline", help="kernel settings (engine_bench --setting) to alternate with the defaults")
    p.add_argument("--skip", nargs="*", default=[], choices=["wave", "head"])
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = f"_{args.tag}" if args.tag else ""
    name, gib = gpu()
    print(f"GPU: {name}, {gib:.0f} GiB", flush=True)

    run(f"engine_c1_discarded{suffix}", ONE_IMAGE, args.out, 240)
    one_image, baseline = [], []
    for i in range(1, args.repeats + 1):
        one_image.append(wall_s(run(f"engine_c1_{i}{suffix}", ONE_IMAGE, args.out, 240)))
        if args.baseline:
            baseline.append(wall_s(run(f"engine_c1_baseline_{i}{suffix}", [*ONE_IMAGE, "--setting", args.baseline],
                                       args.out, 240)))  # fmt: skip
    one_image, baseline = [s for s in one_image if s is not None], [s for s in baseline if s is not None]

    images_per_s = None
    if "wave" not in args.skip:
        if gib < WAVE_MIN_GPU_GIB:
            print(f"== wave: skipped, {WAVE_IMAGES} images need about {WAVE_MIN_GPU_GIB} GiB, this card has {gib:.0f}")
        elif (wave := run(f"engine_c{WAVE_IMAGES}{suffix}", WAVE, args.out, 420)) is not None:
            images_per_s = wave["engine"][0]["images_per_s"]

    head_vs_floor = None
    if "head" not in args.skip and (head := run(f"head{suffix}", HEAD, args.out, 240)) is not None:
        head_vs_floor = head[0]["fused_vs_floor"]

    lines = verdicts(one_image, images_per_s, head_vs_floor)
    summary = {"gpu": name, "one_image_s": one_image, "baseline_s": baseline, "baseline": args.baseline,
               "images_per_s": images_per_s, "head_vs_floor": head_vs_floor, "verdicts": lines}  # fmt: skip
    (args.out / f"targets{suffix}.json").write_text(json.dumps(summary, indent=2))
    print(f"\nGPU: {name}")
    if baseline:
        print(f"one image with --baseline {args.baseline}: {', '.join(f'{s:.2f}' for s in baseline)} s")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
