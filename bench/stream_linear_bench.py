"""stream_linear against cuBLAS on the backbone's projections at a few rows: us per product.

    python -m bench.stream_linear_bench --rows 2 4 --tile 16x256x4x4 --tile 64x128x4x4 --programs-per-sm 0 2 \
        --json out.json   # GPU

Each product reads one of several weight copies in turn (together well beyond L2), so every call
streams its weights from HBM as in a decode step; 16 calls are one CUDA graph.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from bench.gpu_check import timed
from bench.head_bench import graphed
from kernels import decoder_step
from model.presets import preset_config

CALLS = 16
MIN_BYTES = 1 << 30  # weight copies per shape: at least this much, so L2 (50 MB) holds none of them


def shapes(model: str) -> dict[str, tuple[int, int, bool]]:
    """name -> (out features, in features, bias) of one decoder layer's products."""
    c = preset_config(model)
    qkv = (c.num_attention_heads + 2 * c.num_key_value_heads) * c.head_dim
    return {
        "qkv": (qkv, c.hidden_size, True),
        "o": (c.hidden_size, c.num_attention_heads * c.head_dim, False),
        "gate_up": (2 * c.intermediate_size, c.hidden_size, False),
        "down": (c.hidden_size, c.intermediate_size, False),
    }


def time_products(fn, weights, biases, x) -> float:
    """us per product of fn(x, weight, bias) over CALLS calls cycling through the weight copies."""

    def calls():
        return [fn(x, weights[i % len(weights)], biases[i % len(biases)]) for i in range(CALLS)]

    graph, _ = graphed(calls)
    return timed(graph.replay) * 1e3 / CALLS


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="nextstep-1-large")
    p.add_argument("--rows", type=int, nargs="+", default=[2, 4])
    p.add_argument("--tile", action="append", default=[], metavar="BNxBKxWARPSxSTAGES")
    p.add_argument("--programs-per-sm", type=int, nargs="+", default=[decoder_step.STREAM_LINEAR_PROGRAMS_PER_SM],
                   help="STREAM_LINEAR_PROGRAMS_PER_SM values: split K up to about this many programs (0: never)")  # fmt: skip
    p.add_argument("--json")
    args = p.parse_args()
    tiles = [tuple(int(v) for v in t.split("x")) for t in args.tile] or [decoder_step.STREAM_LINEAR_TILE]
    decoder_step.STREAM_LINEAR_MAX_ROWS = max(args.rows)
    results = []
    with torch.inference_mode():
        for name, (n, k, has_bias) in shapes(args.model).items():
            copies = -(-MIN_BYTES // (n * k * 2))
            weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
            biases = [torch.randn(n, device="cuda", dtype=torch.bfloat16) if has_bias else None] * copies
            for rows in args.rows:
                x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
                want = F.linear(x, weights[0], biases[0]).float()
                row = {"shape": name, "n": n, "k": k, "rows": rows, "cublas_us": time_products(F.linear, weights, biases, x)}
                gbytes = n * k * 2 / 1e9
                line = f"{name:8s} {rows} rows: cuBLAS {row['cublas_us']:7.2f} us ({gbytes / row['cublas_us'] * 1e3:.2f} TB/s)"
                for tile in tiles:
                    for per_sm in args.programs_per_sm:
                        decoder_step.STREAM_LINEAR_TILE, decoder_step.STREAM_LINEAR_PROGRAMS_PER_SM = tile, per_sm
                        got = decoder_step.stream_linear(x, weights[0], biases[0]).float()
                        us = time_products(decoder_step.stream_linear, weights, biases, x)
                        diff = ((got - want).norm() / want.norm()).item()
                        split = decoder_step.stream_linear_split(rows, n, k, x.device)
                        label = "x".join(map(str, tile)) + f"/split{split}"
                        row[label] = {"us": us, "rel_diff": diff, "programs_per_sm": per_sm}
                        line += f" | {label} {us:7.2f} ({diff:.0e})"
                print(line, flush=True)
                results.append(row)
            del weights
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
