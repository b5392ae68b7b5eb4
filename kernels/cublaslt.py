"""cuBLASLt matrix products with the fastest of the heuristic's algorithms, timed once per shape.

torch asks cuBLASLt's heuristic for one algorithm per product and runs it. On the engine's odd
shapes (one image's projections, M = 2; the head's 512 x 1536 x 1536 blocks) another of its
candidates may be faster. linear(x, weight, bias) asks for up to CANDIDATES, times each on the real
operands the first time a shape is seen (never inside a CUDA graph capture: there it runs
F.linear), keeps the fastest and runs it from then on. Results equal
F.linear's up to the summation order of the chosen algorithm.
"""

from __future__ import annotations

import ctypes

import torch
import torch.nn.functional as F

CANDIDATES = 16
WORKSPACE_BYTES = 32 << 20
TIMING_REPEATS = 10

# cublasLt.h
_COMPUTE_32F = 68
_R_32F, _R_16BF, _R_16F = 0, 14, 2
_DESC_TRANSA, _DESC_EPILOGUE, _DESC_BIAS_POINTER = 3, 7, 8
_EPILOGUE_DEFAULT, _EPILOGUE_BIAS = 1, 4
_OP_T = 1
_PREF_MAX_WORKSPACE_BYTES = 1
_DATA_TYPES = {torch.bfloat16: _R_16BF, torch.float16: _R_16F}


class _Algo(ctypes.Structure):
    _fields_ = [("data", ctypes.c_uint64 * 8)]


class _Heuristic(ctypes.Structure):
    _fields_ = [
        ("algo", _Algo),
        ("workspace_size", ctypes.c_size_t),
        ("state", ctypes.c_int),
        ("waves", ctypes.c_float),
        ("reserved", ctypes.c_int * 4),
    ]


_lib = None
_handle = ctypes.c_void_p()
_workspaces: dict[int, torch.Tensor] = {}


def _library() -> ctypes.CDLL:
    """The libcublasLt torch loaded (one F.linear on the GPU loads it)."""
    global _lib
    if _lib is None:
        with open("/proc/self/maps") as maps:
            paths = [line.split()[-1] for line in maps if "libcublasLt.so" in line]
        _lib = ctypes.CDLL(paths[0] if paths else "libcublasLt.so")
        ptr, p, i, u64, size = (
            ctypes.c_void_p,
            ctypes.POINTER(ctypes.c_void_p),
            ctypes.c_int,
            ctypes.c_uint64,
            ctypes.c_size_t,
        )
        for name, args in {
            "cublasLtCreate": [p],
            "cublasLtMatmulDescCreate": [p, i, i],
            "cublasLtMatmulDescSetAttribute": [ptr, i, ptr, size],
            "cublasLtMatrixLayoutCreate": [p, i, u64, u64, ctypes.c_int64],
            "cublasLtMatmulPreferenceCreate": [p],
            "cublasLtMatmulPreferenceSetAttribute": [ptr, i, ptr, size],
            "cublasLtMatmulPreferenceDestroy": [ptr],
            "cublasLtMatmulAlgoGetHeuristic": [ptr, ptr, ptr, ptr, ptr, ptr, ptr, i, ptr, ptr],
            "cublasLtMatmul": [ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, size, ptr],
        }.items():
            getattr(_lib, name).argtypes = args
        _check(_lib.cublasLtCreate(ctypes.byref(_handle)), "cublasLtCreate")
    return _lib


def _check(status: int, what: str) -> None:
    if status != 0:
        raise RuntimeError(f"{what} failed with cuBLAS status {status}")


def _set(setter, obj, attribute: int, value) -> None:
    _check(setter(obj, attribute, ctypes.byref(value), ctypes.sizeof(value)), "setting a cuBLASLt attribute")


def _layout(dtype: int, rows: int, cols: int, ld: int) -> ctypes.c_void_p:
    layout = ctypes.c_void_p()
    _check(_library().cublasLtMatrixLayoutCreate(ctypes.byref(layout), dtype, ctypes.c_uint64(rows),
                                                 ctypes.c_uint64(cols), ctypes.c_int64(ld)), "cublasLtMatrixLayoutCreate")  # fmt: skip
    return layout


