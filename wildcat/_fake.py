"""Fake (meta) kernels of the wildcat ops for torch.compile (autograd is registered in C++,
csrc/library.cpp: the ops have no backward).

Output shapes depend only on input shapes and int arguments, so these need no data. They repeat
the structural checks of csrc/ops/checks.cpp that decide output shapes; value checks stay in C++.
"""

from __future__ import annotations

import torch

from . import _C  # noqa: F401  (registers the op schemas)


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_seed(op: str, seed, like) -> None:
    if seed is None:
        return
    torch._check(seed.dtype == torch.int64, lambda: f"wildcat.{op}: seed must be an int64 tensor, got {seed.dtype}")
    torch._check(seed.numel() == 1, lambda: f"wildcat.{op}: seed must hold one element, got {tuple(seed.shape)}")
    torch._check(seed.device.type == "cpu" or seed.device == like.device,
                 lambda: f"wildcat.{op}: seed is on {seed.device}; it must be on the CPU or on {like.device}")


@torch.library.register_fake("wildcat::rp_nystrom")
def _rp_nystrom_fake(points, rank, seed=None, tol=1e-5):
    torch._check(points.dim() >= 2, lambda: f"wildcat.rp_nystrom: points must be (..., N, E), got {tuple(points.shape)}")
    torch._check(rank >= 1, lambda: f"wildcat.rp_nystrom: rank must be >= 1, got {rank}")
    _check_seed("rp_nystrom", seed, points)
    lead, n = points.shape[:-2], points.shape[-2]
    kept = torch.sym_min(rank, n)
    acc = _acc(points.dtype)
    return (
        points.new_empty(*lead, kept, dtype=torch.int64),
        points.new_empty(*lead, kept, kept, dtype=acc),
        points.new_empty(*lead, kept, n, dtype=acc),
    )


@torch.library.register_fake("wildcat::compress_kv")
def _compress_kv_fake(keys, values, rank, num_bins=1, scale=None, query_norm=None, seed=None,
                      tau="lambert", center_values=False, tol=1e-5, lengths=None):
    torch._check(keys.dim() >= 2, lambda: f"wildcat.compress_kv: keys must be (..., N, E), got {tuple(keys.shape)}")
    torch._check(values.dim() == keys.dim(), lambda: "wildcat.compress_kv: values must have the rank of keys")
    torch._check(keys.shape[:-1] == values.shape[:-1],
                 lambda: f"wildcat.compress_kv: keys {tuple(keys.shape)} and values {tuple(values.shape)} must match but in the last dim")
    torch._check(keys.dtype == values.dtype, lambda: "wildcat.compress_kv: keys and values must have one dtype")
    torch._check(keys.device == values.device, lambda: "wildcat.compress_kv: keys and values must be on one device")
    _check_seed("compress_kv", seed, keys)
    if lengths is not None:
        torch._check(lengths.dtype == torch.int64,
                     lambda: f"wildcat.compress_kv: lengths must be an int64 tensor, got {lengths.dtype}")
        torch._check(lengths.shape == keys.shape[:-2],
                     lambda: f"wildcat.compress_kv: lengths must have the leading dims of keys {tuple(keys.shape[:-2])}, "
                             f"got {tuple(lengths.shape)}")
    torch._check(rank >= 1, lambda: f"wildcat.compress_kv: r (rank) must be >= 1, got {rank}")
    lead, (n, e), dv = keys.shape[:-2], keys.shape[-2:], values.shape[-1]
    kept = torch.sym_min(rank, n)
    acc = _acc(keys.dtype)
    return (
        keys.new_empty(*lead, kept, e),
        keys.new_empty(*lead, kept, dv, dtype=acc),
        keys.new_empty(*lead, kept, dtype=acc),
        keys.new_empty(*lead, kept, dtype=torch.int64),
        keys.new_empty(*lead, dv, dtype=acc),
        keys.new_empty(*lead, dv, dtype=acc),
    )


@torch.library.register_fake("wildcat::coreset_attention")
def _coreset_attention_fake(query, core_keys, core_values, core_weights, scale=None, value_min=None,
                            value_max=None, center_values=False):
    torch._check(query.dim() >= 2, lambda: f"wildcat.coreset_attention: query must be (..., M, E), got {tuple(query.shape)}")
    torch._check(core_keys.dim() == query.dim() and core_values.dim() == query.dim(),
                 lambda: "wildcat.coreset_attention: core_keys and core_values must have the rank of query")
    torch._check(all(t.device == query.device for t in (core_keys, core_values, core_weights)),
                 lambda: "wildcat.coreset_attention: all tensors must be on one device")
    torch._check(query.shape[-1] == core_keys.shape[-1],
                 lambda: f"wildcat.coreset_attention: query has E = {query.shape[-1]}, core_keys {core_keys.shape[-1]}")
    return query.new_empty(*query.shape[:-1], core_values.shape[-1])


@torch.library.register_fake("wildcat::query_norm")
def _query_norm_fake(query, kv_heads):
    torch._check(query.dim() >= 2, lambda: f"wildcat.query_norm: query must be (..., M, E), got {tuple(query.shape)}")
    if query.dim() < 3:
        return query.new_empty((), dtype=_acc(query.dtype))
    torch._check(kv_heads >= 1 and query.shape[-3] % kv_heads == 0,
                 lambda: f"wildcat.query_norm: query heads {query.shape[-3]} must be a multiple of kv_heads, got {kv_heads}")
    return query.new_empty(*query.shape[:-3], kv_heads, dtype=_acc(query.dtype))
