"""SDPA's whole signature: key-padding masks (native), the fallback policy for other masks and
is_causal, dropout, short sequences (min_seq_len), and compress_kv's key_mask."""

import warnings

import pytest
import torch
import torch.nn.functional as F

import wildcat
import wildcat.functional
from wildcat import reference as ref

from conftest import LIBRARY_MIN_SEQ_LEN, randn


def padding_mask(lengths, n, left=False):
    """(B, N) bool, True on each row's first (or, left-padded, last) lengths[b] positions."""
    pos = torch.arange(n)
    rows = [(pos >= n - m) if left else (pos < m) for m in lengths]
    return torch.stack(rows)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("left", [False, True])
def test_padded_rows_are_exact_when_r_covers_every_row(device, dtype, left):
    # r >= every row's length: each row is attended exactly, as SDPA does with the same mask
    q, k, v = (randn(3, 2, 7, 16, dtype=dtype, device=device), randn(3, 2, 90, 16, dtype=dtype, device=device),
               randn(3, 2, 90, 8, dtype=dtype, device=device))
    mask = padding_mask([90, 41, 5], 90, left).to(device)[:, None, None, :]
    for bins in (1, 3):
        got = wildcat.scaled_dot_product_attention(q, k, v, attn_mask=mask, r=60, num_bins=bins)
        got[0].zero_()  # row 0 has 90 > r keys: compressed, not exact
        want = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask)
        want[0].zero_()
        tol = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
        torch.testing.assert_close(got.double(), want, atol=tol, rtol=0)


def test_masked_keys_never_enter_the_coreset_and_positions_are_original():
    k, v = randn(2, 3, 200, 16), randn(2, 3, 200, 8)
    mask = torch.rand(2, 3, 200) < 0.4
    kv = wildcat.compress_kv(k, v, r=32, num_bins=4, seed=5, key_mask=mask)
    taken = mask.gather(-1, kv.core_indices)
    assert taken.all()
    torch.testing.assert_close(kv.core_keys, k.gather(-2, kv.core_indices[..., None].expand(-1, -1, -1, 16)))
    # value bounds cover the kept values only
    masked_v = torch.where(mask[..., None], v, torch.inf)
    torch.testing.assert_close(kv.value_min, masked_v.amin(-2))


def test_a_masked_row_equals_its_kept_keys_alone():
    # one group: the kept keys, moved to the front, are compressed with the same random stream
    q, k, v = randn(1, 1, 9, 16), randn(1, 1, 300, 16), randn(1, 1, 300, 8)
    mask = torch.rand(300) < 0.5
    for bins in (1, 4):
        got = wildcat.scaled_dot_product_attention(q, k, v, attn_mask=mask, r=40, num_bins=bins, seed=3)
        alone = wildcat.scaled_dot_product_attention(q, k[..., mask, :], v[..., mask, :], r=40, num_bins=bins, seed=3)
        assert torch.equal(got, alone)


def test_lengths_op_matches_the_oracle(device):
    # float64 against the float64 oracle (other dtypes: test_lengths_equal_the_unpadded_groups)
    dtype = torch.float64
    k, v = randn(2, 3, 120, 16, dtype=dtype, device=device), randn(2, 3, 120, 12, dtype=dtype, device=device)
    lengths = torch.tensor([[120, 77, 0], [3, 64, 31]], device=device)
    qn = randn(2, 3, dtype=dtype, device=device).abs() * 4
    for rank, bins in ((32, 4), (40, 1), (200, 2), (9, 9)):
        got = wildcat.ops.compress_kv(k, v, rank, bins, None, qn, 11, "lambert", False, 1e-5, lengths)
        want = ref.compress_kv(k.cpu(), v.cpu(), rank, bins, None, qn.cpu(), 11, lengths=lengths.cpu())
        assert torch.equal(got.core_indices.cpu(), want.core_indices)
        # r = 40 of 64 keys is ill-conditioned: G_SS^-1 amplifies rounding to ~1e-9 in float64,
        # as much without lengths (the same group unpadded differs from the oracle as much)
        for a, b in zip(got, want):
            torch.testing.assert_close(a.cpu(), b, atol=1e-8, rtol=1e-8)


