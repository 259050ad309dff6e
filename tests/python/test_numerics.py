"""The compiled ops against the float64 oracle (wildcat.reference) and against exact attention."""

import math

import pytest
import torch

import wildcat
from wildcat import reference as ref

from conftest import randn

FLOATS = [torch.float32, torch.bfloat16, torch.float16]


def compress_both(k, v, rank, bins, q_norm, seed, **kw):
    got = wildcat.ops.compress_kv(k, v, rank, bins, kw.pop("scale", None), q_norm, seed, **kw)
    want = ref.compress_kv(k.cpu(), v.cpu(), rank, bins, None, None if q_norm is None else q_norm.cpu(), seed, **kw)
    return got, want


def assert_same_coreset(got, want, atol):
    assert torch.equal(got.core_indices.cpu(), want.core_indices), "pivots differ"
    assert torch.equal(got.core_keys.cpu(), want.core_keys)
    for name in ("core_values", "core_weights", "value_min", "value_max"):
        a, b = getattr(got, name).cpu(), getattr(want, name)
        assert a.dtype == b.dtype, name
        scale = max(1.0, float(b.abs().max())) if b.numel() else 1.0
        torch.testing.assert_close(a, b, atol=atol * scale, rtol=0, msg=name)


@pytest.mark.parametrize(
    "lead,n,e,dv,rank,bins",
    [
        ((2, 3), 1, 32, 32, 4, 1),       # a single key
        ((2, 3), 97, 32, 16, 16, 3),     # odd length, E != D, uneven bins
        ((1, 2), 1025, 64, 64, 64, 4),
        ((3,), 300, 128, 64, 32, 1),     # 32 slots: pivots in rounds (§7)
        ((2,), 400, 64, 16, 64, 1),      # 64 slots in rounds (at E = 32, G_SS's condition ~1e4 puts
                                         # op and oracle each ~2e-9 from the exact weights, beyond atol)
        ((2,), 300, 16, 8, 33, 2),       # one bin in rounds (17 slots), one a pivot per step (16)
        ((), 50, 16, 8, 10, 1),          # a single group, no leading dims
        ((2, 2), 64, 32, 32, 64, 4),     # r = N: every bin exact
        ((2, 2), 11, 8, 8, 10, 5),       # some bins exact (n_b = r_b), one compressed
    ],
)
@pytest.mark.parametrize("tau", ["lambert", "constant"])
def test_float64_compress_matches_oracle(lead, n, e, dv, rank, bins, tau):
    k, v = randn(*lead, n, e, dtype=torch.float64), randn(*lead, n, dv, dtype=torch.float64)
    q_norm = torch.rand(lead, dtype=torch.float64) * 10 + 1
    got, want = compress_both(k, v, rank, bins, q_norm, seed=7, tau=tau)
    assert got.core_keys.shape == (*lead, min(rank, n), e)
    assert_same_coreset(got, want, atol=1e-10)


@pytest.mark.parametrize("center_values", [False, True])
def test_float64_query_agnostic_and_centred_values(center_values):
    k, v = randn(2, 4, 200, 16, dtype=torch.float64), randn(2, 4, 200, 8, dtype=torch.float64) + 3
    got, want = compress_both(k, v, 24, 2, None, seed=11, center_values=center_values)
    assert_same_coreset(got, want, atol=1e-10)


def test_float64_attention_matches_oracle_for_the_same_seed():
    q, k, v = randn(2, 4, 33, 32, dtype=torch.float64), randn(2, 4, 500, 32, dtype=torch.float64), randn(2, 4, 500, 24, dtype=torch.float64)
    for center in (False, True):
        got = wildcat.scaled_dot_product_attention(q, k, v, r=40, num_bins=4, seed=3, center_values=center)
        want = ref.wildcat_attention(q, k, v, 40, 4, seed=3, center_values=center)
        torch.testing.assert_close(got, want, atol=1e-10, rtol=0)


@pytest.mark.parametrize("rank", [12, 20, 64])  # one pivot per step; in rounds (§7)
def test_float64_rp_nystrom_matches_oracle(rank):
    x = randn(2, 3, 90, 6, dtype=torch.float64) * 0.7
    got = wildcat.ops.rp_nystrom(x, rank, seed=5)
    want = ref.rp_nystrom(x, rank, seed=5)
    assert torch.equal(got[0], want[0])
    torch.testing.assert_close(got[1], want[1], atol=1e-9, rtol=1e-10)
    torch.testing.assert_close(got[2], want[2], atol=1e-12, rtol=0)


