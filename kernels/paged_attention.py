"""Paged attention over a block-table KV cache, for a continuous-batching engine.

Cache layout (flash-attn's paged layout), one pair per layer:
    k_cache, v_cache: [num_blocks, block_size, kv_heads, head_dim]
    block_tables: int32 [num_seqs, max_blocks_per_seq]; position p of sequence s lives in block
    block_tables[s, p // block_size] at offset p % block_size (its slot is block * block_size + offset).

A batch packs the new queries of every sequence: rows query_start_loc[s]:query_start_loc[s + 1] of q
(at least one per sequence) are the last q_len_s positions of sequence s, whose K/V, these tokens
included, are already in the cache; seq_lens[s] counts all its positions. Query j of sequence s sits at
position seq_lens[s] - q_len_s + j and sees keys 0..that position. Decode is q_len 1; chunked prefill
is q_len > 1 over a cached prefix. The softmax scale is always 1/sqrt(head_dim), like the model's.

Backends: "reference" (the model's own causal_attention on gathered K/V, so CPU results are
bit-identical to the model's generator), "triton" (a split-K decode kernel when every sequence has
one query, else a prefill/mixed kernel) and "flash_attn" (flash-attn 2's paged API).
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os

import torch

from kernels.dispatch import supports_pdl
from model.decoder import causal_attention

try:
    import triton
    import triton.language as tl

    from kernels.dispatch import await_predecessor
except ImportError:  # CPU installs run the reference only
    triton = None

BACKENDS = ("reference", "triton", "flash_attn")

_KEY_TILE = 64  # keys per inner-loop step; one step spans several cache blocks through the block table
_PREFILL_ROWS = 64  # (query, head) rows per prefill program
_MIN_DECODE_ROWS = 16  # tl.dot needs at least 16 rows
# split keys until a decode step has about _DECODE_PROGRAMS programs, partitions of _MIN_PARTITION keys at least.
# H100 decode step, ms, vs 128 / 512: 2 sequences at 300 positions 9.51 vs 9.59-9.61, at 1000 9.65 vs 9.67-9.69;
# 16 at 1000 10.89-10.90 vs 11.05-11.08; 4 and 64 within noise (backbone_partition_rule_h100_s24.json)
_MIN_PARTITION = 64
_DECODE_PROGRAMS = 256
DECODE_LAUNCH: dict = {}  # num_warps / num_stages of the decode kernel (bench/gpu_check.py --sweeps them)
PDL = True  # decode kernels launch as programmatic dependents of the previous kernel (Hopper), see dispatch.py


class PagedAttentionError(ValueError):
    """Inputs that do not describe a valid paged-attention batch."""


def write_kv(
    k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Stores new tokens' keys and values in the cache, in place.

    k_cache, v_cache: [num_blocks, block_size, kv_heads, head_dim]; k, v: [T, kv_heads, head_dim];
    slot_mapping: int64 [T], token t goes to slot block * block_size + offset.
    """
    if k.shape != v.shape or k.shape[1:] != k_cache.shape[2:] or k_cache.shape != v_cache.shape:
        raise PagedAttentionError(
            f"k {tuple(k.shape)} and v {tuple(v.shape)} must be [T, kv_heads, head_dim] matching caches "
            f"{tuple(k_cache.shape)} / {tuple(v_cache.shape)} of shape [num_blocks, block_size, kv_heads, head_dim]"
        )
    if slot_mapping.shape != (k.shape[0],) or slot_mapping.dtype != torch.int64:
        raise PagedAttentionError(
            f"slot_mapping must be int64 [{k.shape[0]}], got {slot_mapping.dtype} {tuple(slot_mapping.shape)}"
        )
    k_cache.view(-1, *k_cache.shape[2:])[slot_mapping] = k
    v_cache.view(-1, *v_cache.shape[2:])[slot_mapping] = v


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    backend: str | None = None,
) -> torch.Tensor:
    """Causal GQA attention of packed new queries over their sequences' paged K/V.

    q: [T, heads, head_dim]; k_cache, v_cache: [num_blocks, block_size, kv_heads, head_dim];
    block_tables: int32 [S, max_blocks_per_seq]; seq_lens: int32 [S]; query_start_loc: int32 [S + 1].
    Returns [T, heads, head_dim] in q's dtype. backend: one of BACKENDS, or None for the reference on
    CPU, flash-attn on CUDA where it supports the inputs, else Triton.
    """
    _check_shapes(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc)
    if backend is None:
        backend = _automatic_backend(q, k_cache)
    if backend == "reference":
        return paged_attention_reference(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc)
    if backend == "flash_attn":
        return _flash_attention(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc)
    if backend == "triton":
        # Every sequence has at least one query, so T == S means every q_len is 1.
        if q.shape[0] == seq_lens.shape[0]:
            return paged_decode_attention_triton(q, k_cache, v_cache, block_tables, seq_lens)
        return paged_prefill_attention_triton(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc)
    raise PagedAttentionError(f"unknown attention backend {backend!r}; expected one of {BACKENDS}")