def test_lengths_equal_the_unpadded_groups(device):
    # every group, padded to N, gives what it gives alone at the same group index
    k, v = randn(4, 100, 16, device=device), randn(4, 100, 8, device=device)
    lengths = torch.tensor([100, 57, 23, 1], device=device)
    got = wildcat.ops.compress_kv(k, v, 16, 2, None, None, 9, "lambert", False, 1e-5, lengths)
    for g, count in enumerate(lengths.tolist()):
        kept = min(16, count)
        if count >= 16:
            alone = wildcat.ops.compress_kv(k[: g + 1, :count], v[: g + 1, :count], 16, 2, None, None, 9)
            assert torch.equal(got.core_indices[g], alone.core_indices[g])
            exact = device.type == "cpu"  # the GPU's group sums split by N and group count: equal to rounding
            for a, b in zip(got, alone):
                if exact:
                    assert torch.equal(a[g], b[g])
                else:
                    torch.testing.assert_close(a[g], b[g], atol=1e-5, rtol=1e-5)
        else:  # every bin exact, spread over the 16 slots; unfilled slots have zero weight
            assert torch.equal(got.core_weights[g].sum(), torch.tensor(float(kept), device=device))
            assert set(got.core_indices[g][got.core_weights[g] == 1].tolist()) == set(range(count))


def test_empty_rows_give_zero():
    q, k, v = randn(2, 1, 4, 8), randn(2, 1, 50, 8), randn(2, 1, 50, 8)
    mask = padding_mask([50, 0], 50)[:, None, None, :]
    out = wildcat.scaled_dot_product_attention(q, k, v, attn_mask=mask, r=8, seed=0)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert torch.isfinite(out).all()


def test_head_specific_padding_masks(device):
    q, k, v = randn(2, 4, 6, 16, device=device), randn(2, 4, 70, 16, device=device), randn(2, 4, 70, 16, device=device)
    mask = torch.rand(2, 4, 1, 70, device=device) < 0.3
    mask[..., 0] = True
    got = wildcat.scaled_dot_product_attention(q, k, v, attn_mask=mask, r=70)
    torch.testing.assert_close(got, F.scaled_dot_product_attention(q, k, v, attn_mask=mask), atol=1e-5, rtol=0)


def test_gqa_with_a_padding_mask_compresses_each_kv_head_once():
    q, k, v = randn(2, 6, 5, 16), randn(2, 2, 80, 16), randn(2, 2, 80, 8)
    mask = padding_mask([80, 33], 80)[:, None, None, :]
    got = wildcat.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True, r=24, num_bins=2, seed=8)
    qn = wildcat.query_norm_per_kv_head(q, 2)
    kv = ref.compress_kv(k, v, 24, 2, None, qn, 8, lengths=torch.tensor([[80, 80], [33, 33]]))
    want = ref.coreset_attention(q, kv.core_keys, kv.core_values, kv.core_weights, None, kv.value_min, kv.value_max)
    torch.testing.assert_close(got, want.float(), atol=2e-5, rtol=0)


@pytest.mark.parametrize(
    "kwargs,reason",
    [
        ({"attn_mask": torch.rand(1, 2, 8, 40) < 0.5}, "attn_mask"),           # per query
        ({"attn_mask": torch.zeros(1, 2, 1, 40)}, "attn_mask"),                # additive float
        ({"is_causal": True}, "is_causal"),
    ],
)
def test_unsupported_masks_follow_the_fallback_policy(kwargs, reason, monkeypatch):
    q, k, v = randn(1, 2, 8, 16), randn(1, 2, 40, 16), randn(1, 2, 40, 16)
    monkeypatch.setattr(wildcat.functional, "_warned", set())
    with pytest.warns(UserWarning, match=reason):
        got = wildcat.scaled_dot_product_attention(q, k, v, r=4, **kwargs)
    assert torch.equal(got, F.scaled_dot_product_attention(q, k, v, **kwargs))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per reason
        wildcat.scaled_dot_product_attention(q, k, v, r=4, **kwargs)
    with pytest.raises(NotImplementedError, match=reason):
        wildcat.scaled_dot_product_attention(q, k, v, r=4, fallback="error", **kwargs)


def test_per_query_head_mask_under_gqa_falls_back():
    q, k, v = randn(1, 4, 3, 8), randn(1, 2, 30, 8), randn(1, 2, 30, 8)
    mask = torch.rand(1, 4, 1, 30) < 0.5
    with pytest.raises(NotImplementedError, match="attn_mask"):
        wildcat.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True, fallback="error")


