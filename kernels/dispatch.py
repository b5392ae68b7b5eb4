"""Where a kernel runs: Triton on CUDA tensors, the torch reference elsewhere, unless forced."""

from __future__ import annotations

import torch

try:
    import triton  # noqa: F401
except ImportError:  # CPU installs without triton run the references
    triton = None

TRITON_AVAILABLE = triton is not None


def runs_triton(t: torch.Tensor, force: bool | None) -> bool:
    """force True runs Triton on any device (on CPU under TRITON_INTERPRET=1, for tests); False never."""
    if force is not None:
        return force and TRITON_AVAILABLE
    return TRITON_AVAILABLE and t.is_cuda
