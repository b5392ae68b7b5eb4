"""cuBLASLt's candidate algorithms against torch's choice, on the engine's product shapes.

    python -m bench.cublaslt_bench --json cublaslt.json     # needs a GPU

For each (rows, out features, in features, bias) of the 14B backbone's projections at 2, 4 and
512 rows and of the head's residual-block products: F.linear (torch's pick) and every candidate
kernels.cublaslt offers, each as a CUDA graph of TIMING_REPEATS calls; the fastest candidate's
difference from F.linear.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from kernels import cublaslt
from model.presets import preset_config


def shapes(rows_list) -> list[tuple[int, int, int, bool]]:
    c = preset_config("nextstep-1-large")
    kv = c.num_key_value_heads * (c.hidden_size // c.num_attention_heads)
    backbone = [(c.hidden_size + 2 * kv, c.hidden_size, True), (c.hidden_size, c.hidden_size, False),
                (2 * c.intermediate_size, c.hidden_size, False), (c.hidden_size, c.intermediate_size, False)]  # fmt: skip
    out = [(m, n, k, bias) for m in rows_list for n, k, bias in backbone]
    head = c.fm_head_dim
    return out + [(m, head, head, True) for m in (256, 512)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, nargs="+", default=[2, 4, 512])
    p.add_argument("--json")
    args = p.parse_args()
    torch.manual_seed(0)
    results = []
    for m, n, k, has_bias in shapes(args.rows):
        weight = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5
        bias = torch.randn(n, device="cuda", dtype=torch.bfloat16) if has_bias else None
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        want = F.linear(x.float(), weight.float(), None if bias is None else bias.float())
        torch_us = cublaslt.graph_time_us(lambda x=x, weight=weight, bias=bias: F.linear(x, weight, bias))
        plan = cublaslt._Plan(weight, bias, m, x.stride(0))
        times = cublaslt.time_candidates(plan, x, weight, bias)
        errors = [((plan.run(x, weight, bias, a).float() - want).norm() / want.norm()).item() for a in plan.candidates]
        best = min(range(len(times)), key=times.__getitem__)
        row = {"rows": m, "n": n, "k": k, "bias": has_bias, "torch_us": torch_us, "candidates_us": times,
               "rel_errors": errors, "best": best}  # fmt: skip
        results.append(row)
        print(f"{m:4d} x {n:6d} x {k:6d} bias {has_bias!s:5}: torch {torch_us:7.2f} us, first {times[0]:7.2f}, "
              f"best #{best} {times[best]:7.2f} us ({times[best] / torch_us:.2f}x), {len(times)} candidates, "
              f"max rel err {max(errors):.1e}", flush=True)  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