def test_float64_rank_at_least_length_is_exact_attention():
    for n, rank, bins in [(1, 1, 1), (97, 97, 1), (97, 128, 5), (1025, 1025, 16)]:
        q, k, v = randn(1, 2, 13, 32, dtype=torch.float64), randn(1, 2, n, 32, dtype=torch.float64), randn(1, 2, n, 16, dtype=torch.float64)
        out = wildcat.scaled_dot_product_attention(q, k, v, r=rank, num_bins=bins)
        torch.testing.assert_close(out, ref.exact_attention(q, k, v), atol=1e-10, rtol=0)


@pytest.mark.parametrize("dtype", FLOATS)
def test_rank_at_least_length_is_exact_in_every_dtype(dtype):
    q, k, v = randn(2, 3, 40, 64, dtype=dtype), randn(2, 3, 77, 64, dtype=dtype), randn(2, 3, 77, 64, dtype=dtype)
    out = wildcat.scaled_dot_product_attention(q, k, v, r=77, num_bins=3)
    assert out.dtype == dtype
    exact64 = ref.exact_attention(q.double(), k.double(), v.double())
    sdpa_err = (torch.nn.functional.scaled_dot_product_attention(q, k, v).double() - exact64).abs().max()
    err = (out.double() - exact64).abs().max()
    assert err <= 2 * sdpa_err, (err, sdpa_err)  # no worse than twice torch's own SDPA at this dtype


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("n,rank,bins,e", [(512, 32, 1, 64), (1025, 64, 4, 32), (300, 48, 3, 128)])
def test_accuracy_rule_against_float64_oracle(dtype, n, rank, bins, e):
    """FlashAttention's rule: the op's error against the float64 oracle is at most twice that of
    the same algorithm in plain PyTorch at the same dtype, with the pivots held fixed."""
    q, k, v = randn(2, 2, 64, e, dtype=dtype), randn(2, 2, n, e, dtype=dtype), randn(2, 2, n, e, dtype=dtype)
    q_norm = ref.query_norm_per_kv_head(q, 2)
    core = wildcat.ops.compress_kv(k, v, rank, bins, None, q_norm, 9)
    out = wildcat.ops.coreset_attention(q, core.core_keys, core.core_values, core.core_weights, None, core.value_min, core.value_max)

    def oracle(q_, k_, v_):
        c = ref.compress_kv(k_, v_, rank, bins, None, ref.query_norm_per_kv_head(q_, 2), 9, core_indices=core.core_indices)
        return ref.coreset_attention(q_, c.core_keys, c.core_values, c.core_weights, None, c.value_min, c.value_max)

    exact64 = oracle(q.double(), k.double(), v.double())
    plain = oracle(q, k, v)  # same algorithm, same dtype, plain PyTorch (float32 internals)
    err = (out.double() - exact64).abs().max()
    err_plain = (plain.double() - exact64).abs().max()
    assert err <= 2 * err_plain, (float(err), float(err_plain))


