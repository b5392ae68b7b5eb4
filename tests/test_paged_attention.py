"""Paged attention: the reference against independent math and the model, the Triton kernels against the reference."""

import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch

import kernels.paged_attention as paged
from kernels.paged_attention import (
    PagedAttentionError,
    _default_partition_size,
    paged_attention,
    paged_attention_reference,
    paged_decode_attention_triton,
    paged_prefill_attention_triton,
    write_kv,
)
from model.decoder import causal_attention

# (query heads, kv heads): plain multi-head, group 2, group 4, and the real model's group 5.
HEAD_LAYOUTS = [(4, 4), (4, 2), (8, 2), (10, 2)]


@dataclass
class Batch:
    q: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    query_start_loc: torch.Tensor

    def args(self):
        return self.q, self.k_cache, self.v_cache, self.block_tables, self.seq_lens, self.query_start_loc


def random_batch(seq_lens, q_lens, heads, kv_heads, head_dim, block_size, dtype=torch.float32, seed=0) -> Batch:
    """Random cache (garbage in every unused slot), shuffled blocks, and random values in unused table entries."""
    gen = torch.Generator().manual_seed(seed)
    blocks_per_seq = [-(-length // block_size) for length in seq_lens]
    num_blocks = sum(blocks_per_seq) + 3
    max_blocks = max(blocks_per_seq) + 2
    block_ids = torch.randperm(num_blocks, generator=gen).tolist()
    block_tables = torch.randint(0, num_blocks, (len(seq_lens), max_blocks), generator=gen, dtype=torch.int32)
    for seq, count in enumerate(blocks_per_seq):
        block_tables[seq, :count] = torch.tensor([block_ids.pop() for _ in range(count)], dtype=torch.int32)
    cache_shape = (num_blocks, block_size, kv_heads, head_dim)
    starts = np.concatenate([[0], np.cumsum(q_lens)])
    return Batch(
        q=torch.randn(int(starts[-1]), heads, head_dim, generator=gen).to(dtype),
        k_cache=torch.randn(cache_shape, generator=gen).to(dtype),
        v_cache=torch.randn(cache_shape, generator=gen).to(dtype),
        block_tables=block_tables,
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        query_start_loc=torch.tensor(starts, dtype=torch.int32),
    )


def numpy_attention_per_query(batch: Batch) -> np.ndarray:
    """Each (query, head) on its own: walk the positions it sees, look each up in the block table, softmax."""
    q = batch.q.double().numpy()
    k_cache, v_cache = batch.k_cache.double().numpy(), batch.v_cache.double().numpy()
    block_size, kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = q.shape[1] // kv_heads
    out = np.zeros_like(q)
    starts = batch.query_start_loc.tolist()
    for seq, seq_len in enumerate(batch.seq_lens.tolist()):
        q_len = starts[seq + 1] - starts[seq]
        for j in range(q_len):
            position = seq_len - q_len + j
            for head in range(q.shape[1]):
                kv_head = head // group
                keys, values = [], []
                for p in range(position + 1):
                    block = batch.block_tables[seq, p // block_size].item()
                    keys.append(k_cache[block, p % block_size, kv_head])
                    values.append(v_cache[block, p % block_size, kv_head])
                scores = np.array(keys) @ q[starts[seq] + j, head] / math.sqrt(q.shape[2])
                weights = np.exp(scores - scores.max())
                out[starts[seq] + j, head] = weights @ np.array(values) / weights.sum()
    return out


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float) -> None:
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    torch.testing.assert_close(actual.float(), expected.float(), atol=atol, rtol=0)


@pytest.mark.parametrize("heads,kv_heads", HEAD_LAYOUTS)
def test_reference_matches_a_per_query_loop(heads, kv_heads):
    batch = random_batch([1, 7, 33, 50], [1, 3, 17, 1], heads, kv_heads, head_dim=32, block_size=16)
    out = paged_attention_reference(*batch.args())
    np.testing.assert_allclose(out.double().numpy(), numpy_attention_per_query(batch), atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (10, 2)])
def test_reference_equals_the_models_attention_bit_for_bit(dtype, heads, kv_heads):
    seq_len, q_len, head_dim, block_size = 45, 6, 32, 16
    gen = torch.Generator().manual_seed(1)
    keys = torch.randn(1, kv_heads, seq_len, head_dim, generator=gen).to(dtype)
    values = torch.randn(1, kv_heads, seq_len, head_dim, generator=gen).to(dtype)
    q = torch.randn(1, heads, q_len, head_dim, generator=gen).to(dtype)
    num_blocks = 6
    blocks = torch.tensor([4, 0, 5], dtype=torch.int32)
    k_cache = torch.zeros(num_blocks, block_size, kv_heads, head_dim, dtype=dtype)
    v_cache = torch.zeros_like(k_cache)
    positions = torch.arange(seq_len)
    slots = blocks.long()[positions // block_size] * block_size + positions % block_size
    write_kv(k_cache, v_cache, keys[0].transpose(0, 1), values[0].transpose(0, 1), slots)

    out = paged_attention_reference(
        q[0].transpose(0, 1),
        k_cache,
        v_cache,
        blocks[None],
        torch.tensor([seq_len], dtype=torch.int32),
        torch.tensor([0, q_len], dtype=torch.int32),
    )
    expected = causal_attention(q, keys, values, query_offset=seq_len - q_len)
    assert torch.equal(out, expected[0].transpose(0, 1))


def test_write_kv_puts_each_token_at_its_slot_and_nothing_else():
    num_blocks, block_size, kv_heads, head_dim, tokens = 5, 16, 2, 8, 23
    k_cache = torch.zeros(num_blocks, block_size, kv_heads, head_dim)
    v_cache = torch.zeros_like(k_cache)
    k, v = torch.randn(tokens, kv_heads, head_dim), torch.randn(tokens, kv_heads, head_dim)
    slots = torch.randperm(num_blocks * block_size)[:tokens]
    write_kv(k_cache, v_cache, k, v, slots)
    written = torch.zeros(num_blocks, block_size, dtype=torch.bool)
    for t, slot in enumerate(slots.tolist()):
        assert torch.equal(k_cache[slot // block_size, slot % block_size], k[t])
        assert torch.equal(v_cache[slot // block_size, slot % block_size], v[t])
        written[slot // block_size, slot % block_size] = True
    assert not k_cache[~written].any() and not v_cache[~written].any()


@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("heads,kv_heads", HEAD_LAYOUTS)
def test_triton_decode_matches_reference(heads, kv_heads, block_size):
    batch = random_batch([1, 7, 33, 50], [1, 1, 1, 1], heads, kv_heads, head_dim=32, block_size=block_size)
    out = paged_decode_attention_triton(*batch.args()[:5])
    assert_close(out, paged_attention_reference(*batch.args()), atol=1e-4)


@pytest.mark.parametrize("partition_size", [64, 128])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (10, 2)])
def test_triton_decode_split_over_key_partitions_matches_reference(heads, kv_heads, partition_size):
    batch = random_batch([1, 64, 65, 200], [1, 1, 1, 1], heads, kv_heads, head_dim=32, block_size=16)
    out = paged_decode_attention_triton(*batch.args()[:5], partition_size=partition_size)
    assert_close(out, paged_attention_reference(*batch.args()), atol=1e-4)


def test_triton_decode_splits_a_long_sequence_by_default_and_matches_reference():
    # One sequence over two kv heads is too few programs, so the keys are split without being asked.
    batch = random_batch([300], [1], 4, 2, head_dim=32, block_size=32)
    assert _default_partition_size(2, batch.block_tables.shape[1] * 32) < 300
    out = paged_decode_attention_triton(*batch.args()[:5])
    assert_close(out, paged_attention_reference(*batch.args()), atol=1e-4)


@pytest.mark.parametrize("head_dim", [64, 128])
def test_triton_decode_handles_model_head_sizes(head_dim):
    batch = random_batch([7, 40], [1, 1], 10, 2, head_dim=head_dim, block_size=16)
    out = paged_decode_attention_triton(*batch.args()[:5])
    assert_close(out, paged_attention_reference(*batch.args()), atol=1e-4)


@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("heads,kv_heads", HEAD_LAYOUTS)
def test_triton_prefill_matches_reference_on_mixed_query_lengths(heads, kv_heads, block_size):
    # Decode row, chunk after a cached prefix, chunk from scratch, chunk spanning several query tiles.
    batch = random_batch([9, 5, 50, 70], [1, 5, 17, 70], heads, kv_heads, head_dim=32, block_size=block_size)
    out = paged_prefill_attention_triton(*batch.args())
    assert_close(out, paged_attention_reference(*batch.args()), atol=1e-4)


def test_triton_prefill_handles_decode_only_batches():
    batch = random_batch([1, 7, 33, 50], [1, 1, 1, 1], 10, 2, head_dim=32, block_size=16)
    out = paged_prefill_attention_triton(*batch.args())
    assert_close(out, paged_attention_reference(*batch.args()), atol=1e-4)


@pytest.mark.parametrize("head_dim", [64, 128])
def test_triton_prefill_handles_model_head_sizes(head_dim):
    batch = random_batch([20, 33], [1, 13], 10, 2, head_dim=head_dim, block_size=32)
    out = paged_prefill_attention_triton(*batch.args())
    assert_close(out, paged_attention_reference(*batch.args()), atol=1e-4)


def test_triton_kernels_match_reference_in_float16():
    # The interpreter multiplies bfloat16 tiles wrongly (it stores them as uint16), so half precision is float16.
    decode = random_batch([7, 50], [1, 1], 10, 2, head_dim=64, block_size=16, dtype=torch.float16)
    mixed = random_batch([9, 50], [1, 17], 10, 2, head_dim=64, block_size=16, dtype=torch.float16)
    out = paged_decode_attention_triton(*decode.args()[:5], partition_size=64)
    assert_close(out, paged_attention_reference(*decode.args()), atol=2e-3)
    assert_close(paged_prefill_attention_triton(*mixed.args()), paged_attention_reference(*mixed.args()), atol=2e-3)


def test_dispatcher_sends_decode_batches_to_the_decode_kernel_and_others_to_prefill(monkeypatch):
    calls = []
    monkeypatch.setattr(paged, "paged_decode_attention_triton", lambda *a: calls.append("decode") or a[0])
    monkeypatch.setattr(paged, "paged_prefill_attention_triton", lambda *a: calls.append("prefill") or a[0])
    paged_attention(*random_batch([3, 9], [1, 1], 4, 2, 32, 16).args(), backend="triton")
    paged_attention(*random_batch([3, 9], [1, 4], 4, 2, 32, 16).args(), backend="triton")
    assert calls == ["decode", "prefill"]


def test_dispatcher_matches_reference_through_triton():
    batch = random_batch([9, 33], [1, 17], 10, 2, head_dim=32, block_size=16)
    out = paged_attention(*batch.args(), backend="triton")
    assert_close(out, paged_attention_reference(*batch.args()), atol=1e-4)


def test_dispatcher_uses_the_reference_on_cpu(monkeypatch):
    def no_triton(*args, **kwargs):
        raise AssertionError("Triton must not run for CPU tensors by default")

    monkeypatch.setattr(paged, "paged_decode_attention_triton", no_triton)
    monkeypatch.setattr(paged, "paged_prefill_attention_triton", no_triton)
    batch = random_batch([7, 33], [1, 5], 10, 2, head_dim=32, block_size=16)
    assert torch.equal(paged_attention(*batch.args()), paged_attention_reference(*batch.args()))


def test_unknown_or_unavailable_backends_are_refused():
    batch = random_batch([7], [1], 4, 2, head_dim=32, block_size=16)
    with pytest.raises(PagedAttentionError, match="unknown attention backend"):
        paged_attention(*batch.args(), backend="xformers")
    with pytest.raises(PagedAttentionError, match="flash_attn"):
        paged_attention(*batch.args(), backend="flash_attn")


def test_queries_longer_than_their_sequence_are_refused():
    batch = random_batch([7, 9], [1, 4], 4, 2, head_dim=32, block_size=16)
    batch.seq_lens[1] = 3
    with pytest.raises(PagedAttentionError, match="q_len"):
        paged_attention_reference(*batch.args())


def test_heads_not_divisible_by_kv_heads_are_refused():
    batch = random_batch([7], [1], 4, 2, head_dim=32, block_size=16)
    batch.q = torch.randn(1, 5, 32)
    with pytest.raises(PagedAttentionError, match="kv heads divide query heads"):
        paged_attention(*batch.args())


def test_int64_block_tables_are_refused():
    batch = random_batch([7], [1], 4, 2, head_dim=32, block_size=16)
    batch.block_tables = batch.block_tables.long()
    with pytest.raises(PagedAttentionError, match="block_tables must be a 2-d int32"):
        paged_attention(*batch.args())


def test_triton_on_cpu_tensors_without_the_interpreter_is_refused(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    batch = random_batch([7], [1], 4, 2, head_dim=32, block_size=16)
    with pytest.raises(PagedAttentionError, match="CUDA"):
        paged_attention(*batch.args(), backend="triton")


def test_triton_decode_refuses_more_than_one_query_per_sequence():
    batch = random_batch([7, 9], [1, 2], 4, 2, head_dim=32, block_size=16)
    with pytest.raises(PagedAttentionError, match="one query per sequence"):
        paged_decode_attention_triton(*batch.args()[:5])


def test_triton_kernels_accept_queries_sliced_from_a_fused_projection():
    batch = random_batch([9, 33], [1, 17], 4, 2, head_dim=32, block_size=16)
    fused = torch.cat([batch.q, torch.randn(batch.q.shape[0], 4, 32)], dim=1)  # q heads, then k and v heads
    decode = random_batch([9, 33], [1, 1], 4, 2, head_dim=32, block_size=16)
    fused_decode = torch.cat([decode.q, torch.randn(2, 4, 32)], dim=1)
    expected = paged_attention_reference(*batch.args())
    assert_close(paged_prefill_attention_triton(fused[:, :4], *batch.args()[1:]), expected, atol=1e-4)
    out = paged_decode_attention_triton(fused_decode[:, :4], *decode.args()[1:5])
    assert_close(out, paged_attention_reference(*decode.args()), atol=1e-4)
