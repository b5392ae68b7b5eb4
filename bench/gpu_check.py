"""GPU checks and timings in one process: paged attention kernels and engine parity (head: head_bench.py).

    python -m bench.gpu_check --json gpu_check.json

1. Paged attention at the real shapes (40 query / 8 kv heads, head_dim 128, bf16): each backend
   against the reference on fresh random inputs (relative error), and its time.
2. The decoder-step kernels at the real shapes (bf16) against the model's own modules: rotary
   embedding, cache write and residual add bit-identical, norms and SiLU relative error; the few-row
   stream product and cuBLAS against a float32 product, the stream product with SiLU * up in its
   epilogue against the product followed by silu_mul, and the o and down products' split partials
   summed in add_rms_norm and the q/k/v product's in rope_write_kv, each against the summed product
   then that kernel (all bit-identical).
3. Engine vs reference generator on the GPU (tiny preset, float32 and bfloat16): largest token
   and pixel differences over a mixed batch.
"""

from __future__ import annotations

import argparse
import json
import time
import traceback
from dataclasses import replace

import torch
import torch.nn.functional as F

from bench.settings import apply_settings, parse_settings
from kernels.paged_attention import BACKENDS, paged_attention
from model.bundle import load_bundle
from model.reference import GenerationRequest
from model.sampling import published_defaults
from server.engine.engine import BatchedEngine, EngineConfig
from server.engine.events import EngineRequest, ImageDone

HBM_BYTES_PER_S = 4.3e12
BF16_FLOPS = 790e12


