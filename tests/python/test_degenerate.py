"""Degenerate inputs through the public API, on every device and dtype (docs/RELIABILITY.md).

Finite input must give finite output within each head's value range [v_min, v_max]; r >= N must be
exact; a NaN or Inf in one (batch, head) must leave every other (batch, head) bit-identical to a
run without it. Inputs are drawn in float64 and rounded to the dtype under test, so the bounds
and the oracle see exactly what the op sees.
"""

import math

import pytest
import torch

import wildcat
from wildcat import reference as ref

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
# Attention to exact keys in dtype: its float32 internals and the output rounding (relative to
# the largest |value|); float64 runs every step in float64.
EXACT_ATOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def device(request):
    return torch.device(request.param)


@pytest.fixture(params=DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def dtype(request):
    return request.param


def draw(*shape, dtype, device, scale=1.0, gen=None):
    gen = gen if gen is not None else torch.Generator().manual_seed(0)
    return (torch.randn(*shape, dtype=torch.float64, generator=gen) * scale).to(dtype).to(device)


def assert_finite_and_bounded(out, values, heads_per_kv=1):
    """Every output is finite and within its kv head's column-wise value range. Clamping happens
    before the cast to the dtype and the bounds are values of that dtype, so rounding to nearest
    cannot leave them: no tolerance."""
    assert torch.isfinite(out).all(), "non-finite output for finite input"
    lo = values.amin(-2, keepdim=True).repeat_interleave(heads_per_kv, -3)
    hi = values.amax(-2, keepdim=True).repeat_interleave(heads_per_kv, -3)
    assert (out >= lo).all() and (out <= hi).all(), (
        f"output outside [v_min, v_max]: by {float((lo - out).clamp_min(0).max())} below, "
        f"{float((out - hi).clamp_min(0).max())} above")


def assert_exact(out, q, k, v):
    exact = ref.exact_attention(q.cpu().double(), k.cpu().double(), v.cpu().double())
    scale = max(1.0, float(v.abs().max()))
    torch.testing.assert_close(out.cpu().double(), exact, atol=EXACT_ATOL[q.dtype] * scale, rtol=0)


def attend(q, k, v, **kw):
    kw.setdefault("seed", 1)
    return wildcat.scaled_dot_product_attention(q, k, v, **kw)


def test_all_keys_equal_gives_the_mean_of_values(device, dtype):
    q = draw(2, 3, 5, 16, dtype=dtype, device=device)
    k = draw(2, 3, 1, 16, dtype=dtype, device=device).expand(2, 3, 70, 16).contiguous()
    v = draw(2, 3, 70, 8, dtype=dtype, device=device)
    for r, bins in [(8, 1), (8, 4), (70, 7)]:
        out = attend(q, k, v, r=r, num_bins=bins)
        assert_finite_and_bounded(out, v)
        assert_exact(out, q, k, v)  # equal keys: exact attention is the mean, for any r


def test_fewer_distinct_keys_than_r_is_exact(device, dtype):
    distinct = draw(2, 3, 3, 16, dtype=dtype, device=device)
    k = distinct[:, :, torch.arange(200) % 3]
    v = draw(2, 3, 200, 8, dtype=dtype, device=device)
    q = draw(2, 3, 6, 16, dtype=dtype, device=device)
    core = wildcat.compress_kv(k, v, r=16, query_norm=wildcat.query_norm_per_kv_head(q), seed=2)
    # one pivot per distinct key, then the early stop leaves the remaining slots at weight 0
    assert torch.equal((core.core_weights != 0).sum(-1).cpu(), torch.full((2, 3), 3))
    assert torch.isfinite(core.core_values).all() and torch.isfinite(core.core_weights).all()
    out = wildcat.coreset_attention(q, core)
    assert_finite_and_bounded(out, v)
    # three distinct keys in three slots are represented exactly (to the accumulation dtype)
    exact = ref.exact_attention(q.cpu().double(), k.cpu().double(), v.cpu().double())
    atol = 1e-10 if dtype == torch.float64 else max(1e-4, EXACT_ATOL[dtype])
    torch.testing.assert_close(out.cpu().double(), exact, atol=atol, rtol=0)


@pytest.mark.parametrize("which", ["keys", "queries", "both"])
def test_all_zero_keys_or_queries_give_the_mean(device, dtype, which):
    q = draw(2, 2, 5, 16, dtype=dtype, device=device)
    k = draw(2, 2, 90, 16, dtype=dtype, device=device)
    v = draw(2, 2, 90, 8, dtype=dtype, device=device)
    if which in ("keys", "both"):
        k = torch.zeros_like(k)
    if which in ("queries", "both"):
        q = torch.zeros_like(q)
    out = attend(q, k, v, r=8, num_bins=2)
    assert_finite_and_bounded(out, v)
    assert_exact(out, q, k, v)


def test_a_single_key(device, dtype):
    q = draw(2, 3, 4, 16, dtype=dtype, device=device)
    k, v = draw(2, 3, 1, 16, dtype=dtype, device=device), draw(2, 3, 1, 8, dtype=dtype, device=device)
    for r in (1, 5):
        out = attend(q, k, v, r=r)
        assert torch.equal(out, v.expand_as(out)), "one key: the output is its value"
    pivots, kinv, rows = torch.ops.wildcat.rp_nystrom(k, 3, torch.tensor(0), 1e-5)
    assert pivots.shape == (2, 3, 1) and torch.equal(pivots.cpu(), torch.zeros(2, 3, 1, dtype=torch.int64))
    assert torch.equal(kinv.cpu(), torch.ones_like(kinv.cpu())) and torch.equal(rows.cpu(), torch.ones_like(rows.cpu()))


@pytest.mark.parametrize("n_minus_r", [0, 1])
@pytest.mark.parametrize("bins", [1, 4])
def test_n_equal_r_and_r_plus_one(device, dtype, n_minus_r, bins):
    r = 32
    n = r + n_minus_r
    q = draw(2, 2, 9, 16, dtype=dtype, device=device)
    k, v = draw(2, 2, n, 16, dtype=dtype, device=device), draw(2, 2, n, 8, dtype=dtype, device=device)
    out = attend(q, k, v, r=r, num_bins=bins)
    assert_finite_and_bounded(out, v)
    if n <= r:
        assert_exact(out, q, k, v)
    else:  # one bin holds one key more than its slots: compressed, the others exact
        core = wildcat.compress_kv(k, v, r=r, num_bins=bins, seed=1)
        assert core.core_indices.shape == (2, 2, r)
        assert (core.core_indices.diff(dim=-1) != 0).all(), "every slot a distinct key"


def test_bins_of_length_one(device, dtype):
    q = draw(1, 2, 5, 8, dtype=dtype, device=device)
    k, v = draw(1, 2, 6, 8, dtype=dtype, device=device), draw(1, 2, 6, 4, dtype=dtype, device=device)
    out = attend(q, k, v, r=6, num_bins=6)  # six bins of one key: exact
    assert_exact(out, q, k, v)
    # lengths (2, 2, 1, 1) with one slot each: two compressed bins, two exact single-key bins
    core = wildcat.compress_kv(k[..., :6, :], v, r=4, num_bins=4, seed=3)
    assert torch.equal(core.core_indices[..., 2:].cpu(), torch.tensor([4, 5]).expand(1, 2, 2))
    assert torch.equal(core.core_weights[..., 2:].cpu(), torch.ones(1, 2, 2, dtype=core.core_weights.dtype))
    assert_finite_and_bounded(attend(q, k, v, r=4, num_bins=4), v)


@pytest.mark.parametrize("key_scale", [1e-6, 1e-3, 1e2, 1e4])
def test_extreme_key_norms_with_unit_queries(device, dtype, key_scale):
    if dtype == torch.float16 and key_scale > 6e4 / 4:
        pytest.skip("keys beyond float16's range")
    q = draw(1, 2, 6, 16, dtype=dtype, device=device)
    k = draw(1, 2, 128, 16, dtype=dtype, device=device, scale=key_scale)
    v = draw(1, 2, 128, 8, dtype=dtype, device=device)
    out = attend(q, k, v, r=16, num_bins=2)
    assert_finite_and_bounded(out, v)
    if key_scale <= 1e-3:  # logits within 1e-2 of each other: near the mean, exact to first order
        exact = ref.exact_attention(q.cpu().double(), k.cpu().double(), v.cpu().double())
        assert (out.cpu().double() - exact).abs().max() < 0.05


# β·R_q·R_k for these inputs is in the thousands (scale 20: ~3e3; 30: ~8e3; 100: ~8e4): the
# Nyström weights' factors e^{(s_ref - s_p)/2} exceed float32 (and at scale 100, float64) range;
# compress_kv shifts each group's values and weights by a common factor there.
@pytest.mark.parametrize("scale", [5.0, 20.0, 30.0, 100.0])
def test_extreme_query_and_key_norms_stay_finite(device, dtype, scale):
    if dtype == torch.float16 and scale > 30:
        pytest.skip("inputs beyond float16's range")
    gen = torch.Generator().manual_seed(0)
    q = draw(1, 4, 8, 16, dtype=dtype, device=device, scale=scale, gen=gen)
    k = draw(1, 4, 256, 16, dtype=dtype, device=device, scale=scale, gen=gen)
    v = draw(1, 4, 256, 4, dtype=dtype, device=device, gen=gen)
    for tau in ("lambert", "constant"):
        core = wildcat.compress_kv(k, v, r=32, query_norm=wildcat.query_norm_per_kv_head(q), seed=3, tau=tau)
        assert torch.isfinite(core.core_values).all() and torch.isfinite(core.core_weights).all(), (
            f"non-finite coreset at tau={tau}")
        assert_finite_and_bounded(wildcat.coreset_attention(q, core), v)


def test_reference_coreset_stays_finite_for_extreme_norms():
    """The oracle's float32 weights overflowed (0 * inf = NaN) at β R_q R_k in the thousands;
    factored around the bin's largest s and shifted per group, they stay finite, and where no
    shift is needed they are unchanged: float64 agrees with float32 to float32 rounding."""
    gen = torch.Generator().manual_seed(0)
    q, k = (torch.randn(1, 4, n, 16, generator=gen, dtype=torch.float64) * 30 for n in (8, 256))
    v = torch.randn(1, 4, 256, 4, generator=gen, dtype=torch.float64)
    for dtype in (torch.float32, torch.float64):
        core = ref.compress_kv(k.to(dtype), v.to(dtype), 32, 1, None, ref.query_norm_per_kv_head(q.to(dtype)), 3)
        assert torch.isfinite(core.core_values).all() and torch.isfinite(core.core_weights).all(), dtype
        out = ref.coreset_attention(q.to(dtype), *core[:3], None, core.value_min, core.value_max)
        assert_finite_and_bounded(out, v.to(dtype))
    small = ref.compress_kv(k / 30, v, 32, 1, None, ref.query_norm_per_kv_head(q / 30), 3)
    unfactored = _unfactored_core_values(k / 30, v, small.core_indices, ref.query_norm_per_kv_head(q / 30))
    torch.testing.assert_close(small.core_values, unfactored, atol=1e-9, rtol=1e-9)


def _unfactored_core_values(k, v, pivots, q_norm):
    """V̂ = (kinv R ⊙ e^{(s_l - s_p)/2}) V straight from ALGORITHM.md §2.8, one bin, float64."""
    kc = k - k.mean(-2, keepdim=True)
    m = ref.key_scale(1 / 4, q_norm.reshape(-1), kc.norm(dim=-1).amax(-1).reshape(-1),
                      torch.full((kc.shape[1],), kc.shape[2]), "lambert")
    x = m.reshape(1, -1, 1, 1) * kc
    s = (x * x).sum(-1)
    xp = x.gather(2, pivots[..., None].expand(*pivots.shape, x.shape[-1]))
    kernel = torch.exp(-((xp[..., :, None, :] - x[..., None, :, :]) ** 2).sum(-1) / 2)
    kinv = torch.linalg.inv(kernel.gather(3, pivots[..., None, :].expand(*pivots.shape, pivots.shape[-1])))
    weights = (kinv @ kernel) * torch.exp((s[..., None, :] - s.gather(2, pivots)[..., :, None]) / 2)
    return weights @ v


def test_values_with_huge_dynamic_range(device, dtype):
    # within each dtype's range: 1e-30..1e30 (float16: 1e-4..6e4)
    low, high = (-4, math.log10(6e4)) if dtype == torch.float16 else (-30, 30)
    magnitudes = torch.logspace(low, high, 150, dtype=torch.float64)
    signs = torch.where(torch.arange(150) % 3 == 0, -1.0, 1.0).double()
    v = (draw(1, 2, 150, 4, dtype=torch.float64, device="cpu").sign() * magnitudes[:, None] * signs[:, None]).to(dtype).to(device)
    q, k = draw(1, 2, 7, 16, dtype=dtype, device=device), draw(1, 2, 150, 16, dtype=dtype, device=device)
    assert torch.isfinite(v).all()
    for r, bins in [(16, 1), (16, 4), (150, 3)]:
        out = attend(q, k, v, r=r, num_bins=bins)
        assert_finite_and_bounded(out, v)
        if r >= 150 and dtype in (torch.float32, torch.float64):
            exact = ref.exact_attention(q.cpu().double(), k.cpu().double(), v.cpu().double())
            torch.testing.assert_close(out.cpu().double(), exact, rtol=EXACT_ATOL[dtype], atol=1e-30)


def test_float16_near_overflow(device):
    """Entries near float16's largest value (65504): norms and logits would overflow in float16
    arithmetic; the ops compute them in float32."""
    dtype = torch.float16
    gen = torch.Generator().manual_seed(1)
    k = (torch.rand(1, 2, 100, 64, generator=gen, dtype=torch.float64) * 2 - 1) * 6e4
    q = (torch.rand(1, 2, 5, 64, generator=gen, dtype=torch.float64) * 2 - 1) * 6e4
    v = (torch.rand(1, 2, 100, 64, generator=gen, dtype=torch.float64) * 2 - 1) * 6.5e4
    q, k, v = (t.to(dtype).to(device) for t in (q, k, v))
    assert torch.isfinite(v).all() and float(v.abs().max()) > 6e4
    for r in (16, 100):
        assert_finite_and_bounded(attend(q, k, v, r=r, num_bins=2), v)
    # moderate keys, values at the edge: r >= N is exact to float16 rounding
    k_small = draw(1, 2, 100, 64, dtype=dtype, device=device)
    out = attend(q / 6e4, k_small, v, r=100)
    assert_exact(out, q / 6e4, k_small, v)


@pytest.mark.parametrize("where,bad", [("key", float("nan")), ("key", float("inf")), ("value", float("nan")),
                                       ("value", float("-inf")), ("query", float("nan"))])
@pytest.mark.parametrize("gqa", [False, True])
def test_non_finite_input_stays_in_its_group(device, dtype, where, bad, gqa):
    """A NaN or Inf in one (batch, kv head) changes nothing in any other: those outputs are
    bit-identical to a run without it (docs/RELIABILITY.md states what the poisoned group gets)."""
    hq, hkv = (4, 2) if gqa else (3, 3)
    q = draw(2, hq, 6, 16, dtype=dtype, device=device)
    k, v = draw(2, hkv, 80, 16, dtype=dtype, device=device), draw(2, hkv, 80, 8, dtype=dtype, device=device)
    clean = attend(q, k, v, r=12, num_bins=2, enable_gqa=gqa)
    bad_kv = 1
    bad_q_heads = [bad_kv * (hq // hkv) + i for i in range(hq // hkv)]
    if where == "query":
        q = q.clone()
        q[1, bad_q_heads[0], 3, 5] = bad
    else:
        t = (k if where == "key" else v).clone()
        t[1, bad_kv, 41, 2] = bad
        k, v = (t, v) if where == "key" else (k, t)
    dirty = attend(q, k, v, r=12, num_bins=2, enable_gqa=gqa)
    others = torch.ones(2, hq, dtype=torch.bool)
    others[1, bad_q_heads] = False
    assert torch.equal(dirty[others], clean[others]), "a non-finite input spread to another group"
    if where == "query":  # only the poisoned query's own row can be non-finite
        rows = torch.isfinite(dirty[1, bad_q_heads]).all(-1)
        rows[0, 3] = True
        assert rows.all(), "a NaN query made another query's output non-finite"


def test_rp_nystrom_degenerate_points(device, dtype):
    ops = torch.ops.wildcat
    seed = torch.tensor(4)
    x = torch.zeros(2, 50, 8, dtype=dtype, device=device)  # every point equal: one pivot, then stop
    pivots, kinv, rows = ops.rp_nystrom(x, 10, seed, 1e-5)
    assert torch.equal(kinv[:, 1:].cpu(), torch.zeros_like(kinv[:, 1:].cpu()))
    assert torch.equal(kinv[:, 0, 0].cpu(), torch.ones(2, dtype=kinv.dtype))
    assert torch.equal(pivots.cpu(), pivots[:, :1].cpu().expand(2, 10)), "slots after an early stop repeat the first"
    far = draw(2, 40, 8, dtype=dtype, device=device, scale=1e3)  # kernel ~ identity: every point a pivot
    pivots, kinv, rows = ops.rp_nystrom(far, 40, seed, 1e-5)
    assert torch.isfinite(kinv).all() and torch.isfinite(rows).all()
    assert torch.equal(pivots.sort(-1).values.cpu(), torch.arange(40).expand(2, 40))
