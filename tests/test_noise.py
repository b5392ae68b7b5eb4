"""Counter-based noise: Philox4x32-10 and Box-Muller exactly as Triton's random functions.

Run as a script (`python tests/test_noise.py IN OUT`) this file is the Triton side of the
comparison: it computes the reference numbers with TRITON_INTERPRET=1 in its own process,
so the interpreter setting never leaks into other tests' kernels.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from model.noise import (
    NoiseError,
    pair_uniform_to_normal,
    philox4x32,
    posterior_noise,
    token_noise,
    uint32_to_uniform,
)

MASK = 0xFFFFFFFF
REPO_ROOT = Path(__file__).resolve().parents[1]
TRITON_SEEDS = (0, 1, 2**32 + 7, 2**63 + 12345, 2**64 - 1)
TRITON_BLOCKS = 256
# (image, token, step) counters for the in-kernel comparison, including the largest allowed.
TRITON_TOKEN_COUNTERS = ((0, 0, 0), (5, 7, 3), (2**32 - 2, 2**32 - 1, 2**32 - 1))


# ---- independent references ------------------------------------------------------------


def philox_reference(counter: list[int], key: list[int], rounds: int = 10) -> list[int]:
    """Philox4x32 on Python ints, in the Random123 formulation (full products, then split)."""
    c, k = list(counter), list(key)
    for _ in range(rounds):
        product_a = 0xD2511F53 * c[0]
        product_b = 0xCD9E8D57 * c[2]
        c = [(product_b >> 32) ^ c[1] ^ k[0], product_b & MASK, (product_a >> 32) ^ c[3] ^ k[1], product_a & MASK]
        k = [(k[0] + 0x9E3779B9) & MASK, (k[1] + 0xBB67AE85) & MASK]
    return c


def normals_reference(words: list[int]) -> np.ndarray:
    """Four float32 normals from four uint32 words, written out in numpy."""
    signed = np.array(words, dtype=np.uint32).view(np.int32).astype(np.int64)
    folded = np.where(signed < 0, -signed - 1, signed)
    uniform = folded.astype(np.float32) * np.float32(4.6566127342e-10)
    out = []
    for a, b in ((uniform[0], uniform[1]), (uniform[2], uniform[3])):
        radius = np.sqrt(np.float32(-2.0) * np.log(np.maximum(np.float32(1e-7), a)))
        angle = np.float32(6.283185307179586) * b
        out += [radius * np.cos(angle), radius * np.sin(angle)]
    return np.array(out, dtype=np.float32)


def seed_key(seed: int) -> list[int]:
    return [seed & MASK, seed >> 32]


def as_int64(value: int) -> int:
    """A uint64 as the int64 with the same bits."""
    return value - 2**64 if value >= 2**63 else value


def ints(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64)


# ---- Philox ------------------------------------------------------------------------------


def test_philox_matches_random123_known_answer_vectors():
    cases = [
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((MASK,) * 4, (MASK, MASK), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        (
            (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
            (0xA4093822, 0x299F31D0),
            (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
        ),
    ]
    for counter, key, expected in cases:
        words = philox4x32(*(ints([v]) for v in counter), *(ints([v]) for v in key))
        assert tuple(int(w) for w in words) == expected


def test_philox_matches_plain_python_integers_on_random_counters():
    gen = torch.Generator().manual_seed(0)
    values = torch.randint(0, 2**32, (6, 200), generator=gen, dtype=torch.int64)
    values[:, 0], values[:, 1] = 0, MASK  # the extremes of every word
    words = torch.stack(philox4x32(*values))
    for i in range(values.shape[1]):
        counter = [int(v) for v in values[:4, i]]
        key = [int(v) for v in values[4:, i]]
        assert [int(w) for w in words[:, i]] == philox_reference(counter, key)


def test_philox_round_count_is_honoured():
    counter, key = [1, 2, 3, 4], [5, 6]
    words = philox4x32(*(ints([v]) for v in counter + key), rounds=7)
    assert [int(w) for w in words] == philox_reference(counter, key, rounds=7)


def test_uniform_conversion_folds_the_sign_and_stays_below_one():
    words = ints([0, 1, 2**31 - 1, 2**31, 2**32 - 1, 123456789, 3000000000])
    got = uint32_to_uniform(words).numpy()
    signed = [w - 2**32 if w >= 2**31 else w for w in words.tolist()]
    expected = [np.float32(-s - 1 if s < 0 else s) * np.float32(4.6566127342e-10) for s in signed]
    np.testing.assert_array_equal(got, np.array(expected, dtype=np.float32))
    assert got.dtype == np.float32 and got.min() >= 0.0 and got.max() < 1.0


def test_box_muller_clamps_tiny_uniforms_to_1e_minus_7():
    u1 = np.array([0.0, 1e-9, 5e-7, 0.25, 0.5, 0.9999999], dtype=np.float32)
    u2 = np.array([0.0, 0.1, 0.3, 0.5, 0.75, 0.999], dtype=np.float32)
    n1, n2 = pair_uniform_to_normal(torch.from_numpy(u1), torch.from_numpy(u2))
    radius = np.sqrt(-2.0 * np.log(np.maximum(u1.astype(np.float64), 1e-7)))
    np.testing.assert_allclose(n1.numpy(), radius * np.cos(2 * np.pi * u2), rtol=0, atol=2e-6)
    np.testing.assert_allclose(n2.numpy(), radius * np.sin(2 * np.pi * u2), rtol=0, atol=2e-6)
    assert n1.dtype == n2.dtype == torch.float32


# ---- token noise ---------------------------------------------------------------------------


def test_token_noise_element_4j_plus_m_is_normal_m_of_counter_j():
    seed, image, token, step = 2**40 + 99, 3, 17, 5
    row = token_noise(seed, image, token, step, dim=16)
    assert row.shape == (1, 16) and row.dtype == torch.float32
    for j in range(4):
        words = philox_reference([j, token, step, image], seed_key(seed))
        np.testing.assert_allclose(row[0, 4 * j : 4 * j + 4].numpy(), normals_reference(words), rtol=0, atol=1e-6)


def test_token_noise_is_bitwise_repeatable():
    first = token_noise(ints([7, 8]), ints([0, 1]), ints([2, 3]), ints([4, 5]))
    second = token_noise(ints([7, 8]), ints([0, 1]), ints([2, 3]), ints([4, 5]))
    assert torch.equal(first, second)


def test_token_noise_changes_with_each_of_seed_image_token_and_step():
    base = dict(seed=11, image_index=2, token_index=30, step=4)
    reference = token_noise(**base)
    for name in base:
        changed = token_noise(**{**base, name: base[name] + 1})
        assert not torch.equal(changed, reference), name
        assert (changed - reference).abs().max() > 0.1, name


def test_batched_rows_equal_rows_computed_alone():
    gen = torch.Generator().manual_seed(1)
    seeds = torch.randint(-(2**63), 2**63 - 1, (9,), generator=gen, dtype=torch.int64)
    images = torch.randint(0, 4, (9,), generator=gen)
    tokens = torch.randint(0, 1024, (9,), generator=gen)
    steps = torch.randint(0, 51, (9,), generator=gen)
    batch = token_noise(seeds, images, tokens, steps)
    assert batch.shape == (9, 64)
    for b in range(9):
        alone = token_noise(seeds[b : b + 1], int(images[b]), int(tokens[b]), int(steps[b]))
        assert torch.equal(batch[b], alone[0])


def test_scalar_arguments_broadcast_against_tensor_ones():
    tokens = ints([0, 5, 9])
    batch = token_noise(42, 1, tokens, 2, dim=8)
    assert batch.shape == (3, 8)
    for b, token in enumerate(tokens.tolist()):
        assert torch.equal(batch[b], token_noise(42, 1, token, 2, dim=8)[0])


def test_seed_above_2_pow_63_as_int_equals_its_int64_bit_pattern():
    seed = 2**64 - 3
    assert torch.equal(token_noise(seed, 0, 0, 1), token_noise(ints([as_int64(seed)]), 0, 0, 1))


def test_token_noise_has_standard_normal_statistics():
    noise = token_noise(1234, 0, torch.arange(512), 1).flatten().double()
    assert abs(noise.mean().item()) < 0.03
    assert abs(noise.std().item() - 1.0) < 0.02
    assert abs((noise.abs() < 1.0).double().mean().item() - 0.6827) < 0.01
    pairs = noise.reshape(-1, 2)  # the two halves of one Box-Muller pair are independent
    assert abs(torch.corrcoef(pairs.T)[0, 1].item()) < 0.03


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(seed=-1), "seed"),
        (dict(seed=2**64), "seed"),
        (dict(seed=1.5), "seed"),
        (dict(image_index=2**32 - 1), "image_index"),
        (dict(token_index=-1), "token_index"),
        (dict(step=2**32), "step"),
        (dict(step=torch.tensor([0.0, 1.0])), "step"),
        (dict(token_index=ints([[1, 2]])), "token_index"),
        (dict(dim=62), "dim"),
    ],
)
def test_token_noise_rejects_out_of_range_inputs(kwargs, message):
    args = dict(seed=1, image_index=0, token_index=0, step=0) | kwargs
    with pytest.raises(NoiseError, match=message):
        token_noise(**args)


def test_tensor_index_out_of_range_is_rejected():
    with pytest.raises(NoiseError, match="token_index"):
        token_noise(1, 0, ints([3, 2**32]), 0)


def test_mismatched_batch_sizes_are_rejected():
    with pytest.raises(NoiseError, match="broadcast"):
        token_noise(1, ints([0, 1]), ints([0, 1, 2]), 0)


# ---- posterior noise ---------------------------------------------------------------------


def test_posterior_noise_uses_the_reserved_image_counter():
    seed = 77
    noise = posterior_noise(seed, 10)
    assert noise.shape == (10,) and noise.dtype == torch.float32
    expected = np.concatenate([normals_reference(philox_reference([b, 0, 0, MASK], seed_key(seed))) for b in range(3)])
    np.testing.assert_allclose(noise.numpy(), expected[:10], rtol=0, atol=1e-6)


def test_posterior_noise_depends_on_the_seed_only():
    assert torch.equal(posterior_noise(5, 4096)[:1001], posterior_noise(5, 1001))
    assert not torch.equal(posterior_noise(5, 64), posterior_noise(6, 64))
    assert not torch.equal(posterior_noise(5, 64), token_noise(5, 0, 0, 0)[0])


def test_posterior_noise_rejects_bad_arguments():
    with pytest.raises(NoiseError, match="numel"):
        posterior_noise(1, -1)
    with pytest.raises(NoiseError, match="one seed"):
        posterior_noise(ints([1, 2]), 8)


# ---- against Triton itself ---------------------------------------------------------------


@pytest.fixture(scope="module")
def triton_reference(tmp_path_factory):
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    folder = tmp_path_factory.mktemp("triton_noise")
    gen = torch.Generator().manual_seed(2)
    counters = torch.randint(0, 2**32, (4, TRITON_BLOCKS), generator=gen, dtype=torch.int64)
    counters[:, 0], counters[:, 1] = 0, MASK
    torch.save({"counters": counters}, folder / "in.pt")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(REPO_ROOT))
    result = subprocess.run(
        [sys.executable, __file__, str(folder / "in.pt"), str(folder / "out.pt")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return counters, torch.load(folder / "out.pt")


def test_philox_words_match_triton(triton_reference):
    counters, out = triton_reference
    for seed in TRITON_SEEDS:
        key = ints(seed_key(seed)).reshape(2, 1)
        words = torch.stack(philox4x32(*counters, key[0], key[1]))
        assert torch.equal(words, out["words", seed]), seed


def test_token_noise_matches_triton_randn4x(triton_reference):
    _, out = triton_reference
    for seed in TRITON_SEEDS:
        ours = token_noise(seed, 0, 0, 0, dim=4 * TRITON_BLOCKS)[0]
        torch.testing.assert_close(ours, out["randn4x", seed].flatten(), rtol=0, atol=1e-6)


def test_token_noise_matches_triton_philox_normals_with_full_counters(triton_reference):
    _, out = triton_reference
    for seed in TRITON_SEEDS:
        for image, token, step in TRITON_TOKEN_COUNTERS:
            ours = token_noise(seed, image, token, step, dim=4 * TRITON_BLOCKS)[0]
            theirs = out["token", seed, image, token, step].flatten()
            torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


def test_posterior_noise_matches_triton(triton_reference):
    _, out = triton_reference
    for seed in TRITON_SEEDS:
        theirs = out["token", seed, MASK, 0, 0].flatten()
        torch.testing.assert_close(posterior_noise(seed, 4 * TRITON_BLOCKS), theirs, rtol=0, atol=1e-6)


def compute_triton_reference(in_path: str, out_path: str) -> None:
    """Triton's own philox / randn4x on the CPU interpreter; runs in a child process."""
    assert os.environ.get("TRITON_INTERPRET") == "1"
    import triton
    import triton.language as tl

    @triton.jit
    def philox_words_kernel(counters_ptr, words_ptr, seed, N: tl.constexpr):
        i = tl.arange(0, N)
        c0 = tl.load(counters_ptr + i).to(tl.uint32)
        c1 = tl.load(counters_ptr + N + i).to(tl.uint32)
        c2 = tl.load(counters_ptr + 2 * N + i).to(tl.uint32)
        c3 = tl.load(counters_ptr + 3 * N + i).to(tl.uint32)
        w0, w1, w2, w3 = tl.philox(seed, c0, c1, c2, c3)
        tl.store(words_ptr + i, w0.to(tl.int64))
        tl.store(words_ptr + N + i, w1.to(tl.int64))
        tl.store(words_ptr + 2 * N + i, w2.to(tl.int64))
        tl.store(words_ptr + 3 * N + i, w3.to(tl.int64))

    @triton.jit
    def randn4x_kernel(out_ptr, seed, N: tl.constexpr):
        i = tl.arange(0, N)
        n0, n1, n2, n3 = tl.randn4x(seed, i)
        tl.store(out_ptr + 4 * i, n0)
        tl.store(out_ptr + 4 * i + 1, n1)
        tl.store(out_ptr + 4 * i + 2, n2)
        tl.store(out_ptr + 4 * i + 3, n3)

    @triton.jit
    def token_noise_kernel(out_ptr, seed, image, token, step, N: tl.constexpr):
        j = tl.arange(0, N)
        zero = tl.zeros((N,), dtype=tl.int64)
        c1 = (zero + token).to(tl.uint32)
        c2 = (zero + step).to(tl.uint32)
        c3 = (zero + image).to(tl.uint32)
        w0, w1, w2, w3 = tl.philox(seed, j.to(tl.uint32), c1, c2, c3)
        n0, n1 = tl.random.pair_uniform_to_normal(
            tl.random.uint_to_uniform_float(w0), tl.random.uint_to_uniform_float(w1)
        )
        n2, n3 = tl.random.pair_uniform_to_normal(
            tl.random.uint_to_uniform_float(w2), tl.random.uint_to_uniform_float(w3)
        )
        tl.store(out_ptr + 4 * j, n0)
        tl.store(out_ptr + 4 * j + 1, n1)
        tl.store(out_ptr + 4 * j + 2, n2)
        tl.store(out_ptr + 4 * j + 3, n3)

    counters = torch.load(in_path)["counters"]
    n = counters.shape[1]
    out = {}
    for seed in TRITON_SEEDS:
        words = torch.empty(4, n, dtype=torch.int64)
        philox_words_kernel[(1,)](counters.contiguous(), words, seed, N=n)
        out["words", seed] = words
        normals = torch.empty(n, 4, dtype=torch.float32)
        randn4x_kernel[(1,)](normals, seed, N=n)
        out["randn4x", seed] = normals
        for image, token, step in TRITON_TOKEN_COUNTERS + ((MASK, 0, 0),):
            normals = torch.empty(n, 4, dtype=torch.float32)
            token_noise_kernel[(1,)](normals, seed, image, token, step, N=n)
            out["token", seed, image, token, step] = normals
    torch.save(out, out_path)


if __name__ == "__main__":
    compute_triton_reference(sys.argv[1], sys.argv[2])
