"""Property-based fuzzing of every op's arguments and shapes on the CPU against wildcat.reference.

float64: the ops must pick the oracle's pivots and match its outputs to 1e-9. Other dtypes:
invariants only (shapes, dtypes, finite coresets, outputs finite and within [v_min, v_max]).

Profiles (docs/RELIABILITY.md): "ci" (default; derandomized, bounded so the file takes about two
minutes on two cores) and "long" for local runs:

    WILDCAT_FUZZ_PROFILE=long python -m pytest tests/python/test_fuzz.py --hypothesis-show-statistics

Every failure found becomes a named test_regression_* below.
"""

import math
import os

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import wildcat  # noqa: E402
from wildcat import reference as ref  # noqa: E402

settings.register_profile(
    "ci", max_examples=300, deadline=None, derandomize=True, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "long", max_examples=3000, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
PROFILE = os.environ.get("WILDCAT_FUZZ_PROFILE", "ci")

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
# Bounds on the work of one example, so that the CI profile stays within its time.
MAX_POINTS = 40_000  # groups * N * (E + D)


@st.composite
def problems(draw, dtype=None):
    """Inputs of one compress + attend call: shapes, settings and data."""
    lead = tuple(draw(st.lists(st.integers(1, 3), max_size=2)))
    n = draw(st.one_of(st.integers(1, 8), st.integers(1, 300)))
    e = draw(st.one_of(st.integers(1, 32), st.sampled_from([64, 128, 256])))
    dv = draw(st.one_of(st.integers(1, 32), st.sampled_from([64, 128, 256])))
    groups = math.prod(lead)
    hypothesis.assume(groups * n * (e + dv) <= MAX_POINTS)
    rank = draw(st.integers(1, n + 4))
    bins = draw(st.integers(1, min(n, rank)))
    heads_per_kv = draw(st.integers(1, 3)) if lead else 1
    m = draw(st.integers(1, 20))
    return dict(
        lead=lead, n=n, e=e, dv=dv, rank=rank, bins=bins, heads_per_kv=heads_per_kv, m=m,
        tau=draw(st.sampled_from(["lambert", "constant"])),
        center_values=draw(st.booleans()),
        scale=draw(st.one_of(st.none(), st.floats(0.01, 2.0))),
        key_scale=draw(st.sampled_from([1e-3, 0.3, 1.0, 3.0])),
        value_offset=draw(st.sampled_from([0.0, 5.0, -1e3])),
        seed=draw(st.integers(0, 2**62)),
        data_seed=draw(st.integers(0, 2**31 - 1)),
        dtype=dtype if dtype is not None else draw(st.sampled_from(DTYPES)),
    )


def make_inputs(p):
    gen = torch.Generator().manual_seed(p["data_seed"])
    lead = p["lead"]
    q_lead = (*lead[:-1], lead[-1] * p["heads_per_kv"]) if lead else ()

    def draw(*shape, scale=1.0, offset=0.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale + offset).to(p["dtype"])

    q = draw(*q_lead, p["m"], p["e"], scale=p["key_scale"])
    k = draw(*lead, p["n"], p["e"], scale=p["key_scale"])
    v = draw(*lead, p["n"], p["dv"], offset=p["value_offset"])
    return q, k, v


def run_ops(p, q, k, v):
    kv_heads = k.shape[-3] if k.dim() >= 3 else None
    q_norm = wildcat.query_norm_per_kv_head(q, kv_heads)
    core = wildcat.ops.compress_kv(k, v, p["rank"], p["bins"], p["scale"], q_norm, p["seed"], p["tau"],
                                   p["center_values"])
    out = wildcat.ops.coreset_attention(q, core.core_keys, core.core_values, core.core_weights, p["scale"],
                                        core.value_min, core.value_max, p["center_values"])
    return q_norm, core, out


def check_invariants(p, q, k, v, core, out):
    lead, kept = p["lead"], min(p["rank"], p["n"])
    acc = torch.float64 if p["dtype"] == torch.float64 else torch.float32
    assert core.core_keys.shape == (*lead, kept, p["e"]) and core.core_keys.dtype == p["dtype"]
    assert core.core_values.shape == (*lead, kept, p["dv"]) and core.core_values.dtype == acc
    assert core.core_weights.shape == (*lead, kept) and core.core_weights.dtype == acc
    assert core.core_indices.shape == (*lead, kept) and core.core_indices.dtype == torch.int64
    assert ((core.core_indices >= 0) & (core.core_indices < p["n"])).all()
    assert torch.isfinite(core.core_values).all() and torch.isfinite(core.core_weights).all()
    assert out.shape == (*q.shape[:-1], p["dv"]) and out.dtype == p["dtype"]
    assert torch.isfinite(out).all()
    lo = v.amin(-2, keepdim=True)
    hi = v.amax(-2, keepdim=True)
    if lead:
        lo, hi = lo.repeat_interleave(p["heads_per_kv"], -3), hi.repeat_interleave(p["heads_per_kv"], -3)
    assert (out >= lo).all() and (out <= hi).all()


def pivot_kernel_inverse_size(p, k, q_norm, core_indices):
    """κ = the largest |entry| of G_SS^-1 over every compressed bin: how much rounding the Nyström
    weights may amplify (ALGORITHM.md §2.5-2.8, recomputed in float64 from the pivots)."""
    n, e = p["n"], p["e"]
    keys = k.reshape(-1, n, e)
    centred = keys - keys.mean(1, keepdim=True)
    pivots = core_indices.reshape(keys.shape[0], -1)
    beta = 1 / math.sqrt(e) if p["scale"] is None else p["scale"]
    lengths, slots = ref.balanced_sizes(n, p["bins"]), ref.balanced_sizes(p["rank"], p["bins"])
    kappa, start, first = 1.0, 0, 0
    for length, slot in zip(lengths, slots):
        taken = min(length, slot)
        if length > slot:
            kc = centred[:, start:start + length]
            key_norm = kc.norm(dim=-1).amax(-1)
            rq = key_norm if q_norm is None else q_norm.reshape(-1).double()
            m = ref.key_scale(beta, rq, key_norm, torch.full_like(key_norm, length), p["tau"])
            x = m[:, None, None] * kc
            local = pivots[:, first:first + slot] - start
            xs = x.gather(1, local[..., None].expand(-1, -1, e))
            gram = torch.exp(-((xs[:, :, None] - xs[:, None]) ** 2).sum(-1) / 2)
            for g in range(gram.shape[0]):  # slots after an early stop repeat the first pivot
                distinct = (local[g] != local[g, 0]).nonzero().flatten()
                count = 1 + len(distinct)
                kappa = max(kappa, float(torch.linalg.inv(gram[g, :count, :count]).abs().max()))
        start += length
        first += taken
    return kappa


def check_against_oracle(p, q, k, v, q_norm, core, out):
    want = ref.compress_kv(k, v, p["rank"], p["bins"], p["scale"], q_norm, p["seed"], p["tau"], p["center_values"])
    assert torch.equal(core.core_indices, want.core_indices), "pivots differ from the oracle's"
    assert torch.equal(core.core_keys, want.core_keys)
    # 1e-9 where G_SS is well conditioned; the bordered inverse is accurate to about eps·κ² and
    # fuzzing found ill-conditioned bins at the default tol (test_regression_ill_conditioned_coreset)
    # (the factor 64 is empirical: the CI run measured up to 21 eps·κ²)
    kappa = pivot_kernel_inverse_size(p, k, q_norm, core.core_indices)
    rel = max(1e-9, 64 * torch.finfo(torch.float64).eps * kappa**2)
    for name in ("core_values", "core_weights", "value_min", "value_max"):
        got, exp = getattr(core, name), getattr(want, name)
        tol = rel * max(1.0, float(exp.abs().max())) if exp.numel() else 0.0
        torch.testing.assert_close(got, exp, atol=tol, rtol=0, msg=name)
    want_out = ref.coreset_attention(q, want.core_keys, want.core_values, want.core_weights, p["scale"],
                                     want.value_min, want.value_max, p["center_values"])
    tol = rel * max(1.0, float(v.abs().max()))
    torch.testing.assert_close(out, want_out, atol=tol, rtol=0)


@settings(settings.get_profile(PROFILE))
@given(problems(dtype=torch.float64))
def test_fuzz_float64_matches_oracle(p):
    q, k, v = make_inputs(p)
    q_norm, core, out = run_ops(p, q, k, v)
    check_invariants(p, q, k, v, core, out)
    check_against_oracle(p, q, k, v, q_norm, core, out)


@settings(settings.get_profile(PROFILE))
@given(problems())
def test_fuzz_invariants_every_dtype(p):
    q, k, v = make_inputs(p)
    _, core, out = run_ops(p, q, k, v)
    check_invariants(p, q, k, v, core, out)
    if p["rank"] >= p["n"]:  # r >= N is exact attention: within the dtype's attention error
        exact = ref.exact_attention(q.double(), k.double(), v.double(), p["scale"])
        # float32 internals on the value spread, plus one unit in the last place of the output
        # (found: float16 values near -1000 round to steps of 0.5; test_regression_float16_output_rounding)
        internal = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}[p["dtype"]]
        spread = max(1.0, float((v.double().amax(-2) - v.double().amin(-2)).abs().max()))
        ulp = torch.finfo(p["dtype"]).eps * float(v.double().abs().max())
        torch.testing.assert_close(out.double(), exact, atol=internal * spread + ulp, rtol=0)


