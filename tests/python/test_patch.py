"""wildcat.patch: torch.nn.functional.scaled_dot_product_attention rerouted to WildCat, and put back."""

import pytest
import torch
import torch._dynamo.testing
import torch.nn.functional as F
from torch import nn

import wildcat
from wildcat.patching import key_padding_mask

from conftest import randn

EXACT = F.scaled_dot_product_attention  # bound before any patch: the original


class TinyAttention(nn.Module):
    """Calls SDPA the way most models do: through the torch.nn.functional module at call time."""

    def forward(self, q, k, v, mask=None, is_causal=False):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)


def qkv(m=12, n=96):
    return randn(2, 3, m, 16), randn(2, 3, n, 16), randn(2, 3, n, 8)


@pytest.fixture(autouse=True)
def unpatched():
    assert F.scaled_dot_product_attention is EXACT
    yield
    assert F.scaled_dot_product_attention is EXACT, "a test left torch's SDPA patched"


def test_patched_calls_run_wildcat_and_r_at_least_n_is_exact():
    q, k, v = qkv()
    model = TinyAttention()
    with wildcat.patch(r=8, seed=3, min_seq_len=0):
        approx = model(q, k, v)
    assert torch.equal(approx, wildcat.scaled_dot_product_attention(q, k, v, r=8, seed=3, min_seq_len=0))
    assert not torch.allclose(approx, EXACT(q, k, v), atol=1e-3)
    with wildcat.patch(r=96, min_seq_len=0):
        torch.testing.assert_close(model(q, k, v), EXACT(q, k, v), atol=1e-5, rtol=1e-5)
    assert torch.equal(model(q, k, v), EXACT(q, k, v))  # restored


def test_plain_call_returns_a_handle_and_unpatch_is_idempotent():
    handle = wildcat.patch(r=8, seed=1, min_seq_len=0)
    try:
        assert F.scaled_dot_product_attention is not EXACT and handle.active
    finally:
        handle.unpatch()
    handle.unpatch()
    assert not handle.active and "active=False" in repr(handle)


def test_exception_inside_the_block_restores_the_original():
    with pytest.raises(ZeroDivisionError):
        with wildcat.patch(r=8):
            1 / 0
    # the autouse fixture checks the attribute is the original again


def test_nested_patches_innermost_wins_and_any_release_order_is_safe():
    q, k, v = qkv()
    model = TinyAttention()
    with wildcat.patch(r=8, seed=1, min_seq_len=0):
        with wildcat.patch(r=16, seed=2, min_seq_len=0):
            inner = model(q, k, v)
        outer = model(q, k, v)
    assert torch.equal(inner, wildcat.scaled_dot_product_attention(q, k, v, r=16, seed=2, min_seq_len=0))
    assert torch.equal(outer, wildcat.scaled_dot_product_attention(q, k, v, r=8, seed=1, min_seq_len=0))
    first, second = wildcat.patch(r=8, seed=1, min_seq_len=0), wildcat.patch(r=16, seed=2, min_seq_len=0)
    first.unpatch()  # released out of order: the other one stays in force
    assert torch.equal(model(q, k, v), inner)
    second.unpatch()


def test_model_scoped_patch_reroutes_only_that_model_even_when_it_raises():
    q, k, v = qkv()
    patched, other = TinyAttention(), TinyAttention()
    with wildcat.patch(patched, r=8, seed=5, min_seq_len=0) as handle:
        assert F.scaled_dot_product_attention is EXACT  # swapped only while its forward runs
        assert torch.equal(patched(q, k, v), wildcat.scaled_dot_product_attention(q, k, v, r=8, seed=5,
                                                                                   min_seq_len=0))
        assert torch.equal(other(q, k, v), EXACT(q, k, v))
        with pytest.raises(ValueError):
            patched(q, k[..., :5], v)  # E mismatch raises inside the forward
        assert F.scaled_dot_product_attention is EXACT
    assert not handle.active and not patched._forward_pre_hooks and not patched._forward_hooks
    assert torch.equal(patched(q, k, v), EXACT(q, k, v))


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda: wildcat.patch(rr=8), TypeError, r"unknown WildCat option\(s\) \['rr'\]"),
        (lambda: wildcat.patch(scale=0.5), TypeError, "scale"),  # SDPA's caller passes the scale
        (lambda: wildcat.patch(r=0), ValueError, "r must be >= 1"),
        (lambda: wildcat.patch(tau="bogus"), ValueError, "tau"),
        (lambda: wildcat.patch("model"), TypeError, "model must be a torch.nn.Module"),
    ],
)
def test_bad_options_are_rejected_before_patching(call, error, match):
    with pytest.raises(error, match=match):
        call()