def timed(fn, repeat=10) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def check_attention(results: dict) -> None:
    torch.manual_seed(0)
    heads, kv_heads, d, block = 40, 8, 128, 16
    cases = {
        "decode_256x~550": ([1] * 256, 256, 1100),
        "decode_2x~550": ([1] * 2, 2, 1100),  # one image: keys split over partitions, then merged
        "prefill_mix": ([1, 7, 64, 200, 1] * 4, 20, 1300),
    }
    out = {}
    for name, (q_lens, seqs, max_len) in cases.items():
        q_lens = q_lens[:seqs]
        seq_lens = [max(q, int(torch.randint(q, max_len, (1,)))) for q in q_lens]
        blocks_per_seq = [-(-s // block) for s in seq_lens]
        num_blocks = sum(blocks_per_seq) + 8
        perm = torch.randperm(num_blocks).tolist()
        tables = torch.zeros(len(seq_lens), max(blocks_per_seq), dtype=torch.int32)
        used = 0
        for i, nb in enumerate(blocks_per_seq):
            tables[i, :nb] = torch.tensor(perm[used : used + nb])
            used += nb
        k_cache = torch.randn(num_blocks, block, kv_heads, d, device="cuda", dtype=torch.bfloat16)
        v_cache = torch.randn_like(k_cache)
        q = torch.randn(sum(q_lens), heads, d, device="cuda", dtype=torch.bfloat16)
        args = (
            q,
            k_cache,
            v_cache,
            tables.cuda(),
            torch.tensor(seq_lens, dtype=torch.int32, device="cuda"),
            torch.tensor([0, *q_lens], dtype=torch.int32).cumsum(0).to(torch.int32).cuda(),
        )
        ref = paged_attention(*args, backend="reference").float()
        row = {}
        for backend in BACKENDS:
            if backend == "reference":
                continue
            try:
                got = paged_attention(*args, backend=backend).float()
            except Exception as err:  # noqa: BLE001 - an optional backend may be missing; report it
                row[backend] = f"unavailable: {type(err).__name__}: {err}"[:200]
                continue
            rel = ((got - ref).norm() / ref.norm()).item()
            # a race between programs would show as repeats that differ
            same = all(torch.equal(paged_attention(*args, backend=backend).float(), got) for _ in range(20))
            row[backend] = {"rel_error": rel, "repeats_identical": same,
                            "ms": timed(lambda: paged_attention(*args, backend=backend))}  # fmt: skip
        row["reference_ms"] = timed(lambda: paged_attention(*args, backend="reference"), repeat=3)
        out[name] = row
        print("attention", name, row, flush=True)
    results["attention"] = out


def sweep_decode_attention(results: dict) -> None:
    """Decode attention late in a 512x512 image at 256 images (512 sequences of 500-1100 keys):
    time and bandwidth of the Triton kernel under key tiles, warps, stages and partition sizes."""
    from kernels import paged_attention as pa

    torch.manual_seed(0)
    heads, kv_heads, d, block = 40, 8, 128, 16
    seq_lens = torch.randint(500, 1100, (512,))
    blocks_per_seq = (seq_lens + block - 1) // block
    num_blocks = int(blocks_per_seq.sum()) + 8
    perm = torch.randperm(num_blocks)
    tables = torch.zeros(512, int(blocks_per_seq.max()), dtype=torch.int32)
    used = 0
    for i, nb in enumerate(blocks_per_seq.tolist()):
        tables[i, :nb] = perm[used : used + nb]
        used += nb
    k_cache = torch.randn(num_blocks, block, kv_heads, d, device="cuda", dtype=torch.bfloat16)
    v_cache = torch.randn_like(k_cache)
    q = torch.randn(512, heads, d, device="cuda", dtype=torch.bfloat16)
    args = (q, k_cache, v_cache, tables.cuda(), seq_lens.to(torch.int32).cuda())
    ref = pa.paged_decode_attention_triton(*args).float()  # the current defaults, checked against the reference below
    starts = torch.arange(513, dtype=torch.int32, device="cuda")
    exact = pa.paged_attention_reference(*args, starts).float()
    gbytes = int(seq_lens.sum()) * kv_heads * d * 2 * 2 / 1e9
    rows = [{"config": "default", "rel_error": ((ref - exact).norm() / exact.norm()).item()}]
    configs = [dict(tile=t, num_warps=w, num_stages=st, partition=None) for t in (64, 128) for w in (4, 8) for st in (2, 3, 4)]
    configs += [dict(tile=64, num_warps=4, num_stages=3, partition=p) for p in (256, 512, 1024)]
    saved = pa._KEY_TILE
    for c in configs:
        try:
            pa._KEY_TILE = c["tile"]
            pa.DECODE_LAUNCH.update(num_warps=c["num_warps"], num_stages=c["num_stages"])
            run = lambda: pa.paged_decode_attention_triton(*args, partition_size=c["partition"])  # noqa: E731
            got = run().float()
            ms = timed(run, repeat=20)
            rows.append(dict(c, ms=ms, tb_per_s=gbytes / ms, rel_error=((got - exact).norm() / exact.norm()).item()))
        except Exception as err:  # noqa: BLE001 - a config may not compile; report it
            rows.append(dict(c, error=repr(err)[:200]))
        finally:
            pa._KEY_TILE = saved
            pa.DECODE_LAUNCH.clear()
        print("decode sweep", rows[-1], flush=True)
    results["decode_attention_sweep"] = {"gbytes": gbytes, "rows": rows}


def check_decoder_step(results: dict) -> None:
    from kernels import decoder_step as ds
    from model.decoder import RMSNorm
    from model.rope import RotaryEmbedding

    torch.manual_seed(0)
    tokens, heads, kv_heads, d, hidden, inner = 512, 40, 8, 128, 5120, 13824
    bf16 = dict(device="cuda", dtype=torch.bfloat16)
    rotary = RotaryEmbedding(d, 1e6, None, 32768)
    cos, sin = rotary.cos_sin(torch.randint(0, 4000, (tokens,), device="cuda"), torch.bfloat16)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * d, **bf16)
    q, k, v = qkv.split([heads * d, kv_heads * d, kv_heads * d], dim=1)
    q, k, v = q.view(tokens, heads, d), k.view(tokens, kv_heads, d), v.view(tokens, kv_heads, d)
    slots = torch.randperm(4096 * 16, device="cuda")[:tokens]
    caches = [torch.randn(4096, 16, kv_heads, d, **bf16) for _ in range(2)]
    caches += [c.clone() for c in caches]
    got = ds.rope_write_kv(q, k, v, cos, sin, caches[0], caches[1], slots)
    want = ds.rope_write_kv_reference(q, k, v, cos, sin, caches[2], caches[3], slots)
    out = {
        "rope_q_identical": torch.equal(got, want),
        "rope_q_identical_fraction": (got == want).float().mean().item(),
        "rope_q_max_abs_diff": (got.float() - want.float()).abs().max().item(),
        "rope_q_rel_error": ((got.float() - want.float()).norm() / want.float().norm()).item(),
        "rope_k_cache_identical_fraction": (caches[0] == caches[2]).float().mean().item(),
        "rope_v_cache_identical": torch.equal(caches[1], caches[3]),
    }
    norm = RMSNorm(hidden, 1e-6).to(**bf16)
    norm.weight.data.normal_(1, 0.1)
    x, delta = torch.randn(tokens, hidden, **bf16), torch.randn(tokens, hidden, **bf16)
    (x_got, h_got), (x_want, h_want) = ds.add_rms_norm(x, delta, norm), ds.add_rms_norm_reference(x, delta, norm)
    out["residual_identical"] = torch.equal(x_got, x_want)
    out["rms_norm_rel_error"] = ((h_got.float() - h_want.float()).norm() / h_want.float().norm()).item()
    out["rms_norm_identical_fraction"] = (h_got == h_want).float().mean().item()
    gate, up = torch.randn(tokens, inner, **bf16), torch.randn(tokens, inner, **bf16)
    got, want = ds.silu_mul(gate, up).float(), ds.silu_mul_reference(gate, up).float()
    out["silu_mul_rel_error"] = ((got - want).norm() / want.norm()).item()
    for rows in (2, 16, 32):  # stream_linear against a float32 product, the MLP's down projection
        x, weight = torch.randn(rows, inner, **bf16), torch.randn(hidden, inner, **bf16) / inner**0.5
        want = x.float() @ weight.float().T
        previous = apply_settings(parse_settings("decoder_step.STREAM_LINEAR_PROGRAMS_PER_SM=0"))
        unsplit = ds.stream_linear(x, weight)
        apply_settings(previous)
        repeats = [ds.stream_linear(x, weight) for _ in range(50)]  # split K: sums in slice order
        for name, got in (("stream_linear", repeats[0]), ("unsplit", unsplit), ("cublas", F.linear(x, weight))):
            out[f"{name}_{rows}_rows_rel_error"] = ((got.float() - want).norm() / want.norm()).item()
        out[f"stream_linear_{rows}_rows_repeats_identical"] = all(torch.equal(r, repeats[0]) for r in repeats)
    # products called with summed_by leave their partials up to 16 rows; the others sum as always
    previous = apply_settings(parse_settings("decoder_step.STREAM_LINEAR_SUM_IN_CONSUMER_MAX_ROWS=16"))
    for rows in (2, 16):  # the o and down products' partials summed in add_rms_norm against the summed products
        x, identical, left_partials = torch.randn(rows, hidden, **bf16), [], []
        for k in (hidden, inner):
            h, weight = torch.randn(rows, k, **bf16), torch.randn(hidden, k, **bf16) / k**0.5
            partials = ds.stream_linear(h, weight, summed_by="add_rms_norm")
            left_partials.append(isinstance(partials, ds.SplitPartials))
            got, want = ds.add_rms_norm(x, partials, norm), ds.add_rms_norm(x, ds.stream_linear(h, weight), norm)
            identical.append(torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]))
        out[f"split_sum_in_norm_{rows}_rows_identical"] = all(identical)
        out[f"split_sum_in_norm_{rows}_rows_left_partials"] = all(left_partials)  # else the check above is moot
    qkv_sizes = [heads * d, kv_heads * d, kv_heads * d]
    for rows in (2, 16):  # the q/k/v product's partials summed in rope_write_kv against the summed product
        h, weight = torch.randn(rows, hidden, **bf16), torch.randn(sum(qkv_sizes), hidden, **bf16) / hidden**0.5
        bias = torch.randn(sum(qkv_sizes), **bf16)
        cos, sin = rotary.cos_sin(torch.randint(0, 4000, (rows,), device="cuda"), torch.bfloat16)
        slots = torch.randperm(256 * 16, device="cuda")[:rows]
        caches = [torch.randn(256, 16, kv_heads, d, **bf16) for _ in range(2)]
        caches += [c.clone() for c in caches]
        partials = ds.stream_linear(h, weight, bias, summed_by="rope_write_kv")
        got = ds.rope_write_kv_joined(partials, qkv_sizes, d, cos, sin, caches[0], caches[1], slots)
        summed = ds.stream_linear(h, weight, bias)
        want = ds.rope_write_kv_joined(summed, qkv_sizes, d, cos, sin, caches[2], caches[3], slots)
        same_caches = torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])
        out[f"split_sum_in_rope_{rows}_rows_identical"] = torch.equal(got, want) and same_caches
        out[f"split_sum_in_rope_{rows}_rows_left_partials"] = isinstance(partials, ds.SplitPartials)
    apply_settings(previous)
    for rows in (2, 16, 32):  # SiLU * up in the gate/up product's epilogue against the two kernels
        h, weight = torch.randn(rows, hidden, **bf16), torch.randn(2 * inner, hidden, **bf16) / hidden**0.5
        gate, up = ds.stream_linear(h, weight).chunk(2, dim=1)
        out[f"stream_linear_silu_mul_{rows}_rows_identical"] = torch.equal(
            ds.stream_linear_silu_mul(h, weight), ds.silu_mul(gate, up)
        )
    print("decoder step", out, flush=True)
    results["decoder_step"] = out


