"""Weight prefetch into L2 (Hopper): start the next projection's weight stream early.

At one or two images a decode layer alternates bandwidth-bound projections with latency-bound
kernels (rotary + cache write, attention, RMSNorm, SiLU * up) during which HBM sits idle. A
kernel on a side stream asks for part of the next projection's weights to be brought into L2
(`cp.async.bulk.prefetch`, fire and forget) while those run, so the projection then reads that
part from L2. Pieces are spread evenly over the matrix, so every tile of the product finds
some of its weights there. It moves no data the model sees: results are unchanged.
"""

from __future__ import annotations

import torch

from kernels.dispatch import supports_pdl

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs: no prefetch
    triton = None

PIECE = 16384  # bytes per prefetch instruction
MAX_ROWS = 4  # prefetch in decode steps of at most this many rows (beyond, HBM is busy anyway)
# MiB of each projection's weights requested ahead of it (0: none)
QKV_MB = 0
O_PROJ_MB = 0
GATE_UP_MB = 0
DOWN_MB = 0
_BLOCK = 256  # pieces per program

if triton is not None:

    @triton.jit
    def _prefetch_kernel(base_ptr, count, spacing, PIECE: tl.constexpr, BLOCK: tl.constexpr):
        j = tl.minimum(tl.program_id(0) * BLOCK + tl.arange(0, BLOCK), count - 1)  # repeats are harmless
        tl.inline_asm_elementwise(
            f"cp.async.bulk.prefetch.L2.global [$1], {PIECE}; mov.u32 $0, 0;",
            "=r,l", [base_ptr + j.to(tl.int64) * spacing], dtype=tl.int32, is_pure=False, pack=1,
        )  # fmt: skip


def available(t: torch.Tensor) -> bool:
    return supports_pdl(t)  # the same sm90+ CUDA condition as the bulk prefetch instruction


def prefetch_l2(weight: torch.Tensor, nbytes: int) -> None:
    """Ask for about nbytes of the contiguous tensor `weight`, in PIECE-byte pieces spread evenly over it."""
    total = weight.numel() * weight.element_size()
    count = min(total, nbytes) // PIECE
    if count == 0 or not available(weight):
        return
    spacing = total // count // 16 * 16  # >= PIECE, 16-byte aligned: the last piece ends inside
    _prefetch_kernel[(triton.cdiv(count, _BLOCK),)](
        weight.view(-1).view(torch.uint8), count, spacing, PIECE=PIECE, BLOCK=_BLOCK, num_warps=4
    )


class SideStreamPrefetch:
    """start(weight, nbytes) forks a prefetch off the current stream; join() makes the current
    stream wait for it (before the product that reads the weights). Capturable in a CUDA graph."""

    def __init__(self):
        self.stream = torch.cuda.Stream()
        self.pending = False  # join only what was forked: a capture may not wait on outside work

    def start(self, weight: torch.Tensor, megabytes: int) -> None:
        if megabytes <= 0:
            return
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            prefetch_l2(weight, megabytes << 20)
        self.pending = True

    def join(self) -> None:
        if self.pending:
            torch.cuda.current_stream().wait_stream(self.stream)
            self.pending = False
