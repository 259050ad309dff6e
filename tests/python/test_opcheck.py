"""torch.library.opcheck on every op: schema, fake kernels, autograd registration, AOT dispatch."""

import pytest
import torch

import wildcat  # noqa: F401

from conftest import randn


def seed(value):
    return torch.tensor(value, dtype=torch.int64)


def samples(device):
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        k, v = randn(2, 3, 50, 16, dtype=dtype, device=device), randn(2, 3, 50, 8, dtype=dtype, device=device)
        q = randn(2, 6, 9, 16, dtype=dtype, device=device)
        q_norm = torch.rand(2, 3, device=device) + 1
        yield "compress_kv", (k, v, 12, 3, None, q_norm, seed(5), "lambert", False, 1e-5)
        yield "compress_kv", (k, v, 60, 1, 0.3, None, None, "constant", True, 1e-5)
        lengths = torch.tensor([[50, 31, 0], [7, 12, 49]], device=device)
        yield "compress_kv", (k, v, 12, 3, None, q_norm, seed(5), "lambert", False, 1e-5, lengths)
        core = torch.ops.wildcat.compress_kv(k, v, 12, 3, None, q_norm, seed(5))
        yield "coreset_attention", (q, core[0], core[1], core[2], None, core[4], core[5], False)
        yield "coreset_attention", (q, core[0], core[1], core[2], 0.5, core[4], core[5], True)
        yield "coreset_attention", (q, core[0], core[1], core[2], None, None, None, False)
        yield "rp_nystrom", (k * 0.3, 7, seed(2), 1e-5)
        yield "query_norm", (q, 3)
        yield "query_norm", (q[0, 0], 1)


# as many cases as samples() yields (the same on every device), counted rather than typed in
@pytest.mark.parametrize("index", range(sum(1 for _ in samples("cpu"))))
def test_opcheck(device, index):
    name, args = list(samples(device))[index]
    torch.library.opcheck(getattr(torch.ops.wildcat, name).default, args)
