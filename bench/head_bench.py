"""Head benchmark: ms per image token for the whole N-step sampling of a batch, by rows.

    python -m bench.head_bench --json head.json          # needs a GPU

For rows R (= 2 x images: text guidance) at D=1536 x 12 blocks, 28 and 50 steps: eager PyTorch,
the plain PyTorch loop as one CUDA graph, the fused Triton loop as one CUDA graph, and the floor
max(bytes / bandwidth, FLOPs / bf16 rate) with the head's weights read once per step. Also the
fused loop's difference from the plain loop on the same inputs (bf16).
"""

from __future__ import annotations

import argparse
import json

import torch

from bench.gpu_check import BF16_FLOPS, HBM_BYTES_PER_S, timed
from bench.settings import apply_settings, parse_settings
from kernels import fused_head
from kernels.fused_head import FusedHead
from model.head import FlowMatchingHead
from model.presets import preset_config
from server.engine.graphed_head import GraphKey, StaticBatch, fused_sample_loop, sample_loop, step_time_embeddings


class HeadOnly(torch.nn.Module):
    """What the head loops need of a model: the head, the config, device and dtype."""

    def __init__(self):
        super().__init__()
        self.config = preset_config("nextstep-1-large")
        c = self.config
        self.image_head = FlowMatchingHead(c.token_dim, c.hidden_size, c.fm_head_dim, c.fm_head_layers)
        self.device, self.dtype = torch.device("cuda"), torch.bfloat16


def random_head() -> tuple[HeadOnly, FusedHead]:
    """The 14B preset's head with random bf16 weights, and its FusedHead."""
    model = HeadOnly().to("cuda", torch.bfloat16)
    for param in model.parameters():
        param.data.normal_(0, 0.02)
    return model, FusedHead(model.image_head.net, use_triton=True)


def random_batch(key: GraphKey, model) -> StaticBatch:
    """A head-graph batch of random conditions, text guidance 7.5, one seed per image."""
    batch = StaticBatch(key, model)
    batch.conditions.normal_()
    batch.cfg.fill_(7.5)
    batch.seed.copy_(torch.arange(key.bucket, device=batch.seed.device)[:, None])
    return batch


def graphed(fn, stream: torch.cuda.Stream | None = None) -> tuple[torch.cuda.CUDAGraph, object]:
    """fn warmed up twice on `stream` (a new one by default), then captured there with its own pool:
    (graph, fn's output, which each replay rewrites)."""
    stream = stream or torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        out = fn()
    return graph, out