def padding(lengths, n):
    """Boolean (B, N) mask: True for the first lengths[b] keys."""
    return torch.arange(n)[None, :] < torch.tensor(lengths)[:, None]


def test_key_padding_mask_recognises_boolean_and_additive_padding_only():
    keep = padding([5, 7], 7)                                     # (B, N)
    full = keep[:, None, None, :].expand(2, 1, 4, 7)              # (B, 1, M, N), rows equal
    assert key_padding_mask(None) is None
    assert torch.equal(key_padding_mask(full), keep[:, None, None, :])
    for masked_value in (float("-inf"), torch.finfo(torch.float32).min, -1e4):
        additive = torch.zeros(2, 1, 4, 7).masked_fill(~full, masked_value)
        assert torch.equal(key_padding_mask(additive), keep[:, None, None, :])
    already = keep[:, None, None, :]
    assert key_padding_mask(already) is already
    causal = torch.ones(4, 4, dtype=torch.bool).tril()            # per-query: not a padding mask
    assert key_padding_mask(causal) is causal
    bias = torch.zeros(2, 1, 4, 7).masked_fill(~full, -5.0)      # a finite bias changes exact attention
    assert key_padding_mask(bias) is bias
    one_row_bias = torch.full((2, 1, 1, 7), 0.5)
    assert key_padding_mask(one_row_bias) is one_row_bias


def test_padding_masks_take_the_native_path():
    q, k, v = qkv()
    keep = padding([96, 70], 96)
    native = wildcat.scaled_dot_product_attention(q, k, v, keep[:, None, None, :], r=8, seed=4, min_seq_len=0)
    model = TinyAttention()
    bool_full = keep[:, None, None, :].expand(2, 1, 12, 96)
    additive = torch.zeros(2, 1, 12, 96).masked_fill(~bool_full, float("-inf"))
    with wildcat.patch(r=8, seed=4, min_seq_len=0, fallback="error"):
        assert torch.equal(model(q, k, v, bool_full), native)
        assert torch.equal(model(q, k, v, additive), native)
    with wildcat.patch(r=96, min_seq_len=0, fallback="error"):
        torch.testing.assert_close(model(q, k, v, additive), EXACT(q, k, v, additive), atol=1e-5, rtol=1e-5)


def test_other_masks_and_causal_follow_the_fallback_policy(monkeypatch):
    monkeypatch.setattr(wildcat.functional, "_warned", set())  # the warnings are once per process
    q, k, v = qkv(m=96)
    model = TinyAttention()
    causal = torch.ones(96, 96, dtype=torch.bool).tril()
    with wildcat.patch(r=8, min_seq_len=0):
        with pytest.warns(UserWarning, match="is_causal=True is not supported"):
            torch.testing.assert_close(model(q, k, v, is_causal=True), EXACT(q, k, v, is_causal=True))
        with pytest.warns(UserWarning, match="not a boolean key-padding mask"):
            torch.testing.assert_close(model(q, k, v, causal), EXACT(q, k, v, causal))
    with wildcat.patch(r=8, min_seq_len=0, fallback="error"):
        with pytest.raises(NotImplementedError):
            model(q, k, v, is_causal=True)
        with pytest.raises(NotImplementedError):
            model(q, k, v, causal)


def test_compiled_model_under_a_patch_is_one_graph_and_matches_eager():
    torch._dynamo.reset()
    q, k, v = qkv()
    model = TinyAttention()
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    try:
        with wildcat.patch(r=8, seed=6, min_seq_len=0):
            compiled = torch.compile(model, fullgraph=True, backend=counter)(q, k, v)
            eager = model(q, k, v)
        assert counter.frame_count == 1
        torch.testing.assert_close(compiled, eager, atol=1e-6, rtol=0)
    finally:
        torch._dynamo.reset()
