"""BLAS choices for the engine's matrix products: the captured decode graph (as backbone_bench)
and the fused head loop (as head_bench), each with torch's default BLAS, with cuBLASLt preferred,
and with TunableOp's tuned GEMMs (every cuBLAS/cuBLASLt candidate timed per shape, the fastest kept).

    python -m bench.blas_bench --seqs 2 4 512 --head-rows 2 512 --json blas.json   # needs a GPU
"""

from __future__ import annotations

import argparse
import json

import torch

from bench.backbone_bench import decode_inputs, random_runner
from bench.gpu_check import timed
from bench.head_bench import graphed, random_batch, random_head
from server.engine.graphed_head import GraphKey, fused_sample_loop, step_time_embeddings


def set_choice(choice: str) -> None:
    """Make `choice` torch's BLAS for the next captures."""
    torch.backends.cuda.preferred_blas_library("cublaslt" if choice == "cublaslt" else "cublas")
    tunable = choice == "tunableop"
    torch.cuda.tunable.enable(tunable)
    torch.cuda.tunable.tuning_enable(tunable)


def compare(label: str, fn, choices: list[str], rounds: int, results: list) -> None:
    """fn captured under each choice, then the graphs timed interleaved `rounds` times."""
    graphs = {}
    for choice in choices:
        set_choice(choice)
        graphs[choice] = graphed(fn)
    set_choice("default")
    for graph, _ in graphs.values():
        graph.replay()
    reference = graphs[choices[0]][1].float()
    for _ in range(rounds):
        for choice, (graph, out) in graphs.items():
            ms = timed(graph.replay)
            diff = ((out.float() - reference).norm() / reference.norm()).item()
            results.append({"part": label, "choice": choice, "ms": ms, "rel_diff": diff})
            print(f"{label} {choice}: {ms:.3f} ms (vs {choices[0]} {diff:.1e})", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seqs", type=int, nargs="*", default=[2, 4, 512])
    p.add_argument("--length", type=int, default=600)
    p.add_argument("--head-rows", type=int, nargs="*", default=[2, 512])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--choices", nargs="+", default=["default", "cublaslt", "tunableop"])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json")
    args = p.parse_args()
    torch.cuda.tunable.set_filename("/tmp/tunableop_results.csv")  # not the working tree
    results: list = []
    with torch.inference_mode():
        if args.seqs:
            runner = random_runner(max(args.seqs), args.length)
            for seqs in args.seqs:
                inputs = decode_inputs(runner, 0, seqs, args.length)
                compare(f"decode seqs {seqs}", lambda inputs=inputs: runner.forward(**inputs), args.choices,
                        args.rounds, results)  # fmt: skip
            del runner
        model, fused = random_head()
        for rows in args.head_rows:
            key = GraphKey("legacy-sde", args.steps, 1.0, 2, False, rows // 2)
            batch = random_batch(key, model)
            t_emb = step_time_embeddings(fused, key, batch.seed.device)
            compare(f"head rows {rows}", lambda key=key, batch=batch, t_emb=t_emb: fused_sample_loop(fused, key, batch, t_emb),
                    args.choices, args.rounds, results)  # fmt: skip
    tuned = torch.cuda.tunable.get_results()
    print("TunableOp picks:", *tuned, sep="\n  ")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"results": results, "tunableop": [list(map(str, r)) for r in tuned]}, f, indent=2)


if __name__ == "__main__":
    main()
