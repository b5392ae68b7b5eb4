"""Can two cohorts of images overlap on one GPU? Backbone and head graphs on two streams.

    python -m bench.overlap_bench --images 256 --length 600 --json overlap.json   # needs a GPU

A decode step of I images (2 sequences each, text guidance) at sequence length L is one backbone
graph replay then one head graph replay (all 50 sampling steps). This times, per step:
- `whole`: one cohort of I images, backbone then head (what the engine does today),
- `halves_serial`: two cohorts of I/2, one after the other,
- `halves_overlapped`: the two cohorts on two streams, offset by one phase (cohort A's backbone
  beside cohort B's head), so the GPU can run one's kernels in the other's gaps
  (`halves_pipelined`: the same without waiting for both at the end of every step),
and, to see where overlap comes from, the two backbones alone and the two heads alone side by side.
Each cohort's graphs have their own memory pool and capture stream (so their cuBLAS workspaces
differ); random bf16 `nextstep-1-large` weights; the KV cache is random.
"""

from __future__ import annotations

import argparse
import json

import torch

from bench.backbone_bench import decode_inputs, random_runner
from bench.gpu_check import timed
from bench.head_bench import graphed, random_batch
from server.engine.graphed_head import GraphedHeadSampler, GraphKey
from server.engine.model_runner import ModelRunner


class Cohort:
    """Graphs for one cohort: images [first, first + images), i.e. sequences [2 * first, 2 * (first + images))."""

    def __init__(
        self, runner: ModelRunner, sampler: GraphedHeadSampler, first: int, images: int, length: int, steps: int
    ):
        self.stream = torch.cuda.Stream()
        self.inputs = decode_inputs(runner, 2 * first, 2 * images, length)  # the graphs read these on every replay
        self.backbone, _ = graphed(lambda: runner.forward(**self.inputs), self.stream)
        key = GraphKey("legacy-sde", steps, 1.0, 2, False, images)
        self.batch = random_batch(key, runner.model)
        self.head, _ = graphed(lambda: sampler._loop(key, self.batch), self.stream)


def timed_ms(schedule, streams, steps: int) -> float:
    """ms per call of schedule(), timed over `steps` calls after each of which the current stream
    waits for `streams` (so a call's work is all inside its time)."""

    def run():
        for _ in range(steps):
            schedule()
            joined(*streams)

    return timed(run, repeat=3) / steps


def on(stream: torch.cuda.Stream, *graphs) -> None:
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for g in graphs:
            g.replay()


def joined(*streams) -> None:
    for s in streams:
        torch.cuda.current_stream().wait_stream(s)


def measure(runner: ModelRunner, args, length: int) -> dict:
    half = args.images // 2
    whole = Cohort(runner, GraphedHeadSampler(runner.model), 0, args.images, length, args.steps)
    a = Cohort(runner, GraphedHeadSampler(runner.model), 0, half, length, args.steps)
    b = Cohort(runner, GraphedHeadSampler(runner.model), half, half, length, args.steps)
    s1, s2 = a.stream, b.stream

    def overlapped():
        on(s1, a.backbone, a.head)
        on(s2, b.head, b.backbone)

    def pipelined():  # steady state: A's step k beside B's step k-1 tail, no join per step
        with torch.cuda.stream(s1):
            a.backbone.replay()
            a.head.replay()
        with torch.cuda.stream(s2):
            b.head.replay()
            b.backbone.replay()

    def pipelined_block():
        s1.wait_stream(torch.cuda.current_stream())
        s2.wait_stream(torch.cuda.current_stream())
        for _ in range(args.repeat):
            pipelined()

    row = {
        "length": length,
        "images": args.images,
        "whole_backbone": timed_ms(lambda: on(s1, whole.backbone), (s1, s2), args.repeat),
        "whole_head": timed_ms(lambda: on(s1, whole.head), (s1, s2), args.repeat),
        "half_backbone": timed_ms(lambda: on(s1, a.backbone), (s1, s2), args.repeat),
        "half_head": timed_ms(lambda: on(s1, a.head), (s1, s2), args.repeat),
        "halves_serial": timed_ms(lambda: on(s1, a.backbone, a.head, b.backbone, b.head), (s1, s2), args.repeat),
        "halves_overlapped": timed_ms(overlapped, (s1, s2), args.repeat),
        "halves_pipelined": timed_ms(pipelined_block, (s1, s2), 1) / args.repeat,
        "backbones_side_by_side": timed_ms(lambda: (on(s1, a.backbone), on(s2, b.backbone)), (s1, s2), args.repeat),
        "heads_side_by_side": timed_ms(lambda: (on(s1, a.head), on(s2, b.head)), (s1, s2), args.repeat),
    }
    row["whole"] = row["whole_backbone"] + row["whole_head"]
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="nextstep-1-large")
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--length", type=int, nargs="+", default=[600])
    p.add_argument("--steps", type=int, default=50, help="sampling steps of the head")
    p.add_argument("--repeat", type=int, default=5, help="engine steps per timing")
    p.add_argument("--json")
    args = p.parse_args()
    results = []
    runner = random_runner(2 * args.images, max(args.length), args.model)
    with torch.inference_mode():
        for length in args.length:
            row = measure(runner, args, length)
            results.append(row)
            print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
