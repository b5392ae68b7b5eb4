"""Where a kernel runs: Triton on CUDA tensors, the torch reference elsewhere, unless forced."""

from __future__ import annotations

import functools

import torch

try:
    import triton
    import triton.language as tl
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # CPU installs without triton run the references
    triton = None

TRITON_AVAILABLE = triton is not None


def runs_triton(t: torch.Tensor, force: bool | None) -> bool:
    """force True runs Triton on any device (on CPU under TRITON_INTERPRET=1, for tests); False never."""
    if force is not None:
        return force and TRITON_AVAILABLE
    return TRITON_AVAILABLE and t.is_cuda


@functools.cache
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def supports_pdl(t: torch.Tensor) -> bool:
    """Programmatic dependent launch (a kernel starts while its predecessor finishes): CUDA sm90+."""
    return TRITON_AVAILABLE and t.is_cuda and _capability(t.device.index) >= (9, 0)


if triton is not None:

    @triton.jit
    def await_predecessor(PDL: tl.constexpr):
        """Under programmatic dependent launch: wait until the previous kernel's writes are visible,
        then let the next kernel start launching. Before this a kernel may read only weights."""
        if PDL:
            gdc_wait()
            gdc_launch_dependents()

    @triton.jit
    def prefetch_l2(pointers):
        """Ask L2 for the 128-byte lines at pointers (CUDA; nothing is held, nothing waits). Before the
        dependent-launch wait it starts the stream of inputs the previous kernel does not write; L2 is
        where writes land, so a line the previous kernel then writes is not left stale."""
        tl.inline_asm_elementwise(
            "prefetch.global.L2 [$1]; mov.u32 $0, 0;", "=r,l", [pointers], dtype=tl.int32, is_pure=False, pack=1
        )