SWEEP = [
    {"BLOCK_N": 16, "BLOCK_K": 128, "num_warps": 4, "num_stages": 4},
    {"BLOCK_N": 16, "BLOCK_K": 256, "num_warps": 4, "num_stages": 3},
    {"BLOCK_N": 32, "BLOCK_K": 256, "num_warps": 4, "num_stages": 3},
    {"BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 3},
    {"BLOCK_N": 64, "BLOCK_K": 128, "num_warps": 4, "num_stages": 3},
    {"BLOCK_N": 32, "BLOCK_K": 128, "num_warps": 4, "num_stages": 4},
    {"BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3},
    {"BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 5},
    {"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3},
    {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3},
    {"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 4},
    {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 4, "num_stages": 4},
]


def sweep(fused, key, batch, t_emb) -> list[dict]:
    """The fused loop's graph time under each GEMM config."""
    out = []
    try:
        for config in SWEEP:
            fused_head.LINEAR_CONFIG.clear()
            fused_head.LINEAR_CONFIG.update(config)
            with torch.inference_mode():
                graph, _ = graphed(lambda: fused_sample_loop(fused, key, batch, t_emb))
                ms = timed(graph.replay)
            out.append(dict(config, ms=ms))
            print(f"    {config}: {ms:.2f} ms", flush=True)
    finally:
        fused_head.LINEAR_CONFIG.clear()  # back to the per-row-count defaults
    return out


def variants(texts, fused, key, batch, t_emb, plain_out) -> list[dict]:
    """The fused loop's graph time and difference from the plain loop under other settings."""
    out = []
    for text in texts:
        settings = parse_settings(text, "fused_head")
        previous = apply_settings(settings)
        try:
            with torch.inference_mode():
                graph, result = graphed(lambda: fused_sample_loop(fused, key, batch, t_emb))
                ms = timed(graph.replay)
                graph.replay()
            diff = ((result - plain_out).norm() / plain_out.norm()).item()
        finally:
            apply_settings(previous)
        out.append({**{name: value for (_, name), value in settings.items()}, "ms": ms, "rel_diff": diff})
        print(f"    {text}: {ms:.2f} ms (rel diff {diff:.2e})", flush=True)
    return out


def profile(fused, key, batch, t_emb, top: int = 12) -> list[dict]:
    """GPU time per kernel name over one replay of the fused loop's graph."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch.inference_mode():
        graph, _ = graphed(lambda: fused_sample_loop(fused, key, batch, t_emb))
        graph.replay()
        torch.cuda.synchronize()
        with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
            graph.replay()
            torch.cuda.synchronize()
    rows = kernel_table(prof)
    for r in rows[:top]:
        print(f"    {r['us']:9.1f} us {r['count']:5d}x  {r['name'][:90]}", flush=True)
    return rows


def kernel_table(prof) -> list[dict]:
    """Kernels by total device time (microseconds), from a torch profiler run."""
    totals: dict[str, list] = {}
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            entry = totals.setdefault(event.name, [0.0, 0])
            entry[0] += event.time_range.elapsed_us()
            entry[1] += 1
    rows = [{"name": name, "us": us, "count": count} for name, (us, count) in totals.items()]
    rows.sort(key=lambda r: -r["us"])
    print(f"    all kernels: {sum(r['us'] for r in rows):.1f} us in {sum(r['count'] for r in rows)} launches", flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, nargs="+", default=[2, 16, 64, 128, 256, 512])
    p.add_argument("--steps", type=int, nargs="+", default=[28, 50])
    p.add_argument("--sweep", action="store_true", help="also time GEMM tile configs of the fused loop")
    p.add_argument(
        "--modulation", choices=fused_head.MODULATION_GEMMS, nargs="+", default=[fused_head.MODULATION_GEMM],
        help="adaLN GEMM backends to time the fused loop with (the first also runs the sweep)",
    )  # fmt: skip
    p.add_argument(
        "--variant", action="append", default=[], metavar="NAME=VALUE,...",
        help="also time the fused loop with these kernels.fused_head settings, e.g. MODULATION_CHUNK_ROWS=0",
    )  # fmt: skip
    p.add_argument("--profile", action="store_true", help="print the fused loop's kernels by GPU time")
    p.add_argument("--json")
    args = p.parse_args()
    torch.manual_seed(0)
    model, fused = random_head()
    params = sum(p.numel() for p in model.image_head.parameters())
    results = []
    for steps in args.steps:
        for rows in args.rows:
            images = rows // 2
            key = GraphKey("legacy-sde", steps, 1.0, 2, False, images)
            batch = random_batch(key, model)
            with torch.inference_mode():
                t_emb = step_time_embeddings(fused, key, batch.seed.device)
                eager_ms = timed(lambda: sample_loop(model, key, batch), repeat=1)
                plain_graph, plain_out = graphed(lambda: sample_loop(model, key, batch))
                plain_ms = timed(plain_graph.replay)
                by_modulation = {}
                for backend in args.modulation:
                    fused_head.MODULATION_GEMM = backend
                    fused_graph, fused_out = graphed(lambda: fused_sample_loop(fused, key, batch, t_emb))
                    ms = timed(fused_graph.replay)
                    plain_graph.replay()
                    fused_graph.replay()
                    torch.cuda.synchronize()
                    by_modulation[backend] = (ms, ((fused_out - plain_out).norm() / plain_out.norm()).item())
                fused_head.MODULATION_GEMM = args.modulation[0]
                fused_ms, diff = by_modulation[args.modulation[0]]
            floor_ms = 1e3 * steps * max(2 * params / HBM_BYTES_PER_S, 2 * params * rows / BF16_FLOPS)
            row = dict(steps=steps, rows=rows, eager_ms=eager_ms, graph_ms=plain_ms, fused_graph_ms=fused_ms,
                       floor_ms=floor_ms, fused_vs_floor=fused_ms / floor_ms, fused_rel_diff=diff,
                       modulation=args.modulation[0],
                       fused_graph_ms_by_modulation={b: v[0] for b, v in by_modulation.items()})  # fmt: skip
            results.append(row)
            print(
                f"steps {steps} rows {rows:4d}: eager {eager_ms:7.1f} graph {plain_ms:6.2f} fused {fused_ms:6.2f} "
                f"floor {floor_ms:5.2f} ms (fused/floor {fused_ms / floor_ms:4.1f}) rel diff {diff:.2e} "
                f"by adaLN GEMM {({b: round(v[0], 2) for b, v in by_modulation.items()})}",
                flush=True,
            )
            if args.variant:
                row["variants"] = variants(args.variant, fused, key, batch, t_emb, plain_out)
            if args.profile:
                row["kernels"] = profile(fused, key, batch, t_emb)
            if args.sweep:
                row["sweep"] = sweep(fused, key, batch, t_emb)
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