@settings(settings.get_profile(PROFILE))
@given(
    lead=st.lists(st.integers(1, 3), max_size=2),
    n=st.integers(1, 200),
    dim=st.integers(1, 64),
    rank=st.integers(1, 40),
    point_scale=st.sampled_from([0.0, 1e-3, 0.5, 2.0]),
    # tol < 1e-5 is left to the regression tests below: residuals near rounding stay candidates
    # (pivots then depend on summation order) and kinv is determined only to about eps·κ²
    tol=st.sampled_from([1e-5, 1e-3, 0.1]),
    seed=st.integers(0, 2**62),
    data_seed=st.integers(0, 2**31 - 1),
)
def test_fuzz_rp_nystrom_float64_matches_oracle(lead, n, dim, rank, point_scale, tol, seed, data_seed):
    gen = torch.Generator().manual_seed(data_seed)
    x = torch.randn(*lead, n, dim, generator=gen, dtype=torch.float64) * point_scale
    pivots, kinv, rows = torch.ops.wildcat.rp_nystrom(x, rank, torch.tensor(seed), tol)
    want = ref.rp_nystrom(x, rank, seed, tol)
    assert torch.equal(pivots, want[0]), "pivots differ from the oracle's"
    # kinv = G_SS^-1 grows by bordering: each step divides by a residual d_p > tol computed by
    # cancellation, so its relative rounding compounds to about eps·κ², κ = the largest entry of
    # kinv (test_regression_ill_conditioned_kinv)
    kappa = max(1.0, float(want[1].abs().max()))
    rel = max(1e-9, 16 * torch.finfo(torch.float64).eps * kappa**2)
    torch.testing.assert_close(kinv, want[1], atol=rel * kappa, rtol=0)
    torch.testing.assert_close(rows, want[2], atol=1e-9, rtol=0)