def test_error_falls_as_rank_grows():
    """Relative error against exact attention, over 12 seeds: larger r wins on most seeds and on
    average (the estimator is random, so one draw proves nothing)."""
    gen = torch.Generator().manual_seed(0)
    ranks = (8, 32, 128)
    errors = torch.zeros(len(ranks), 12)
    for seed in range(12):
        q, k, v = (torch.randn(1, 4, 512, 16, generator=gen) for _ in range(3))
        exact = ref.exact_attention(q, k, v)
        for i, rank in enumerate(ranks):
            out = wildcat.scaled_dot_product_attention(q, k, v, r=rank, seed=seed)
            errors[i, seed] = (out.double() - exact).norm() / exact.norm()
    mean = errors.mean(1)
    assert mean[0] > 1.25 * mean[1] > 1.25 * 1.25 * mean[2], mean
    assert (errors[1] < errors[0]).sum() >= 11 and (errors[2] < errors[1]).sum() >= 11, errors


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_output_is_finite_and_within_value_bounds(dtype):
    q, k, v = randn(2, 3, 50, 16, dtype=dtype) * 3, randn(2, 3, 400, 16, dtype=dtype) * 3, randn(2, 3, 400, 8, dtype=dtype)
    out = wildcat.scaled_dot_product_attention(q, k, v, r=16, num_bins=2, seed=1).float()
    assert torch.isfinite(out).all()
    lo, hi = v.float().amin(-2, keepdim=True), v.float().amax(-2, keepdim=True)
    assert (out >= lo).all() and (out <= hi).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_degenerate_keys_stop_early_and_stay_finite(dtype):
    base = randn(3, 16, dtype=dtype)
    k = base[torch.arange(300) % 3].reshape(1, 1, 300, 16)  # 3 distinct keys, r = 32
    v = randn(1, 1, 300, 8, dtype=dtype)
    q = randn(1, 1, 20, 16, dtype=dtype)
    core = wildcat.ops.compress_kv(k, v, 32, 1, None, ref.query_norm_per_kv_head(q), 5)
    assert int((core.core_weights != 0).sum()) == 3  # one pivot per distinct key, then early stop
    out = wildcat.ops.coreset_attention(q, core.core_keys, core.core_values, core.core_weights, None, core.value_min, core.value_max)
    assert torch.isfinite(out).all()
    # three distinct keys are represented exactly: the result is exact attention
    exact = ref.exact_attention(q.double(), k.double(), v.double())
    torch.testing.assert_close(out.double(), exact, atol=1e-5 if dtype == torch.float32 else 1e-10, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_block_pivoting_stops_early_on_duplicate_keys(dtype):
    """8 distinct keys, each repeated, and 32 slots: the rounds accept each key once (a draw of a
    key already represented has residual 0 and is rejected), then stop; in float64 exactly as the
    oracle does (float32 logarithms differ from torch's, so only the float64 pivots must match)."""
    key_of = torch.randperm(200) % 8
    keys = randn(8, 16, dtype=torch.float64)[key_of].to(dtype)
    pivots, kinv, rows = wildcat.ops.rp_nystrom(keys, 32, seed=3)
    count = int((kinv != 0).any(-1).sum())
    assert count == 8 and len(set(key_of[pivots[:count]].tolist())) == 8  # one pivot per key
    assert torch.all(pivots[count:] == pivots[0])  # unused slots repeat the first pivot
    assert torch.isfinite(kinv).all() and torch.isfinite(rows).all()

    k, v = keys.reshape(1, 1, 200, 16), randn(1, 1, 200, 8, dtype=dtype)
    q_norm = torch.full((1, 1), 4.0, dtype=dtype)
    got, want = compress_both(k, v, 32, 1, q_norm, seed=3)
    assert int((got.core_weights != 0).sum()) == 8
    assert torch.isfinite(got.core_values).all() and torch.isfinite(got.core_weights).all()
    if dtype == torch.float64:
        oracle = ref.rp_nystrom(keys, 32, seed=3)
        assert torch.equal(pivots, oracle[0])
        torch.testing.assert_close(kinv, oracle[1], atol=1e-10, rtol=0)
        assert_same_coreset(got, want, atol=1e-10)


def test_block_pivoting_second_pivot_follows_the_exact_law():
    """The second pivot of a bin in rounds (17 slots), over 20,000 seeds, against its exact law
    P(p_1 = b) = Σ_a π(a) d_a(b) e^{s_b} / Σ_l d_a(l) e^{s_l}, with π(a) ∝ e^{s_a} the law of the
    first pivot and d_a(l) = 1 - G(x_a, x_l)^2 the residual it leaves."""
    gen = torch.Generator().manual_seed(1)
    norms = torch.linspace(0.2, 1.2, 24, dtype=torch.float64)[:, None]
    x = torch.randn(24, 3, dtype=torch.float64, generator=gen) * norms
    s = (x * x).sum(-1)
    residual = 1 - torch.exp(-torch.cdist(x, x) ** 2)  # d_a(l), row a
    weight = residual * torch.exp(s)
    first = torch.softmax(s, 0)[:, None]
    law = (first * weight / weight.sum(1, keepdim=True)).sum(0)
    trials = 20000
    # The test's power: accepting every draw would give the second pivot ∝ e^{s_b} over b != a,
    # whose expected chi-square against `law` lies far beyond the bound below.
    others = torch.exp(s)[None, :] * (1 - torch.eye(24, dtype=torch.float64))
    accept_all = (first * others / others.sum(1, keepdim=True)).sum(0)
    assert trials * float(((accept_all - law) ** 2 / law).sum()) > 10 * 55
    counts = torch.zeros(24, dtype=torch.float64)
    for seed in range(trials):
        counts[wildcat.ops.rp_nystrom(x, 17, seed=seed)[0][1]] += 1
    expected = trials * law  # at least 32 per point
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 55, chi2  # 23 degrees of freedom: P(chi2 > 55) = 2e-4


def test_block_and_one_step_pivoting_include_points_alike():
    """The two forms give the same law of coresets (§7): how often each point is among the first
    16 pivots, with 17 slots (rounds) and with 16 (one pivot per step), over 6,000 seeds each."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(40, 3, dtype=torch.float64, generator=gen) * 0.8
    trials = 6000

    def inclusion(rank):
        counts = torch.zeros(40, dtype=torch.float64)
        for seed in range(trials):
            counts[wildcat.ops.rp_nystrom(x, rank, seed=seed)[0][:16]] += 1
        return counts / trials

    rounds, steps = inclusion(17), inclusion(16)
    pooled = (rounds + steps) / 2
    sigma = torch.sqrt(2 * pooled * (1 - pooled) / trials)
    assert torch.all((rounds - steps).abs() <= 4.5 * sigma), ((rounds - steps) / sigma).abs().max()


def test_all_equal_keys_and_zero_queries_give_the_mean():
    v = randn(2, 2, 100, 8, dtype=torch.float64)
    k = torch.full((2, 2, 100, 16), 0.25, dtype=torch.float64)
    q = randn(2, 2, 7, 16, dtype=torch.float64)
    mean = v.mean(-2, keepdim=True).expand(2, 2, 7, 8)
    torch.testing.assert_close(wildcat.scaled_dot_product_attention(q, k, v, r=8, num_bins=4), mean, atol=1e-12, rtol=0)
    k = randn(2, 2, 100, 16, dtype=torch.float64)
    torch.testing.assert_close(wildcat.scaled_dot_product_attention(torch.zeros_like(q), k, v, r=8, num_bins=4), mean, atol=1e-12, rtol=0)


def test_query_heads_share_kv_heads_without_copies():
    q, k, v = randn(2, 8, 30, 32, dtype=torch.float64), randn(2, 2, 200, 32, dtype=torch.float64), randn(2, 2, 200, 16, dtype=torch.float64)
    got = wildcat.scaled_dot_product_attention(q, k, v, enable_gqa=True, r=24, num_bins=2, seed=2)
    want = ref.wildcat_attention(q, k, v, 24, 2, seed=2)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=0)
    # and GQA with r >= N is exact attention
    exact = wildcat.scaled_dot_product_attention(q, k, v, enable_gqa=True, r=200)
    torch.testing.assert_close(exact, ref.exact_attention(q, k, v), atol=1e-10, rtol=0)


def test_queries_and_keys_of_different_lengths():
    for m, n in [(1, 300), (300, 7), (17, 1025)]:
        q, k, v = randn(1, 2, m, 32, dtype=torch.float64), randn(1, 2, n, 32, dtype=torch.float64), randn(1, 2, n, 32, dtype=torch.float64)
        got = wildcat.scaled_dot_product_attention(q, k, v, r=16, seed=4)
        assert got.shape == (1, 2, m, 32)
        torch.testing.assert_close(got, ref.wildcat_attention(q, k, v, 16, seed=4), atol=1e-10, rtol=0)


def test_first_pivot_distribution_of_the_op():
    x = torch.tensor([[[0.0], [0.5], [1.0], [1.3], [-0.7]]], dtype=torch.float32)
    expected = torch.softmax((x[0] * x[0]).sum(-1).double(), 0)
    trials = 3000
    counts = torch.zeros(5, dtype=torch.float64)
    for seed in range(trials):
        counts[int(wildcat.ops.rp_nystrom(x, 1, seed=seed)[0][0, 0])] += 1
    freq = counts / trials
    assert torch.all((freq - expected).abs() < 4.5 * torch.sqrt(expected * (1 - expected) / trials)), (freq, expected)