def check_engine_parity(results: dict) -> None:
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        bundle = load_bundle("tiny", device="cuda", dtype=dtype)
        generator = bundle.reference_generator()
        base = published_defaults("nextstep-1", edit=False)
        requests = [
            GenerationRequest("a red circle", 64, 32, replace(base, num_steps=6), n=2, seed=1),
            GenerationRequest("two blue squares", 32, 48, replace(base, num_steps=5, sampler="sde"), n=1, seed=2),
            GenerationRequest("a cat", 48, 48, replace(base, num_steps=4, guidance_scale=1.0), n=3, seed=3),
        ]
        images = {}
        engine = BatchedEngine(
            bundle,
            lambda e: images.__setitem__((e.request_id, e.image_index), e.pixels) if isinstance(e, ImageDone) else None,
            EngineConfig(block_size=16, num_blocks=256),
        )
        for i, r in enumerate(requests):
            engine.add_request(EngineRequest(str(i), r))
        while engine.has_work():
            engine.step()
        worst = 0
        mean = []
        for i, r in enumerate(requests):
            ref = generator.generate(r).pixels.numpy().astype(int)
            for j in range(r.n):
                diff = abs(images[(str(i), j)].astype(int) - ref[j])
                worst = max(worst, int(diff.max()))
                mean.append(float(diff.mean()))
        out[str(dtype)] = {"max_pixel_diff": worst, "mean_pixel_diff": sum(mean) / len(mean)}
        print("engine parity", dtype, out[str(dtype)], flush=True)
    results["engine_parity_gpu"] = out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json")
    p.add_argument("--skip", nargs="*", default=[], choices=["attention", "decoder_step", "parity", "decode_sweep"])
    p.add_argument("--setting", action="append", default=[], metavar="MODULE.NAME=VALUE,...",
                   help="kernels settings for this run, e.g. decoder_step.STREAM_LINEAR_MAX_ROWS=16")  # fmt: skip
    args = p.parse_args()
    for text in args.setting:
        apply_settings(parse_settings(text))
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "settings": args.setting}
    started = time.time()
    checks = (
        ("attention", check_attention),
        ("decode_sweep", sweep_decode_attention),
        ("decoder_step", check_decoder_step),
        ("parity", check_engine_parity),
    )
    for name, fn in checks:
        if name not in args.skip:
            try:
                fn(results)
            except Exception as err:  # noqa: BLE001 - keep the other checks' results
                results[name + "_error"] = repr(err)
                print(name, "FAILED", repr(err), flush=True)
                traceback.print_exc()
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(results, f, indent=2, default=str)
    print(f"done in {time.time() - started:.0f}s")


if __name__ == "__main__":
    main()