class _Plan:
    """Descriptors of out[M, N] = x[M, K] @ weight[N, K]^T (+ bias), in cuBLAS's column-major terms
    D[N, M] = op_T(A = weight as [K, N]) @ B (x as [K, M]), and its candidate algorithms."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, rows: int, x_stride: int):
        lib = _library()
        n, k = weight.shape
        dtype = _DATA_TYPES[weight.dtype]
        self.desc = ctypes.c_void_p()
        _check(lib.cublasLtMatmulDescCreate(ctypes.byref(self.desc), _COMPUTE_32F, _R_32F), "cublasLtMatmulDescCreate")
        _set(lib.cublasLtMatmulDescSetAttribute, self.desc, _DESC_TRANSA, ctypes.c_int32(_OP_T))
        epilogue = _EPILOGUE_BIAS if bias is not None else _EPILOGUE_DEFAULT
        _set(lib.cublasLtMatmulDescSetAttribute, self.desc, _DESC_EPILOGUE, ctypes.c_uint32(epilogue))
        if bias is not None:  # the heuristic reads its alignment
            _set(lib.cublasLtMatmulDescSetAttribute, self.desc, _DESC_BIAS_POINTER, ctypes.c_void_p(bias.data_ptr()))
        self.a = _layout(dtype, k, n, weight.stride(0))
        self.b = _layout(dtype, k, rows, x_stride)
        self.d = _layout(dtype, n, rows, n)
        preference = ctypes.c_void_p()
        _check(lib.cublasLtMatmulPreferenceCreate(ctypes.byref(preference)), "cublasLtMatmulPreferenceCreate")
        _set(lib.cublasLtMatmulPreferenceSetAttribute, preference, _PREF_MAX_WORKSPACE_BYTES,
             ctypes.c_uint64(WORKSPACE_BYTES))  # fmt: skip
        results = (_Heuristic * CANDIDATES)()
        found = ctypes.c_int()
        _check(lib.cublasLtMatmulAlgoGetHeuristic(_handle, self.desc, self.a, self.b, self.d, self.d, preference,
                                                  CANDIDATES, ctypes.byref(results), ctypes.byref(found)), "cublasLtMatmulAlgoGetHeuristic")  # fmt: skip
        lib.cublasLtMatmulPreferenceDestroy(preference)
        self.candidates = [results[i].algo for i in range(found.value) if results[i].state == 0]
        if not self.candidates:
            raise RuntimeError("cuBLASLt offers no algorithm for this product")
        self.algo = self.candidates[0]

    def run(self, x, weight, bias, algo=None) -> torch.Tensor:
        """The product with algo (default: the chosen one)."""
        lib = _library()
        out = torch.empty(x.shape[0], weight.shape[0], device=x.device, dtype=weight.dtype)
        if bias is not None:
            _set(lib.cublasLtMatmulDescSetAttribute, self.desc, _DESC_BIAS_POINTER, ctypes.c_void_p(bias.data_ptr()))
        workspace = _workspaces.get(x.device.index)
        if workspace is None:
            workspace = _workspaces[x.device.index] = torch.empty(WORKSPACE_BYTES, device=x.device, dtype=torch.uint8)
        one, zero = ctypes.c_float(1.0), ctypes.c_float(0.0)
        _check(lib.cublasLtMatmul(
            _handle, self.desc, ctypes.byref(one), ctypes.c_void_p(weight.data_ptr()), self.a,
            ctypes.c_void_p(x.data_ptr()), self.b, ctypes.byref(zero), ctypes.c_void_p(out.data_ptr()), self.d,
            ctypes.c_void_p(out.data_ptr()), self.d, ctypes.byref(algo or self.algo), ctypes.c_void_p(workspace.data_ptr()),
            ctypes.c_size_t(WORKSPACE_BYTES), ctypes.c_void_p(torch.cuda.current_stream(x.device).cuda_stream),
        ), "cublasLtMatmul")  # fmt: skip
        return out


def graph_time_us(fn, repeats: int = TIMING_REPEATS) -> float:
    """Microseconds per call of fn, timed as a CUDA graph of `repeats` calls (launched from Python,
    a small product would time the host)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
        graph = torch.cuda.CUDAGraph()
        graph.capture_begin()
        for _ in range(repeats):
            fn()
        graph.capture_end()
        graph.replay()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
    torch.cuda.current_stream().wait_stream(stream)
    return 1e3 * start.elapsed_time(end) / repeats


def time_candidates(plan: _Plan, x, weight, bias) -> list[float]:
    """Microseconds per call of each of the plan's candidates on these operands."""
    return [graph_time_us(lambda algo=algo: plan.run(x, weight, bias, algo)) for algo in plan.candidates]


_plans: dict[tuple, _Plan] = {}


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) for a 2-D CUDA x of the weight's dtype with unit stride in its last
    dim, on cuBLASLt with the fastest candidate for this shape (timed the first time it is seen)."""
    key = (x.shape[0], x.stride(0), *weight.shape, weight.stride(0), bias is not None, weight.dtype, x.device)
    plan = _plans.get(key)
    if plan is None:
        if torch.cuda.is_current_stream_capturing():
            return F.linear(x, weight, bias)  # no timing inside a capture
        plan = _plans[key] = _Plan(weight, bias, x.shape[0], x.stride(0))
        times = time_candidates(plan, x, weight, bias)
        plan.algo = plan.candidates[min(range(len(times)), key=times.__getitem__)]
    return plan.run(x, weight, bias)