def test_dropout_and_bad_arguments_raise():
    q = randn(1, 2, 8, 16)
    with pytest.raises(ValueError, match="dropout_p"):
        wildcat.scaled_dot_product_attention(q, q, q, dropout_p=0.1)
    with pytest.raises(ValueError, match="fallback"):
        wildcat.scaled_dot_product_attention(q, q, q, fallback="ignore")
    with pytest.raises(ValueError, match="min_seq_len"):
        wildcat.scaled_dot_product_attention(q, q, q, min_seq_len=-1)
    with pytest.raises(ValueError, match="attn_mask"):
        wildcat.scaled_dot_product_attention(q, q, q, attn_mask=torch.ones(3, 8, dtype=torch.bool))
    with pytest.raises(TypeError, match="attn_mask"):
        wildcat.scaled_dot_product_attention(q, q, q, attn_mask=torch.ones(8, dtype=torch.int64))
    with pytest.raises(TypeError, match="key_mask"):
        wildcat.compress_kv(q, q, key_mask=torch.ones(8))
    with pytest.raises(ValueError, match="key_mask"):
        wildcat.compress_kv(q, q, key_mask=torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="lengths"):
        wildcat.ops.compress_kv(q, q, 4, 1, None, None, 0, "lambert", False, 1e-5, torch.tensor([[9, 2]]))
    with pytest.raises(ValueError, match="lengths"):
        wildcat.ops.compress_kv(q, q, 4, 1, None, None, 0, "lambert", False, 1e-5, torch.tensor([9, 2]))
    with pytest.raises(TypeError, match="lengths"):
        wildcat.ops.compress_kv(q, q, 4, 1, None, None, 0, "lambert", False, 1e-5, torch.tensor([[8.0, 2.0]]))
    with pytest.raises(ValueError, match="fallback"):
        wildcat.WildCat(fallback="no")


def test_short_sequences_run_exact_attention(monkeypatch):
    q, k, v = randn(1, 2, 8, 16), randn(1, 2, 300, 16), randn(1, 2, 300, 16)
    exact = F.scaled_dot_product_attention(q, k, v)
    assert torch.equal(wildcat.scaled_dot_product_attention(q, k, v, r=8, min_seq_len=301), exact)
    assert not torch.equal(wildcat.scaled_dot_product_attention(q, k, v, r=8, min_seq_len=300), exact)
    # the library default applies when min_seq_len is None
    monkeypatch.setattr(wildcat.functional, "DEFAULT_MIN_SEQ_LEN", LIBRARY_MIN_SEQ_LEN)
    assert LIBRARY_MIN_SEQ_LEN > 300
    assert torch.equal(wildcat.scaled_dot_product_attention(q, k, v, r=8), exact)
    assert torch.equal(wildcat.WildCat(r=8)(q, k, v), exact)
    assert not torch.equal(wildcat.WildCat(r=8, min_seq_len=0)(q, k, v), exact)


def test_module_passes_masks_and_options():
    q, k, v = randn(2, 2, 5, 16), randn(2, 2, 64, 16), randn(2, 2, 64, 16)
    mask = padding_mask([64, 20], 64)[:, None, None, :]
    module = wildcat.WildCat(r=16, num_bins=2, seed=4, fallback="error")
    want = wildcat.scaled_dot_product_attention(q, k, v, attn_mask=mask, r=16, num_bins=2, seed=4)
    assert torch.equal(module(q, k, v, attn_mask=mask), want)
    with pytest.raises(NotImplementedError, match="is_causal"):
        module(q, k, v, is_causal=True)
    assert "fallback='error'" in repr(module)


def test_transposed_layouts_need_no_copy_of_the_caller():
    # (B, N, H, E) tensors viewed as (B, H, N, E), as models produce them
    q, k, v = randn(2, 10, 3, 16).transpose(1, 2), randn(2, 70, 3, 16).transpose(1, 2), randn(2, 70, 3, 16).transpose(1, 2)
    mask = padding_mask([70, 30], 70)[:, None, None, :]
    got = wildcat.scaled_dot_product_attention(q, k, v, attn_mask=mask, r=16, seed=2)
    want = wildcat.scaled_dot_product_attention(q.contiguous(), k.contiguous(), v.contiguous(), attn_mask=mask, r=16, seed=2)
    assert torch.equal(got, want)
