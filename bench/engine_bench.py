"""Offline engine benchmark: waves of requests through the batched engine, with the reference for scale.

    python -m bench.engine_bench --model tiny --size 64x64 --steps 10 --concurrency 1 4
    python -m bench.engine_bench --model nextstep-1-large --device cuda --dtype bfloat16 \\
        --size 512x512 --steps 50 --guidance 7.5 --concurrency 1 8 32 64 128 --json out.json

At each concurrency C, C single-image text-to-image requests (different seeds) are submitted at
once and the engine steps until all are done; images/s = C / wall time. The reference generator
renders one image in the same process for the ratio; with --reference-tokens K it renders only K
tokens of that image and scales its time to the whole image (a 512x512 reference image takes
minutes on a GPU).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from dataclasses import replace

import torch

from bench.settings import apply_settings, parse_settings
from kernels import fused_head
from model.bundle import load_bundle
from model.generate import DTYPES, parse_size
from model.reference import GenerationRequest, token_grid
from model.sampling import published_defaults
from server.engine.engine import BatchedEngine, EngineConfig
from server.engine.events import EngineRequest, RequestDone

PROMPT = "A frosty beer mug with 'CHEERS TO US' engraved on the side, on a wooden table"


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def make_request(args, seed: int) -> GenerationRequest:
    width, height = args.size
    params = replace(
        published_defaults(args.family, edit=False), num_steps=args.steps, guidance_scale=args.guidance
    )
    return GenerationRequest(prompt=PROMPT, width=width, height=height, params=params, seed=seed)


def bench_reference(bundle, args) -> dict:
    """Seconds per image of the reference generator (extrapolated from K tokens when asked)."""
    generator = bundle.reference_generator()
    request = make_request(args, seed=0)
    total = (request.width // 16) * (request.height // 16)
    limit = min(args.reference_tokens or total, total)

    class Enough(Exception):
        pass

    def stop_after(k, _tokens):
        if k + 1 >= limit:
            raise Enough

    sync(args.device)
    started = time.perf_counter()
    try:
        generator.generate(request, on_token=stop_after if limit < total else None)
    except Enough:
        pass
    sync(args.device)
    elapsed = time.perf_counter() - started
    per_image = elapsed * total / limit
    return {"tokens_timed": limit, "seconds": elapsed, "seconds_per_image": per_image, "images_per_s": 1 / per_image}


def make_engine(bundle, args, done_at: dict) -> BatchedEngine:
    """One engine for every level, warmed up so compilation and graph capture stay out of the numbers."""

    def on_event(event):
        if isinstance(event, RequestDone):
            done_at[event.request_id] = time.perf_counter()

    engine = BatchedEngine(
        bundle,
        on_event,
        EngineConfig(
            block_size=args.block_size,
            kv_cache_bytes=int(args.kv_cache_gb * 2**30) if args.kv_cache_gb else None,
            max_running_images=max(args.concurrency),
            max_batched_tokens=args.max_batched_tokens,
            time_phases=not args.overlap,
            warm_up=False,  # below, with this run's sampling settings
        ),
    )
    # one small image compiles the prefill and VAE kernels, then every graph the levels replay is
    # captured before timing (as a server does at start)
    engine.add_request(EngineRequest("warm", replace(make_request(args, seed=10**6), width=32, height=16)))
    while engine.has_work():
        engine.step()
    request = make_request(args, seed=0)
    grid_h, grid_w = token_grid(engine.bundle.config, request.width, request.height)
    longest = max(len(p.token_ids) for p in engine.generator.prompt_branches(request)) + grid_h * grid_w
    started = time.perf_counter()
    engine.warm_up(request.params, longest)
    print(f"graphs captured before timing in {time.perf_counter() - started:.1f} s", flush=True)
    return engine


def bench_engine(engine: BatchedEngine, done_at: dict, args, concurrency: int) -> dict:
    engine.timings.__init__()
    done_at.clear()
    sync(args.device)
    started = time.perf_counter()
    for i in range(concurrency):
        engine.add_request(EngineRequest(f"c{concurrency}-{i}", make_request(args, seed=i)))
    profiled = None
    while engine.has_work():
        if args.profile_steps and engine.timings.steps == PROFILE_FROM_STEP:
            profiled = profile_steps(engine, args.profile_steps)
        else:
            engine.step()
    sync(args.device)
    wall = time.perf_counter() - started
    latencies = sorted(t - started for t in done_at.values())
    tokens = concurrency * (args.size[0] // 16) * (args.size[1] // 16)
    t = engine.timings
    return {
        "concurrency": concurrency,
        "wall_s": wall,
        "images_per_s": concurrency / wall,
        "image_tokens_per_s": tokens / wall,
        "latency_mean_s": statistics.mean(latencies),
        "latency_p50_s": latencies[len(latencies) // 2],
        "latency_p99_s": latencies[min(len(latencies) - 1, round(0.99 * (len(latencies) - 1)))],
        "steps": t.steps,
        "seconds": {"schedule": t.schedule, "backbone": t.backbone, "head": t.head, "vae": t.vae},
        "mean_head_batch": statistics.mean(t.batch_sizes) if t.batch_sizes else 0,
        "profile": profiled,
    }


PROFILE_FROM_STEP = 100  # past the prompts' prefill: steady decoding


def profile_steps(engine: BatchedEngine, count: int) -> dict:
    """Run `count` engine steps under the torch profiler and the CUDA sync checker: wall time per
    step, GPU kernel time per step (their ratio is how busy the host keeps the GPU), host time in
    engine.step(), host-device synchronisations, and the kernels by time."""
    from torch.profiler import ProfilerActivity, profile

    from bench.head_bench import kernel_table

    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as syncs, profile(activities=[ProfilerActivity.CUDA]) as prof:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        started = time.perf_counter()
        host = []
        for _ in range(count):
            step_started = time.perf_counter()
            engine.step()
            host.append(time.perf_counter() - step_started)
        torch.cuda.synchronize()
        wall = time.perf_counter() - started
        torch.cuda.set_sync_debug_mode("default")
    kernels = kernel_table(prof)
    kernel_ms = sum(k["us"] for k in kernels) / 1e3
    result = {
        "steps": count,
        "wall_ms_per_step": 1e3 * wall / count,
        "host_ms_per_step": 1e3 * sum(host) / count,  # in engine.step(): near the wall time when the host is the bound
        "kernel_ms_per_step": kernel_ms / count,
        "syncs": len(syncs),
        "sync_sites": sorted({str(w.message)[:160] for w in syncs})[:5],
        "kernels": kernels,
    }
    print(
        f"  profile of {count} steps: {result['wall_ms_per_step']:.2f} ms wall, {result['kernel_ms_per_step']:.2f} ms "
        f"of kernels, {result['host_ms_per_step']:.2f} ms in engine.step() per step, {len(syncs)} syncs",
        flush=True,
    )
    for k in kernels[:15]:
        print(f"    {k['us'] / count:9.1f} us/step {k['count'] // count:5d}x  {k['name'][:90]}", flush=True)
    return result


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--size", type=parse_size, default=(64, 64))
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4])
    p.add_argument("--reference-tokens", type=int, default=0, help="time only K reference tokens (0: whole image)")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--kv-cache-gb", type=float, default=0, help="0: what the device has free")
    p.add_argument("--max-batched-tokens", type=int, default=4096)
    p.add_argument("--overlap", action="store_true", help="no GPU sync between phases (no time breakdown)")
    p.add_argument("--modulation-gemm", choices=fused_head.MODULATION_GEMMS, default=fused_head.MODULATION_GEMM,
                   help="backend of the fused head's adaLN GEMM")  # fmt: skip
    p.add_argument("--profile-steps", type=int, default=0, help=f"profile this many steps from step {PROFILE_FROM_STEP} (GPU)")
    p.add_argument("--setting", action="append", default=[], metavar="MODULE.NAME=VALUE,...",
                   help="kernels settings for this run, e.g. fused_head.CUBLAS_BLOCKS_MIN_ROWS=256")  # fmt: skip
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    fused_head.MODULATION_GEMM = args.modulation_gemm
    for text in args.setting:
        apply_settings(parse_settings(text))

    bundle = load_bundle(args.model, device=args.device, dtype=DTYPES[args.dtype])
    args.family = bundle.config.family
    results = {"args": {k: v for k, v in vars(args).items()}, "reference": bench_reference(bundle, args), "engine": []}
    print(f"reference: {results['reference']['seconds_per_image']:.2f} s/image", flush=True)
    done_at: dict[str, float] = {}
    engine = make_engine(bundle, args, done_at)
    for c in args.concurrency:
        row = bench_engine(engine, done_at, args, c)
        row["speedup_vs_reference"] = row["images_per_s"] / results["reference"]["images_per_s"]
        results["engine"].append(row)
        s = row["seconds"]
        print(
            f"C={c:4d} {row['images_per_s']:8.3f} img/s {row['image_tokens_per_s']:9.1f} tok/s "
            f"p50 {row['latency_p50_s']:7.2f}s p99 {row['latency_p99_s']:7.2f}s x{row['speedup_vs_reference']:.1f} "
            f"| backbone {s['backbone']:.1f}s head {s['head']:.1f}s vae {s['vae']:.1f}s sched {s['schedule']:.1f}s",
            flush=True,
        )
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=2, default=str)


if __name__ == "__main__":
    main()
