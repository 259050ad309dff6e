"""The split-entries (decode) path of coreset_attention on CUDA: few queries per kv head
(Hq / Hkv · M <= 16) over any number of entries, strided entry views (a cache's buffers)."""

import pytest
import torch

import wildcat
from wildcat import reference as ref

from conftest import randn

pytestmark = pytest.mark.cuda


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(
    "hq,hkv,m,e,dv,entries",
    [(32, 8, 1, 128, 128, 577), (4, 4, 1, 64, 64, 3), (8, 2, 4, 96, 40, 1000), (2, 1, 8, 256, 256, 70),
     (16, 1, 1, 64, 32, 20000)],
)
@pytest.mark.parametrize("center", [False, True])
def test_decode_path_against_the_oracle(dtype, hq, hkv, m, e, dv, entries, center):
    """The 2x rule against plain PyTorch at the same dtype (float64 oracle), signed weights."""
    q = randn(2, hq, m, e, dtype=dtype)
    keys = randn(2, hkv, entries, e, dtype=dtype)
    values = randn(2, hkv, entries, dv) * 3
    weights = torch.rand(2, hkv, entries) * 1.5 - 0.25
    vmin, vmax = values.amin(-2) - 1, values.amax(-2) + 1
    out = wildcat.ops.coreset_attention(q.cuda(), keys.cuda(), values.cuda(), weights.cuda(), None, vmin.cuda(),
                                        vmax.cuda(), center).cpu()
    exact64 = ref.coreset_attention(q.double(), keys.double(), values.double(), weights.double(), None,
                                    vmin.double(), vmax.double(), center)
    plain = ref.coreset_attention(q, keys, values, weights, None, vmin, vmax, center)
    err = (out.double() - exact64).abs().max()
    err_plain = (plain.double() - exact64).abs().max()
    assert err <= 2 * err_plain, (float(err), float(err_plain))


def test_strided_entry_views_equal_contiguous_copies():
    # the live prefix of over-allocated buffers, as a growing cache holds them
    buffer_k = randn(2, 8, 900, 128, dtype=torch.bfloat16, device="cuda")
    buffer_v = randn(2, 8, 900, 128, device="cuda")
    buffer_w = torch.rand(2, 8, 900, device="cuda")
    q = randn(2, 32, 1, 128, dtype=torch.bfloat16, device="cuda")
    views = buffer_k[:, :, :577], buffer_v[:, :, :577], buffer_w[:, :, :577]
    assert not views[0].is_contiguous()
    got = wildcat.ops.coreset_attention(q, *views)
    want = wildcat.ops.coreset_attention(q, *(t.contiguous() for t in views))
    assert torch.equal(got, want)


def test_decode_path_is_deterministic_and_graph_capturable():
    q = randn(1, 32, 1, 128, dtype=torch.bfloat16, device="cuda")
    keys = randn(1, 8, 577, 128, dtype=torch.bfloat16, device="cuda")
    values, weights = randn(1, 8, 577, 128, device="cuda"), torch.rand(1, 8, 577, device="cuda")
    eager = wildcat.ops.coreset_attention(q, keys, values, weights)
    assert torch.equal(eager, wildcat.ops.coreset_attention(q, keys, values, weights))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        wildcat.ops.coreset_attention(q, keys, values, weights)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = wildcat.ops.coreset_attention(q, keys, values, weights)
    q.copy_(randn(1, 32, 1, 128, dtype=torch.bfloat16, device="cuda"))
    graph.replay()
    assert torch.equal(captured, wildcat.ops.coreset_attention(q, keys, values, weights))


def test_misaligned_entry_views_equal_contiguous_copies():
    """Views whose rows are not 16-byte aligned take the element-wise copy instead of cp.async."""
    buffer_k = randn(1, 8, 600, 129, dtype=torch.bfloat16, device="cuda")
    buffer_v = randn(1, 8, 600, 129, device="cuda")
    buffer_w = torch.rand(1, 8, 600, device="cuda")
    q = randn(1, 32, 1, 128, dtype=torch.bfloat16, device="cuda")
    views = buffer_k[:, :, :577, 1:], buffer_v[:, :, :577, 1:], buffer_w[:, :, :577]
    assert views[0].data_ptr() % 16 != 0
    got = wildcat.ops.coreset_attention(q, *views)
    want = wildcat.ops.coreset_attention(q, *(t.contiguous() for t in views))
    assert torch.equal(got, want)


@pytest.mark.parametrize("batch,entries", [(1, 577), (6, 577), (40, 300), (3, 5000)])
def test_decode_path_any_number_of_groups(batch, entries):
    """One CTA per group when the groups fill the GPU, clusters of up to 8 when they do not, and
    spans longer than one shared-memory chunk: all within the 2x rule."""
    q = randn(batch, 32, 1, 128, dtype=torch.bfloat16)
    keys = randn(batch, 8, entries, 128, dtype=torch.bfloat16)
    values = randn(batch, 8, entries, 128)
    weights = torch.rand(batch, 8, entries) * 1.5 - 0.25
    vmin, vmax = values.amin(-2) - 1, values.amax(-2) + 1
    out = wildcat.ops.coreset_attention(q.cuda(), keys.cuda(), values.cuda(), weights.cuda(), None, vmin.cuda(),
                                        vmax.cuda()).cpu()
    exact64 = ref.coreset_attention(q.double(), keys.double(), values.double(), weights.double(), None,
                                    vmin.double(), vmax.double())
    plain = ref.coreset_attention(q, keys, values, weights, None, vmin, vmax)
    assert (out.double() - exact64).abs().max() <= 2 * (plain.double() - exact64).abs().max()
