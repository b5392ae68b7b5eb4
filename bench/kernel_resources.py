"""Registers, stack (spills) and barriers of the head's few-rows kernels for an H100/H200, without a GPU.

    python -m bench.kernel_resources            # any machine with triton's CUDA backend
    python -m bench.kernel_resources --decoder-step   # the backbone's split-K sums, in the product or its consumer

Compiles kernels.fused_head._few_rows_kernel for sm_90 with the installed Triton and reads the
cubin's resource usage with the cuobjdump Triton ships, and from the PTX the `bar.sync` barriers and
the global loads by width. Few-rows kernels are one dependent chain, and registers likely decide how
much of the next kernel's weight streaming fits beside the running one: on an H100 a version with
29 -> 9 barriers but 168 -> 242 registers was slower (bench/RESULTS.md, sessions 16 and 19). The
installed Triton may differ from the GPU machine's, so compare configurations, not absolute counts."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile
from collections import Counter

import triton
from triton.backends.compiler import GPUTarget

from kernels import decoder_step, fused_head

POINTERS = {"sample_ptr": "*fp32", "cfg_ptr": "*fp32", "cfg_img_ptr": "*fp32", "seed_ptr": "*i64",
            "image_ptr": "*i64", "token_ptr": "*i64", "part_ptr": "*fp32", "count_ptr": "*i32",
            "slots_ptr": "*i64"}  # fmt: skip
FLOATS = {"eps", "a", "b", "c"}
# integers the launches pass as multiples of 16 (Triton's launcher marks those divisible, as it does
# 16-byte-aligned pointers: without the mark no load is vectorized); D and slice_stride are add_rms_norm's
DIVISIBLE = {"N", "K", "stride_xm", "stride_wn", "stride_om", "stride_gm", "stride_rm", "stride_mod",
             "D", "slice_stride"}  # fmt: skip
# (name, epilogue, norm, affine, slots, K): the head's few-rows launches at its real width
LAUNCHES = [
    ("input projection", fused_head.EPILOGUE_BIAS, False, False, 1, 64),
    ("LayerNorm + product + SiLU", fused_head.EPILOGUE_BIAS_SILU, True, True, 1, 1536),
    ("product + gated residual", fused_head.EPILOGUE_GATED_RESIDUAL, False, False, 1, 1536),
    ("final layer + guided update", fused_head.EPILOGUE_GUIDED_UPDATE, True, False, 2, 1536),
]


def compile_for_sm90(kernel, constexprs: dict, num_warps: int, pointers: dict | None = None, num_stages: int = 3):
    """kernel compiled for sm_90 as the head launches it: bf16 tensors, int32 scalars, pointers and
    DIVISIBLE integers marked multiples of 16. pointers: types beyond POINTERS, for pointers whose element
    type depends on the launch (add_rms_norm's delta_ptr is fp32 partials after a split product)."""
    types = POINTERS | (pointers or {})
    signature, attrs = {}, {}
    for index, name in enumerate(kernel.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        if name.endswith("_ptr") or name in DIVISIBLE:
            attrs[(index,)] = [["tt.divisibility", 16]]
        if name.endswith("_ptr"):
            signature[name] = types.get(name, "*bf16")
        else:
            signature[name] = "fp32" if name in FLOATS else "i32"
    source = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    options = {"num_warps": num_warps, "num_stages": num_stages}
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)


def decoder_step_launches() -> list:
    """(name, kernel, constexprs, warps, stages, pointer types) of the kernels a split stream product's sum can
    sit in, at the real widths: the product's last slice (counters) or the consumer (partials left)."""
    block_n, block_k, warps, stages = decoder_step.STREAM_LINEAR_TILE
    stream = {"HAS_BIAS": False, "GLU": False, "ROWS": 16, "BLOCK_N": block_n, "BLOCK_K": block_k, "SPLIT": 3,
              "PREFETCH_LINES": decoder_step.STREAM_LINEAR_PREFETCH // 128, "PDL": True}  # fmt: skip
    norm = {"HAS_DELTA": True, "DELTA_BIAS": False, "BLOCK": 8192, "PDL": True}  # hidden 5120
    rope = {"H": 40, "KV": 8, "DIM": 128, "PDL": True}
    partials = {name: "*fp32" for name in ("delta_ptr", "q_ptr", "k_ptr", "v_ptr")}
    return [
        ("stream product, 3 slices, counters", decoder_step._stream_linear_kernel,
         stream | {"LEAVE_PARTIALS": False}, warps, stages, {}),
        ("stream product, 3 slices, partials left", decoder_step._stream_linear_kernel,
         stream | {"LEAVE_PARTIALS": True}, warps, stages, {}),
        ("add_rms_norm", decoder_step._add_rms_norm_kernel, norm | {"SLICES": 0}, 8, 3, {}),
        ("add_rms_norm, 3 slices summed", decoder_step._add_rms_norm_kernel, norm | {"SLICES": 3}, 8, 3, partials),
        ("rope_write_kv", decoder_step._rope_write_kv_kernel, rope | {"SLICES": 0, "HAS_BIAS": False}, 4, 3, {}),
        ("rope_write_kv, 2 slices + bias summed", decoder_step._rope_write_kv_kernel,
         rope | {"SLICES": 2, "HAS_BIAS": True}, 4, 3, partials),
    ]  # fmt: skip


def resources(compiled) -> dict:
    """{'REG': .., 'STACK': .., ...} from the cubin, plus from the PTX the barriers ('BAR': each
    cross-warp reduction or layout change waits at one) and global loads by width."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(compiled.asm["cubin"])
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    try:
        report = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True, check=True)
    finally:
        os.unlink(f.name)
    used = {key: int(value) for key, value in re.findall(r"(\w+):(\d+)", report.stdout.split("Function")[-1])}
    ptx = compiled.asm["ptx"]
    used["BAR"] = len(re.findall(r"\bbar\.sync|\bbarrier\.sync", ptx))
    loads = re.findall(r"ld\.global[.\w]*?\.(v[24])?\.?[bfsu](\d+)", ptx)
    used["LOADS"] = dict(sorted(Counter(f"{v or 'v1'}.b{bits}" for v, bits in loads).items()))
    return used


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, nargs="+", default=[2, 4])
    p.add_argument("--tiles", nargs="+", default=["x".join(map(str, fused_head.FEW_ROWS_TILE))],
                   help="weight rows x warps per program, e.g. 8x4 8x8")  # fmt: skip
    p.add_argument("--decoder-step", action="store_true", help="the backbone's split-K sums instead of the head")
    args = p.parse_args()
    if args.decoder_step:
        for name, kernel, constexprs, warps, stages, pointers in decoder_step_launches():
            used = resources(compile_for_sm90(kernel, constexprs, warps, pointers, stages))
            print(f"{name:40}: {used['REG']:3d} registers, {used['STACK']:4d} B stack, {used['BAR']:2d} barriers")
        return
    for tile in args.tiles:
        block_n, warps = (int(v) for v in tile.split("x"))
        for rows in args.rows:
            for name, epilogue, norm, affine, slots, k in LAUNCHES:
                constexprs = {
                    "EPILOGUE": epilogue, "NORM": norm, "AFFINE": affine, "ROWS": triton.next_power_of_2(rows),
                    "BLOCK_N": block_n, "BLOCK_K": triton.next_power_of_2(k), "PDL": True, "SLOTS": slots,
                    "IMAGES": triton.next_power_of_2(max(1, rows // slots)),
                }  # fmt: skip
                used = resources(compile_for_sm90(fused_head._few_rows_kernel, constexprs, warps))
                print(f"tile {tile} rows {rows} {name:28}: {used['REG']:3d} registers, {used['STACK']:4d} B stack, "
                      f"{used['BAR']:2d} barriers, global loads {used['LOADS']}")  # fmt: skip


if __name__ == "__main__":
    main()
