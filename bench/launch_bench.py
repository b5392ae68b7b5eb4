"""The floor of one dependent kernel hop: a chain of near-empty kernels in one CUDA graph.

    python -m bench.launch_bench --json launch.json      # needs a GPU

Each kernel of the chain either only writes its program ids, or first reads the whole vector
the previous kernel wrote (12 KB, as a few-rows head kernel reads its input rows) and sums it.
Launched plainly, as programmatic dependents that wait before letting the next kernel launch
(kernels.dispatch.await_predecessor), or letting it launch before waiting. The head's few-rows
kernels take ~3.4 us per hop on an H200: what this chain takes is the part no kernel body can save.
"""

from __future__ import annotations

import argparse
import json

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from bench.gpu_check import timed
from bench.head_bench import graphed

MODES = {0: "plain", 1: "wait, then let the next launch", 2: "let the next launch, then wait"}
CHAIN = 500  # kernels per graph


@triton.jit
def _hop_kernel(src, dst, N, MODE: tl.constexpr, LOAD: tl.constexpr):
    if MODE == 1:
        gdc_wait()
        gdc_launch_dependents()
    if MODE == 2:
        gdc_launch_dependents()
        gdc_wait()
    pid = tl.program_id(0)
    if LOAD:
        r = tl.arange(0, 4096)
        total = tl.sum(tl.load(src + r, mask=r < N, other=0.0), axis=0)
        tl.store(dst + pid * 8 + tl.arange(0, 8), total + tl.arange(0, 8).to(tl.float32))
    else:
        tl.store(dst + pid, pid.to(tl.float32))


def hop_us(programs: int, mode: int, load: bool) -> float:
    a, b = torch.ones(1 << 16, device="cuda"), torch.ones(1 << 16, device="cuda")

    def chain():
        src, dst = a, b
        for _ in range(CHAIN):
            _hop_kernel[(programs,)](src, dst, 3072, MODE=mode, LOAD=load, num_warps=4, launch_pdl=mode > 0)
            src, dst = dst, src

    graph, _ = graphed(chain)
    return timed(graph.replay) * 1e3 / CHAIN


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--programs", type=int, nargs="+", default=[1, 132, 192, 384])
    p.add_argument("--json")
    args = p.parse_args()
    rows = []
    for load in (False, True):
        for programs in args.programs:
            for mode, name in MODES.items():
                us = hop_us(programs, mode, load)
                rows.append({"load": load, "programs": programs, "launch": name, "us_per_hop": us})
                print(f"load {load!s:5} programs {programs:4d} {name:31}: {us:5.2f} us per hop", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
