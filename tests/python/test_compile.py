"""torch.compile of the module: one graph (fullgraph=True), same results as eager, fresh seeds."""

import pytest
import torch
import torch._dynamo.testing

import wildcat

from conftest import randn


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_module_compiles_to_one_graph_and_matches_eager():
    module = wildcat.WildCat(r=16, num_bins=2, seed=3)
    q, k, v = randn(2, 4, 32, 16), randn(2, 2, 128, 16), randn(2, 2, 128, 8)
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(module, fullgraph=True, backend=counter)
    torch.testing.assert_close(compiled(q, k, v), module(q, k, v), atol=1e-6, rtol=0)
    assert counter.frame_count == 1
    explanation = torch._dynamo.explain(module)(q, k, v)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1


def test_inductor_matches_eager_and_draws_fresh_seeds():
    q, k, v = randn(1, 2, 64, 16), randn(1, 2, 256, 16), randn(1, 2, 256, 16)
    fixed = wildcat.WildCat(r=16, num_bins=2, seed=7)
    torch.testing.assert_close(torch.compile(fixed, fullgraph=True)(q, k, v), fixed(q, k, v), atol=1e-6, rtol=0)
    fresh = torch.compile(wildcat.WildCat(r=16, num_bins=2), fullgraph=True)
    assert not torch.equal(fresh(q, k, v), fresh(q, k, v))


def test_dynamic_sequence_length_does_not_recompile_per_length():
    module = wildcat.WildCat(r=16, seed=1)
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(module, fullgraph=True, backend=counter, dynamic=True)
    frames = []
    for n in (100, 140, 180):
        q, k, v = randn(1, 2, 20, 16), randn(1, 2, n, 16), randn(1, 2, n, 16)
        torch.testing.assert_close(compiled(q, k, v), module(q, k, v), atol=1e-6, rtol=0)
        frames.append(counter.frame_count)
    assert frames[0] >= 1 and frames[1:] == frames[:1] * 2, frames  # compiled once, for all lengths


def test_generator_inside_compile_gives_a_clear_error():
    q = randn(1, 2, 20, 16)
    fn = torch.compile(lambda a, g: wildcat.scaled_dot_product_attention(a, a, a, r=8, generator=g), fullgraph=True)
    with pytest.raises(RuntimeError, match="Generator cannot be used inside torch.compile"):
        fn(q, torch.Generator())


def test_key_padding_mask_compiles_to_one_graph_and_matches_eager():
    q, k, v = randn(2, 4, 12, 32), randn(2, 4, 96, 32), randn(2, 4, 96, 16)
    mask = (torch.arange(96) < torch.tensor([[96], [40]]))[:, None, None, :]
    module = wildcat.WildCat(r=16, num_bins=2, seed=3, fallback="error")
    counter = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(module, fullgraph=True, backend=counter)
    torch.testing.assert_close(compiled(q, k, v, attn_mask=mask), module(q, k, v, attn_mask=mask), atol=1e-6, rtol=0)
    assert counter.frame_count == 1