def paged_attention_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
) -> torch.Tensor:
    """The model's causal_attention, one sequence at a time, on K/V gathered into contiguous tensors.

    Shapes as paged_attention: q [T, heads, d], caches [num_blocks, block_size, kv_heads, d],
    block_tables int32 [S, max_blocks], seq_lens int32 [S], query_start_loc int32 [S + 1] -> [T, heads, d].
    """
    _check_shapes(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc)
    starts = query_start_loc.tolist()
    lengths = seq_lens.tolist()
    _check_lengths(starts, lengths, q.shape[0], block_tables.shape[1] * k_cache.shape[1])
    block_size = k_cache.shape[1]
    out = torch.empty_like(q)
    for seq, seq_len in enumerate(lengths):
        start, end = starts[seq], starts[seq + 1]
        blocks = block_tables[seq, : -(-seq_len // block_size)].long()
        keys = _gather_sequence(k_cache, blocks, seq_len)
        values = _gather_sequence(v_cache, blocks, seq_len)
        queries = q[start:end].transpose(0, 1).unsqueeze(0)
        attended = causal_attention(queries, keys, values, query_offset=seq_len - (end - start))
        out[start:end] = attended[0].transpose(0, 1)
    return out


def _gather_sequence(cache: torch.Tensor, blocks: torch.Tensor, seq_len: int) -> torch.Tensor:
    """cache: [num_blocks, block_size, kv_heads, d]; blocks: [n] -> contiguous [1, kv_heads, seq_len, d]."""
    tokens = cache[blocks].flatten(0, 1)[:seq_len]
    # One plain contiguous copy per sequence: the layout the bit-for-bit check against the model uses.
    return tokens.transpose(0, 1).unsqueeze(0).contiguous()


def _check_shapes(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc=None) -> None:
    """Checks what needs no device sync: ranks, sizes, dtypes, devices. No query_start_loc: one query per sequence."""
    if q.dim() != 3 or k_cache.dim() != 4:
        raise PagedAttentionError(
            f"q must be [T, heads, head_dim] and k_cache [num_blocks, block_size, kv_heads, head_dim], "
            f"got {tuple(q.shape)} and {tuple(k_cache.shape)}"
        )
    if v_cache.shape != k_cache.shape or v_cache.stride() != k_cache.stride():
        raise PagedAttentionError(
            f"v_cache {tuple(v_cache.shape)} must have k_cache's shape {tuple(k_cache.shape)} and layout"
        )
    heads, head_dim = q.shape[1:]
    kv_heads = k_cache.shape[2]
    if k_cache.shape[3] != head_dim or heads % kv_heads:
        raise PagedAttentionError(
            f"q has {heads} heads of size {head_dim}, the cache {kv_heads} kv heads of size {k_cache.shape[3]}: "
            "head sizes must match and kv heads divide query heads"
        )
    if not (q.dtype == k_cache.dtype == v_cache.dtype):
        raise PagedAttentionError(
            f"q, k_cache and v_cache must share a dtype, got {q.dtype}, {k_cache.dtype}, {v_cache.dtype}"
        )
    indices = {"block_tables": (block_tables, 2), "seq_lens": (seq_lens, 1)}
    if query_start_loc is not None:
        indices["query_start_loc"] = (query_start_loc, 1)
    for name, (tensor, rank) in indices.items():
        if tensor.dtype != torch.int32 or tensor.dim() != rank:
            raise PagedAttentionError(
                f"{name} must be a {rank}-d int32 tensor, got {tensor.dtype} {tuple(tensor.shape)}"
            )
    num_seqs = seq_lens.shape[0]
    if block_tables.shape[0] != num_seqs:
        raise PagedAttentionError(
            f"{num_seqs} sequences need block_tables [{num_seqs}, max_blocks], got {tuple(block_tables.shape)}"
        )
    if query_start_loc is None and q.shape[0] != num_seqs:
        raise PagedAttentionError(f"decode needs one query per sequence: {num_seqs} sequences, q {tuple(q.shape)}")
    if query_start_loc is not None and query_start_loc.shape[0] != num_seqs + 1:
        raise PagedAttentionError(
            f"{num_seqs} sequences need query_start_loc [{num_seqs + 1}], got {tuple(query_start_loc.shape)}"
        )
    tensors = (q, k_cache, v_cache, block_tables, seq_lens) + (() if query_start_loc is None else (query_start_loc,))
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise PagedAttentionError(f"all tensors must be on one device, got {sorted(map(str, devices))}")


def _check_lengths(starts: list[int], lengths: list[int], num_tokens: int, max_keys: int) -> None:
    """Checks query_start_loc and seq_lens values (host lists) against the batch and block tables."""
    if starts[0] != 0 or starts[-1] != num_tokens:
        raise PagedAttentionError(f"query_start_loc must run from 0 to {num_tokens} (rows of q), got {starts}")
    for seq, seq_len in enumerate(lengths):
        q_len = starts[seq + 1] - starts[seq]
        if not 1 <= q_len <= seq_len <= max_keys:
            raise PagedAttentionError(
                f"sequence {seq}: needs 1 <= q_len ({q_len}) <= seq_len ({seq_len}) <= "
                f"block table capacity ({max_keys} positions)"
            )


def _automatic_backend(q: torch.Tensor, k_cache: torch.Tensor) -> str:
    if not q.is_cuda:
        return "reference"
    if _flash_attn_unsupported_reason(q, k_cache) is None:
        return "flash_attn"
    return "triton"


def _flash_attn_unsupported_reason(q: torch.Tensor, k_cache: torch.Tensor) -> str | None:
    if not q.is_cuda:
        return "flash-attn needs CUDA tensors"
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"flash-attn needs float16 or bfloat16, got {q.dtype}"
    if k_cache.shape[1] % 256:
        return f"flash-attn 2's paged cache needs block_size a multiple of 256, got {k_cache.shape[1]}"
    if q.shape[-1] > 256:
        return f"flash-attn supports head_dim up to 256, got {q.shape[-1]}"
    if not _flash_attn_installed():
        return "flash_attn is not installed"
    return None


@functools.cache
def _flash_attn_installed() -> bool:  # asked for every layer of an eager step: look it up once
    return importlib.util.find_spec("flash_attn") is not None


def _flash_attention(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc) -> torch.Tensor:
    """flash-attn 2's paged kernels; shapes as paged_attention. Its causal mask is bottom-right aligned."""
    reason = _flash_attn_unsupported_reason(q, k_cache)
    if reason is not None:
        raise PagedAttentionError(f"backend 'flash_attn' unavailable: {reason}")
    from flash_attn import flash_attn_varlen_func, flash_attn_with_kvcache

    if q.shape[0] == seq_lens.shape[0]:  # decode: no host sync, so it can be graph-captured
        out = flash_attn_with_kvcache(
            q.unsqueeze(1), k_cache, v_cache, cache_seqlens=seq_lens, block_table=block_tables, causal=True
        )
        return out.squeeze(1)
    cu_seqlens_k = torch.nn.functional.pad(seq_lens.cumsum(0, dtype=torch.int32), (1, 0))
    return flash_attn_varlen_func(
        q,
        k_cache,
        v_cache,
        cu_seqlens_q=query_start_loc,
        cu_seqlens_k=cu_seqlens_k,
        max_seqlen_q=int(query_start_loc.diff().max()),
        max_seqlen_k=int(seq_lens.max()),
        causal=True,
        block_table=block_tables,
    )


def paged_decode_attention_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    partition_size: int | None = None,
) -> torch.Tensor:
    """Decode attention (one query per sequence, the last position) with the Triton kernels.

    q: [S, heads, d]; k_cache, v_cache: [num_blocks, block_size, kv_heads, d]; block_tables: int32
    [S, max_blocks]; seq_lens: int32 [S] -> [S, heads, d]. partition_size: keys per split-K program,
    a multiple of 64; by default picked from the shapes alone, so no host sync (graph-capturable).
    """
    _check_shapes(q, k_cache, v_cache, block_tables, seq_lens)
    _check_triton_inputs(q, k_cache, block_tables, seq_lens)
    num_seqs, heads, head_dim = q.shape
    kv_heads = k_cache.shape[2]
    max_keys = block_tables.shape[1] * k_cache.shape[1]
    if partition_size is None:
        partition_size = _default_partition_size(num_seqs * kv_heads, max_keys)
    elif partition_size <= 0 or partition_size % _KEY_TILE:
        raise PagedAttentionError(f"partition_size must be a positive multiple of {_KEY_TILE}, got {partition_size}")
    num_partitions = -(-max_keys // partition_size)
    split = num_partitions > 1
    q = q.contiguous()  # out = empty_like(q) then shares q's strides
    out = torch.empty_like(q)
    if split:
        partial_out = torch.empty(num_seqs, heads, num_partitions, head_dim, device=q.device, dtype=torch.float32)
        partial_max = torch.empty(num_seqs, heads, num_partitions, device=q.device, dtype=torch.float32)
        partial_sum = torch.empty_like(partial_max)
    else:  # the kernel writes `out` directly and never touches the partial buffers
        partial_out = partial_max = partial_sum = out
    group = heads // kv_heads
    pdl = PDL and supports_pdl(q)
    _decode_kernel[(num_seqs, kv_heads, num_partitions)](
        q, k_cache, v_cache, out, partial_out, partial_max, partial_sum,
        block_tables, seq_lens, 1.0 / math.sqrt(head_dim), partition_size, num_partitions,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        GROUP=group, ROWS=max(_MIN_DECODE_ROWS, triton.next_power_of_2(group)), HEAD_DIM=head_dim,
        BLOCK_SIZE=k_cache.shape[1], KEY_TILE=_KEY_TILE, SPLIT=split, DOT_PRECISION=_dot_precision(q),
        PDL=pdl, launch_pdl=pdl, **DECODE_LAUNCH,
    )  # fmt: skip
    if split:
        _reduce_partitions_kernel[(num_seqs, heads)](
            partial_out, partial_max, partial_sum, out, seq_lens, partition_size, num_partitions,
            out.stride(0), out.stride(1),
            HEAD_DIM=head_dim, PARTITIONS=triton.next_power_of_2(num_partitions), PDL=pdl, launch_pdl=pdl,
        )  # fmt: skip
    return out


def paged_prefill_attention_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
) -> torch.Tensor:
    """Causal attention for any mix of q_lens (chunked prefill and decode rows) with the Triton kernel.

    Shapes as paged_attention: q [T, heads, d], caches [num_blocks, block_size, kv_heads, d],
    block_tables int32 [S, max_blocks], seq_lens int32 [S], query_start_loc int32 [S + 1] -> [T, heads, d].
    Reads the longest q_len back to the host to size the grid.
    """
    _check_shapes(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc)
    _check_triton_inputs(q, k_cache, block_tables, seq_lens, query_start_loc)
    num_seqs = seq_lens.shape[0]
    heads, head_dim = q.shape[1:]
    kv_heads = k_cache.shape[2]
    group = heads // kv_heads
    rows = max(_PREFILL_ROWS, triton.next_power_of_2(group))
    queries_per_tile = rows // group
    max_q_len = int(query_start_loc.diff().max())
    q = q.contiguous()  # out = empty_like(q) then shares q's strides
    out = torch.empty_like(q)
    _prefill_kernel[(num_seqs, kv_heads, -(-max_q_len // queries_per_tile))](
        q, k_cache, v_cache, out, block_tables, seq_lens, query_start_loc, 1.0 / math.sqrt(head_dim),
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        GROUP=group, QUERIES_PER_TILE=queries_per_tile, ROWS=rows, HEAD_DIM=head_dim,
        BLOCK_SIZE=k_cache.shape[1], KEY_TILE=_KEY_TILE, DOT_PRECISION=_dot_precision(q),
    )  # fmt: skip
    return out


def _check_triton_inputs(q: torch.Tensor, k_cache: torch.Tensor, *index_tensors: torch.Tensor) -> None:
    """The kernels take row strides but assume unit stride in the last dim (q is made contiguous)."""
    if triton is None:
        raise PagedAttentionError("backend 'triton' needs the triton package")
    if not q.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise PagedAttentionError("backend 'triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tests)")
    head_dim = q.shape[-1]
    if head_dim < 16 or head_dim & (head_dim - 1):
        raise PagedAttentionError(f"the Triton kernels need head_dim a power of two >= 16, got {head_dim}")
    if k_cache.stride(-1) != 1 or any(t.stride(-1) != 1 for t in index_tensors):
        raise PagedAttentionError(
            "the Triton kernels need the caches contiguous along head_dim and the index tensors along their last dim"
        )


def _default_partition_size(programs_per_partition: int, max_keys: int) -> int:
    """Splits keys until there are about _DECODE_PROGRAMS programs, in powers of two (few recompiles)."""
    partitions_wanted = -(-_DECODE_PROGRAMS // programs_per_partition)
    keys_per_partition = -(-max_keys // partitions_wanted)
    return max(_MIN_PARTITION, 1 << (keys_per_partition - 1).bit_length())


def _dot_precision(q: torch.Tensor) -> str:
    # float32 inputs would otherwise be rounded to tf32 on tensor cores.
    return "ieee" if q.dtype == torch.float32 else "tf32"


if triton is not None:

    @triton.jit
    def _kv_tile_offsets(
        table_row_ptr, keys, key_ok, kv_head, cache_stride_b, cache_stride_t, cache_stride_h, BLOCK_SIZE: tl.constexpr
    ):
        """Offsets of keys' [head_dim] rows of one kv head in the cache, looked up in the block table."""
        blocks = tl.load(table_row_ptr + keys // BLOCK_SIZE, mask=key_ok, other=0).to(tl.int64)
        return blocks * cache_stride_b + (keys % BLOCK_SIZE) * cache_stride_t + kv_head * cache_stride_h

    @triton.jit
    def _online_softmax_step(q, k, v, visible, row_max, row_sum, acc, scale, DOT_PRECISION: tl.constexpr):
        """Folds one key tile into the running max, sum and unnormalised output (float32) of each row.

        Every row must see at least one key in the first tile it folds, else its max stays -inf (NaN).
        """
        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale
        scores = tl.where(visible, scores, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(scores, 1))
        probs = tl.exp(scores - new_max[:, None])
        rescale = tl.exp(row_max - new_max)
        row_sum = row_sum * rescale + tl.sum(probs, 1)
        acc = acc * rescale[:, None] + tl.dot(probs.to(v.dtype), v, input_precision=DOT_PRECISION)
        return new_max, row_sum, acc

    @triton.jit
    def _decode_kernel(
        q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, partial_out_ptr, partial_max_ptr, partial_sum_ptr,
        block_tables_ptr, seq_lens_ptr, scale, partition_size, num_partitions,
        q_stride_t, q_stride_h, cache_stride_b, cache_stride_t, cache_stride_h, table_stride,
        GROUP: tl.constexpr, ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
        KEY_TILE: tl.constexpr, SPLIT: tl.constexpr, DOT_PRECISION: tl.constexpr, PDL: tl.constexpr,
    ):  # fmt: skip
        """One program per (sequence, kv head, key partition): all query heads of the group as rows."""
        await_predecessor(PDL)
        seq = tl.program_id(0)
        kv_head = tl.program_id(1)
        partition = tl.program_id(2)
        seq_len = tl.load(seq_lens_ptr + seq)
        key_begin = partition * partition_size
        if key_begin >= seq_len:  # a partition past this sequence's end
            return
        key_end = tl.minimum(seq_len, key_begin + partition_size)

        rows = tl.arange(0, ROWS)
        dims = tl.arange(0, HEAD_DIM)
        heads = kv_head * GROUP + rows
        row_ok = rows < GROUP  # the group is padded to ROWS rows of zeros
        q_offsets = seq * q_stride_t + heads[:, None] * q_stride_h + dims[None, :]
        q = tl.load(q_ptr + q_offsets, mask=row_ok[:, None], other=0.0)

        row_max = tl.full([ROWS], float("-inf"), tl.float32)
        row_sum = tl.zeros([ROWS], tl.float32)
        acc = tl.zeros([ROWS, HEAD_DIM], tl.float32)
        table_row_ptr = block_tables_ptr + seq * table_stride
        for tile_begin in range(key_begin, key_end, KEY_TILE):
            keys = tile_begin + tl.arange(0, KEY_TILE)
            key_ok = keys < key_end
            offsets = _kv_tile_offsets(
                table_row_ptr, keys, key_ok, kv_head, cache_stride_b, cache_stride_t, cache_stride_h, BLOCK_SIZE
            )
            k = tl.load(k_cache_ptr + offsets[:, None] + dims[None, :], mask=key_ok[:, None], other=0.0)
            v = tl.load(v_cache_ptr + offsets[:, None] + dims[None, :], mask=key_ok[:, None], other=0.0)
            # The query is the last position, so every stored key is visible.
            row_max, row_sum, acc = _online_softmax_step(
                q, k, v, key_ok[None, :], row_max, row_sum, acc, scale, DOT_PRECISION
            )

        if SPLIT:
            slots = (seq * tl.num_programs(1) * GROUP + heads) * num_partitions + partition
            tl.store(partial_max_ptr + slots, row_max, mask=row_ok)
            tl.store(partial_sum_ptr + slots, row_sum, mask=row_ok)
            tl.store(partial_out_ptr + slots[:, None] * HEAD_DIM + dims[None, :], acc, mask=row_ok[:, None])
        else:
            out = acc / row_sum[:, None]
            tl.store(out_ptr + q_offsets, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])

    @triton.jit
    def _reduce_partitions_kernel(
        partial_out_ptr, partial_max_ptr, partial_sum_ptr, out_ptr, seq_lens_ptr, partition_size, num_partitions,
        out_stride_t, out_stride_h, HEAD_DIM: tl.constexpr, PARTITIONS: tl.constexpr, PDL: tl.constexpr,
    ):  # fmt: skip
        """One program per (sequence, query head): merges its partitions' softmax pieces."""
        await_predecessor(PDL)
        seq = tl.program_id(0)
        head = tl.program_id(1)
        seq_len = tl.load(seq_lens_ptr + seq)
        partitions = tl.arange(0, PARTITIONS)
        used = partitions < tl.cdiv(seq_len, partition_size)
        slots = (seq * tl.num_programs(1) + head) * num_partitions + partitions
        part_max = tl.load(partial_max_ptr + slots, mask=used, other=float("-inf"))
        part_sum = tl.load(partial_sum_ptr + slots, mask=used, other=0.0)
        dims = tl.arange(0, HEAD_DIM)
        part_out = tl.load(partial_out_ptr + slots[:, None] * HEAD_DIM + dims[None, :], mask=used[:, None], other=0.0)
        weight = tl.exp(part_max - tl.max(part_max, 0))  # unused partitions weigh exp(-inf) = 0
        out = tl.sum(part_out * weight[:, None], 0) / tl.sum(part_sum * weight, 0)
        tl.store(out_ptr + seq * out_stride_t + head * out_stride_h + dims, out.to(out_ptr.dtype.element_ty))

    @triton.jit
    def _prefill_kernel(
        q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, block_tables_ptr, seq_lens_ptr, query_start_loc_ptr, scale,
        q_stride_t, q_stride_h, cache_stride_b, cache_stride_t, cache_stride_h, table_stride,
        GROUP: tl.constexpr, QUERIES_PER_TILE: tl.constexpr, ROWS: tl.constexpr, HEAD_DIM: tl.constexpr,
        BLOCK_SIZE: tl.constexpr, KEY_TILE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ):  # fmt: skip
        """One program per (sequence, kv head, tile of queries); row r is query r // GROUP, head r % GROUP."""
        seq = tl.program_id(0)
        kv_head = tl.program_id(1)
        first_query = tl.program_id(2) * QUERIES_PER_TILE
        q_begin = tl.load(query_start_loc_ptr + seq)
        q_len = tl.load(query_start_loc_ptr + seq + 1) - q_begin
        if first_query >= q_len:  # the grid is sized for the longest q_len
            return
        seq_len = tl.load(seq_lens_ptr + seq)
        context_len = seq_len - q_len

        rows = tl.arange(0, ROWS)
        dims = tl.arange(0, HEAD_DIM)
        query = first_query + rows // GROUP
        heads = kv_head * GROUP + rows % GROUP
        row_ok = (rows < QUERIES_PER_TILE * GROUP) & (query < q_len)
        q_offsets = (q_begin + query)[:, None] * q_stride_t + heads[:, None] * q_stride_h + dims[None, :]
        q = tl.load(q_ptr + q_offsets, mask=row_ok[:, None], other=0.0)
        query_pos = context_len + query

        row_max = tl.full([ROWS], float("-inf"), tl.float32)
        row_sum = tl.zeros([ROWS], tl.float32)
        acc = tl.zeros([ROWS, HEAD_DIM], tl.float32)
        table_row_ptr = block_tables_ptr + seq * table_stride
        # No query of this tile sees past its last one; every row (padding too) sees key 0.
        key_end = tl.minimum(seq_len, context_len + first_query + QUERIES_PER_TILE)
        for tile_begin in range(0, key_end, KEY_TILE):
            keys = tile_begin + tl.arange(0, KEY_TILE)
            key_ok = keys < key_end
            offsets = _kv_tile_offsets(
                table_row_ptr, keys, key_ok, kv_head, cache_stride_b, cache_stride_t, cache_stride_h, BLOCK_SIZE
            )
            k = tl.load(k_cache_ptr + offsets[:, None] + dims[None, :], mask=key_ok[:, None], other=0.0)
            v = tl.load(v_cache_ptr + offsets[:, None] + dims[None, :], mask=key_ok[:, None], other=0.0)
            visible = (keys[None, :] <= query_pos[:, None]) & key_ok[None, :]
            row_max, row_sum, acc = _online_softmax_step(q, k, v, visible, row_max, row_sum, acc, scale, DOT_PRECISION)

        out = acc / row_sum[:, None]
        tl.store(out_ptr + q_offsets, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])
