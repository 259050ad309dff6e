"""The Python API: SDPA compatibility, the module, seeding, layouts and empty inputs."""

import inspect

import pytest
import torch

import wildcat
from wildcat import reference as ref

from conftest import randn


def test_signature_matches_torch_sdpa():
    ours = list(inspect.signature(wildcat.scaled_dot_product_attention).parameters)
    theirs = ["query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa"]
    assert ours[: len(theirs)] == theirs
    for name in ours[len(theirs):]:
        assert inspect.signature(wildcat.scaled_dot_product_attention).parameters[name].kind is inspect.Parameter.KEYWORD_ONLY


def test_generator_gives_reproducible_results_and_default_draws_fresh_seeds():
    q, k, v = randn(1, 2, 30, 16), randn(1, 2, 300, 16), randn(1, 2, 300, 16)
    a = wildcat.scaled_dot_product_attention(q, k, v, r=16, generator=torch.Generator().manual_seed(3))
    b = wildcat.scaled_dot_product_attention(q, k, v, r=16, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    c = wildcat.scaled_dot_product_attention(q, k, v, r=16)
    d = wildcat.scaled_dot_product_attention(q, k, v, r=16)
    assert not torch.equal(c, d)
    torch.manual_seed(5)
    e = wildcat.scaled_dot_product_attention(q, k, v, r=16)
    torch.manual_seed(5)
    assert torch.equal(e, wildcat.scaled_dot_product_attention(q, k, v, r=16))
    with pytest.raises(ValueError, match="seed or generator"):
        wildcat.scaled_dot_product_attention(q, k, v, seed=1, generator=torch.Generator())


def test_module_matches_the_function_and_validates_settings():
    q, k, v = randn(2, 4, 20, 32), randn(2, 4, 100, 32), randn(2, 4, 100, 16)
    module = wildcat.WildCat(r=24, num_bins=2, seed=9)
    expected = wildcat.scaled_dot_product_attention(q, k, v, r=24, num_bins=2, seed=9)
    assert torch.equal(module(q, k, v), expected)
    assert "r=24" in repr(module) and "num_bins=2" in repr(module)
    for kwargs, error in [({"r": 0}, ValueError), ({"num_bins": 0}, ValueError), ({"scale": -1.0}, ValueError),
                          ({"tau": "bogus"}, ValueError), ({"r": 2.5}, TypeError)]:
        with pytest.raises(error):
            wildcat.WildCat(**kwargs)


def test_compress_then_attend_equals_the_one_call():
    q, k, v = randn(2, 8, 20, 32), randn(2, 2, 150, 32), randn(2, 2, 150, 16)
    kv = wildcat.compress_kv(k, v, 32, 4, query_norm=wildcat.query_norm_per_kv_head(q, 2), seed=4)
    assert isinstance(kv, wildcat.CompressedKV)
    out = wildcat.coreset_attention(q, kv)
    assert torch.equal(out, wildcat.scaled_dot_product_attention(q, k, v, enable_gqa=True, r=32, num_bins=4, seed=4))


def test_rank2_and_extra_leading_dims():
    q, k, v = randn(10, 16, dtype=torch.float64), randn(60, 16, dtype=torch.float64), randn(60, 8, dtype=torch.float64)
    out = wildcat.scaled_dot_product_attention(q, k, v, r=12, seed=1)
    assert out.shape == (10, 8)
    torch.testing.assert_close(out, ref.wildcat_attention(q, k, v, 12, seed=1), atol=1e-10, rtol=0)
    q5, k5, v5 = randn(2, 3, 2, 10, 16), randn(2, 3, 2, 60, 16), randn(2, 3, 2, 60, 8)
    assert wildcat.scaled_dot_product_attention(q5, k5, v5, r=12).shape == (2, 3, 2, 10, 8)


def test_non_contiguous_and_expanded_inputs_work():
    # (B, N, H, E) transposed to (B, H, N, E), as models lay attention out
    q = randn(2, 40, 4, 32).transpose(1, 2)
    k = randn(2, 200, 4, 32).transpose(1, 2)
    v = randn(2, 200, 4, 16).transpose(1, 2)
    assert not q.is_contiguous()
    got = wildcat.scaled_dot_product_attention(q, k, v, r=16, num_bins=2, seed=6)
    want = wildcat.scaled_dot_product_attention(q.contiguous(), k.contiguous(), v.contiguous(), r=16, num_bins=2, seed=6)
    assert torch.equal(got, want)
    # expanded (stride-0) batch dims
    k1, v1 = randn(1, 4, 200, 32), randn(1, 4, 200, 16)
    got = wildcat.scaled_dot_product_attention(q, k1.expand(2, -1, -1, -1), v1.expand(2, -1, -1, -1), r=16, seed=6)
    want = wildcat.scaled_dot_product_attention(q, k1.repeat(2, 1, 1, 1), v1.repeat(2, 1, 1, 1), r=16, seed=6)
    assert torch.equal(got, want)


@pytest.mark.parametrize("m,n", [(0, 50), (7, 0), (0, 0)])
def test_empty_sequences_return_what_sdpa_returns(m, n):
    q, k, v = randn(2, 3, m, 16), randn(2, 3, n, 16), randn(2, 3, n, 8)
    out = wildcat.scaled_dot_product_attention(q, k, v, r=8)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert out.shape == expected.shape == (2, 3, m, 8)
    assert torch.equal(out, expected)


def test_forward_works_with_grad_inputs_and_backward_says_why_not():
    q, k, v = (randn(1, 2, 30, 16).requires_grad_() for _ in range(3))
    out = wildcat.scaled_dot_product_attention(q, k, v, r=8)
    with pytest.raises(RuntimeError, match="wildcat::.* is not implemented"):
        out.sum().backward()


def test_cuda_built_reports_a_bool():
    assert isinstance(wildcat.cuda_built(), bool)
    if not torch.version.cuda:
        assert wildcat.cuda_built() is False


@pytest.mark.parametrize("shape,kv_heads", [((2, 8, 33, 16), 2), ((3, 40, 8), 3), ((7, 16), 1), ((2, 4, 0, 8), 4)])
def test_query_norm_op_equals_the_reference_helper(device, shape, kv_heads):
    """The same ATen reductions as the plain form: bitwise equal on the CPU; on CUDA (float32: the
    ATen form there too) within the rounding of a differently ordered float32 sum."""
    q = randn(*shape, device=device)
    got = wildcat.ops.query_norm(q, kv_heads)
    expected = ref.query_norm_per_kv_head(q.cpu(), kv_heads)
    assert got.shape == expected.shape and got.dtype == expected.dtype
    if device == "cpu":
        assert torch.equal(got, expected)
    else:
        torch.testing.assert_close(got.cpu(), expected, rtol=1e-6, atol=0)
    assert torch.equal(wildcat.query_norm_per_kv_head(q, kv_heads), got)


def test_query_norm_helper_defaults_to_one_group_per_query_head():
    q = randn(2, 6, 9, 8)
    assert torch.equal(wildcat.query_norm_per_kv_head(q), ref.query_norm_per_kv_head(q))
    assert wildcat.query_norm_per_kv_head(q[0, 0]).shape == ()


def test_query_norm_names_bad_kv_heads():
    with pytest.raises(ValueError, match="query heads 6 must be a multiple of kv_heads, got kv_heads = 4"):
        wildcat.ops.query_norm(torch.randn(1, 6, 5, 8), 4)