def test_regression_tol_zero_still_gives_a_finite_valid_factorisation():
    """Found by fuzzing (n=6, dim=1, tol=0): with no residual threshold, points already represented
    to rounding (residual ~1e-17) remain candidates and the op and the oracle can pick different
    ones. What must hold whatever the rounding: valid distinct pivots, finite kinv and rows."""
    x = torch.randn(6, 1, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 0.5
    for seed in range(20):
        pivots, kinv, rows = torch.ops.wildcat.rp_nystrom(x, 5, torch.tensor(seed), 0.0)
        assert pivots.unique().numel() == 5 and ((pivots >= 0) & (pivots < 6)).all()
        assert torch.isfinite(kinv).all() and torch.isfinite(rows).all()
        assert (rows <= 1).all() and (rows >= 0).all()


def test_regression_ill_conditioned_kinv():
    """Found by fuzzing (n=3, dim=1, points ~1e-3 apart, tol=0; n=6, tol=1e-8): G_SS is
    ill-conditioned (largest entry of its inverse 1e5..1e11) and the op's and the oracle's kinv
    differ by up to 2e-5 relative from summation order alone, while pivots and rows agree: the
    bordered inverse is accurate to about eps·κ², not eps·κ (docs/RELIABILITY.md). With
    well-separated points they agree to 1e-12."""
    x = torch.randn(3, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 1e-3
    pivots, kinv, rows = torch.ops.wildcat.rp_nystrom(x, 3, torch.tensor(1), 0.0)
    want = ref.rp_nystrom(x, 3, 1, 0.0)
    assert torch.equal(pivots, want[0])
    torch.testing.assert_close(rows, want[2], atol=1e-15, rtol=0)
    kappa = float(want[1].abs().max())
    assert kappa > 1e10 and torch.isfinite(kinv).all()
    torch.testing.assert_close(kinv, want[1], atol=16 * torch.finfo(torch.float64).eps * kappa**3, rtol=0)
    well = torch.randn(40, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    got, exp = torch.ops.wildcat.rp_nystrom(well, 8, torch.tensor(2), 0.0), ref.rp_nystrom(well, 8, 2, 0.0)
    assert torch.equal(got[0], exp[0])
    torch.testing.assert_close(got[1], exp[1], atol=1e-12, rtol=0)


def test_regression_float16_output_rounding():
    """Found by fuzzing: two float16 values near -1000, r = N: exact attention is -1000.25, the
    float16 output -1000 is its nearest representable (steps of 0.5 there), not an error."""
    q = torch.tensor([[[0.0]]], dtype=torch.float16)
    k = torch.tensor([[[0.001], [0.0]]], dtype=torch.float16)
    v = torch.tensor([[[-999.5], [-1001.0]]], dtype=torch.float16)
    out = wildcat.scaled_dot_product_attention(q, k, v, r=2, seed=0)
    exact = ref.exact_attention(q.double(), k.double(), v.double())
    assert float(exact) == -1000.25 and float(out) == float(exact.to(torch.float16))


def test_regression_ill_conditioned_coreset():
    """Found by fuzzing (E = 1, 26 keys at scale 0.3, r = 4, default tol): the pivots' Gaussian
    kernel is ill-conditioned and float64 core values differ from the oracle's by 5e-7 relative,
    within eps·κ², while the pivots agree exactly."""
    p = dict(lead=(1,), n=26, e=1, dv=1, rank=4, bins=1, heads_per_kv=1, m=1, tau="lambert",
             center_values=False, scale=None, key_scale=0.3, value_offset=0.0, seed=0, data_seed=0,
             dtype=torch.float64)
    q, k, v = make_inputs(p)
    q_norm, core, out = run_ops(p, q, k, v)
    kappa = pivot_kernel_inverse_size(p, k, q_norm, core.core_indices)
    assert kappa > 1e3  # the case is ill-conditioned, which is what it stands for
    check_against_oracle(p, q, k, v, q_norm, core, out)
