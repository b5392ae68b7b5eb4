"""Backbone decode step: ms per step of the captured decode graph, by sequences and length.

    python -m bench.backbone_bench --seqs 2 512 --length 600 \\
        --variant decoder_step.PDL=false,paged_attention.PDL=false --json backbone.json   # needs a GPU

Each (sequences, length) is one CUDA graph of ModelRunner.forward over random bf16
`nextstep-1-large` weights and a random KV cache (every sequence its own blocks), as the engine
replays it for a pure-decode step. --variant re-times it with module settings of kernels/ changed.
"""

from __future__ import annotations

import argparse
import json

import torch

from bench.gpu_check import timed
from bench.head_bench import graphed, kernel_table
from bench.settings import apply_settings, parse_settings
from model.bundle import load_bundle
from server.engine.model_runner import ModelRunner


def random_runner(seqs: int, length: int, model: str = "nextstep-1-large") -> ModelRunner:
    """A runner over the preset's random bf16 weights with a random KV cache for `seqs` sequences
    of `length` positions (no decode graphs of its own)."""
    bundle = load_bundle(model, device="cuda", dtype=torch.bfloat16)
    runner = ModelRunner(bundle, seqs * -(-length // 16), 16, use_graphs=False)
    for cache in runner.k_cache + runner.v_cache:
        cache.normal_()
    return runner


def decode_inputs(runner: ModelRunner, first_seq: int, seqs: int, length: int) -> dict:
    """forward() arguments for one decode position of sequences [first_seq, first_seq + seqs),
    each with its own `length`-position run of cache blocks."""
    model, device, bs = runner.model, runner.model.device, runner.block_size
    per_seq = -(-length // bs)
    tables = torch.arange(first_seq * per_seq, (first_seq + seqs) * per_seq, device=device, dtype=torch.int32)
    tables = tables.view(seqs, per_seq)
    last = length - 1
    return {
        "x": torch.randn(seqs, model.config.hidden_size, device=device, dtype=model.dtype),
        "positions": torch.full((seqs,), last, dtype=torch.int64, device=device),
        "slots": tables[:, last // bs].long() * bs + last % bs,
        "tables": tables,
        "seq_lens": torch.full((seqs,), length, dtype=torch.int32, device=device),
        "starts": torch.arange(seqs + 1, dtype=torch.int32, device=device),
        "last_rows": torch.arange(seqs, device=device),
    }


PROFILE_REPLAYS = 5


def profiled(fn):
    """The torch profiler over PROFILE_REPLAYS calls of fn (CUDA activity only)."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(PROFILE_REPLAYS):
            fn()
        torch.cuda.synchronize()
    return prof


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seqs", type=int, nargs="+", default=[2, 512])
    p.add_argument("--length", type=int, nargs="+", default=[600])
    p.add_argument("--variant", action="append", default=[], metavar="MODULE.NAME=VALUE,...")
    p.add_argument("--rounds", type=int, default=3, help="the variants are timed interleaved, this many times")
    p.add_argument("--profile", action="store_true", help="also each graph's kernels by GPU time")
    p.add_argument("--json")
    args = p.parse_args()
    results = []
    runner = random_runner(max(args.seqs), max(args.length))
    with torch.inference_mode():
        for length in args.length:
            for seqs in args.seqs:
                inputs = decode_inputs(runner, 0, seqs, length)
                graphs = {}
                for text in ["default", *args.variant]:
                    previous = apply_settings(parse_settings(text) if text != "default" else {})
                    graphs[text] = graphed(lambda inputs=inputs: runner.forward(**inputs))
                    apply_settings(previous)
                for graph, _ in graphs.values():
                    graph.replay()  # a capture computes nothing: fill the outputs once
                reference = graphs["default"][1].float()
                for _ in range(args.rounds):
                    for text, (graph, out) in graphs.items():
                        ms = timed(graph.replay)
                        diff = ((out.float() - reference).norm() / reference.norm()).item()
                        results.append({"seqs": seqs, "length": length, "variant": text, "ms": ms, "rel_diff": diff})
                        print(
                            f"seqs {seqs:4d} length {length:5d} {text}: {ms:.3f} ms (vs default {diff:.1e})", flush=True
                        )
                for text, (graph, _) in graphs.items() if args.profile else ():
                    kernels = kernel_table(profiled(graph.replay))
                    busy = sum(k["us"] for k in kernels) / 1e3 / PROFILE_REPLAYS
                    results.append(
                        {"seqs": seqs, "length": length, "variant": text, "kernel_ms": busy, "kernels": kernels[:20]}
                    )
                    top = ", ".join(f"{k['name'][:40]} {k['us'] / PROFILE_REPLAYS:.0f} us" for k in kernels[:8])
                    print(f"  {text}: kernels {busy:.3f} ms per replay; {top}", flush=True)
                if args.json:
                    with open(args.json, "w") as f:
                        json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
