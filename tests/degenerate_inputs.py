"""The degenerate inputs of tests/python/test_degenerate.py as one list, for the sanitizer grids
(tests/sanitize_grid.py on the GPU, tests/sanitize_cpu_grid.py on the ASan build): both run the same
cases. Needs only torch, so the CPU grid can use it without importing the wildcat package."""

import math

import torch


def finite_cases(dtype, device, e, dv, gen):
    """(label, query, key, value, r, num_bins) for finite input: the output must be finite."""
    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(device=device, dtype=dtype)

    fp16 = dtype == torch.float16
    q, k, v = randn(2, 3, 5, e), randn(2, 3, 90, e), randn(2, 3, 90, dv)
    big_value = 6e4 if fp16 else 1e30
    return [
        ("all keys equal", q, k[:, :, :1].expand(2, 3, 90, e).contiguous(), v, 8, 4),
        ("3 distinct keys", q, k[:, :, torch.arange(90, device=device) % 3].contiguous(), v, 16, 1),
        ("zero keys", q, torch.zeros_like(k), v, 8, 2),
        ("zero queries", torch.zeros_like(q), k, v, 8, 2),
        ("N = 1", q, k[:, :, :1].contiguous(), v[:, :, :1].contiguous(), 4, 1),
        ("N = r", q, k[:, :, :32].contiguous(), v[:, :, :32].contiguous(), 32, 4),
        ("N = r + 1", q, k[:, :, :33].contiguous(), v[:, :, :33].contiguous(), 32, 4),
        ("bins of length 1", q, k[:, :, :6].contiguous(), v[:, :, :6].contiguous(), 4, 4),
        ("tiny key norms", q, randn(2, 3, 90, e, scale=1e-6), v, 8, 2),
        # huge keys: the Nyström factors overflow unless each group's coreset is shifted
        ("huge key norms", q, randn(2, 3, 90, e, scale=1e3 if fp16 else 1e4), v, 8, 2),
        ("huge values", q, k, (v.double().clamp(-1, 1) * big_value).to(dtype), 16, 2),
        ("r > N", q, k, v, 200, 3),
    ]


def non_finite_cases(query, key, value):
    """(label, query, key, value) with one NaN or Inf in one (batch, head): run for memory safety
    only (that group's output is unspecified, docs/RELIABILITY.md)."""
    cases = []
    for bad in (math.nan, math.inf):
        for target in ("query", "key", "value"):
            tensors = {"query": query.clone(), "key": key.clone(), "value": value.clone()}
            tensors[target][1, 2, 3, 0] = bad
            cases.append((f"{bad} in {target}", tensors["query"], tensors["key"], tensors["value"]))
    return cases
