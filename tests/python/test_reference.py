"""The oracle's own properties (ALGORITHM.md), independent of the compiled ops."""

import math

import pytest
import torch

from wildcat import reference as ref


@pytest.mark.parametrize(
    "counter,key,expected",
    [  # Random123 known-answer vectors for Philox4x32-10
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF, 0xFFFFFFFF), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
         (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
    ],
)
def test_philox_known_answers(counter, key, expected):
    assert tuple(int(w) for w in ref.philox4x32_10(counter, *key)) == expected


def test_lambert_w0_inverts_w_exp_w():
    z = torch.logspace(-3, 6, 200, dtype=torch.float64)
    w = ref.lambert_w0(z)
    torch.testing.assert_close(w * torch.exp(w), z, rtol=1e-13, atol=0)


@pytest.mark.parametrize("rank", [12, 40])  # one pivot per step; in rounds (§7)
def test_kinv_is_the_inverse_and_rows_are_kernel_rows(rank):
    x = torch.randn(3, 60, 5, dtype=torch.float64)
    pivots, kinv, rows = ref.rp_nystrom(x, rank, seed=4)
    gram = torch.exp(-torch.cdist(x, x) ** 2 / 2)
    batch = torch.arange(3)[:, None]
    eye = torch.eye(rank, dtype=torch.float64).expand(3, -1, -1)
    g_ss = gram[batch[:, :, None], pivots[:, :, None], pivots[:, None, :]]
    torch.testing.assert_close(kinv @ g_ss, eye, atol=1e-12, rtol=0)
    torch.testing.assert_close(rows, gram[batch, pivots], atol=1e-14, rtol=0)
    assert all(len(set(p.tolist())) == rank for p in pivots)
    # Nyström interpolates at the pivots: W_G[:, pivots] = I
    interp = (kinv @ rows)[batch[:, :, None], torch.arange(rank)[None, :, None], pivots[:, None, :]]
    torch.testing.assert_close(interp, eye, atol=1e-10, rtol=0)


def test_block_pivoting_starts_above_sixteen_slots():
    """Within each form the pivots of a smaller rank are those of a larger one cut short (the same
    stream, stopped sooner), so the form of ranks 16 and 17 shows in whether they share a prefix."""
    x = torch.randn(4, 80, 3, dtype=torch.float64)
    pivots = {rank: ref.rp_nystrom(x, rank, seed=9)[0] for rank in (10, 16, 17, 40)}
    assert torch.equal(pivots[16][:, :10], pivots[10])  # one pivot per step
    assert torch.equal(pivots[40][:, :17], pivots[17])  # rounds
    assert not torch.equal(pivots[17][:, :16], pivots[16])


def test_first_pivot_is_sampled_proportionally_to_exp_sq_norm():
    # d = 1 before the first step, so P(p_0 = l) = exp(s_l) / Σ exp(s); check it over many seeds.
    x = torch.tensor([[0.0], [0.5], [1.0], [1.3], [-0.7]], dtype=torch.float64)
    expected = torch.softmax((x * x).sum(-1), 0)
    trials = 3000
    counts = torch.zeros(5)
    for seed in range(trials):
        counts[int(ref.rp_nystrom(x, 1, seed=seed)[0][0])] += 1
    freq = counts / trials
    sigma = torch.sqrt(expected * (1 - expected) / trials)
    assert torch.all((freq - expected).abs() < 4.5 * sigma), (freq, expected)


@pytest.mark.parametrize("n,rank,bins", [(40, 40, 1), (40, 64, 3), (37, 40, 5)])
def test_rank_at_least_length_is_exact(n, rank, bins):
    q, k, v = (torch.randn(2, 5, m, 8, dtype=torch.float64) for m in (9, n, n))
    out = ref.wildcat_attention(q, k, v, rank, bins, seed=1)
    torch.testing.assert_close(out, ref.exact_attention(q, k, v), atol=1e-12, rtol=0)


def test_all_equal_keys_give_the_mean_of_values():
    k = torch.ones(1, 1, 50, 4, dtype=torch.float64) * 0.3
    v = torch.randn(1, 1, 50, 3, dtype=torch.float64)
    q = torch.randn(1, 1, 6, 4, dtype=torch.float64)
    core = ref.compress_kv(k, v, 8, 2, None, ref.query_norm_per_kv_head(q), seed=0)
    # one pivot per bin, then early stop: the remaining slots have zero weight
    assert int((core.core_weights != 0).sum()) == 2
    out = ref.wildcat_attention(q, k, v, 8, 2, seed=0)
    torch.testing.assert_close(out, v.mean(-2, keepdim=True).expand_as(out), atol=1e-12, rtol=0)


def test_balanced_sizes():
    assert ref.balanced_sizes(10, 3) == [4, 3, 3]
    assert ref.balanced_sizes(7, 7) == [1] * 7
    assert sum(ref.balanced_sizes(1025, 16)) == 1025


def test_key_scale_guards_zero_norms():
    m = ref.key_scale(0.125, torch.tensor([0.0, 2.0, 2.0]), torch.tensor([3.0, 0.0, 3.0]), torch.tensor([10, 10, 10]), "lambert")
    assert m[0] == 0 and m[1] == 0 and m[2] > 0
    # constant variant: tau^2 = (R_k / R_q) * 3.94582
    m = ref.key_scale(0.125, torch.tensor([2.0], dtype=torch.float64), torch.tensor([3.0], dtype=torch.float64), torch.tensor([10]), "constant")
    assert math.isclose(float(m), math.sqrt(0.125 * 2.0 / (3.0 * 3.94582)), rel_tol=1e-14)
