"""WildCat attention as functions: a drop-in for torch.nn.functional.scaled_dot_product_attention,
and the two phases (compress_kv, coreset_attention) for callers that reuse a compressed set."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import ops
from ._types import DEFAULT_TAU, DEFAULT_TOL, CompressedKV
from .reference import query_norm_per_kv_head

__all__ = ["compress_kv", "coreset_attention", "draw_seed", "scaled_dot_product_attention"]

_SEED_HIGH = 2**63 - 1


def draw_seed(
    seed: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    device: Optional[torch.device] = None,
) -> Tensor:
    """The seed of one call's pivot sampling, as a one-element int64 tensor.

    `seed` (an int) is used as given. Otherwise a fresh seed is drawn from `generator`, or from
    torch's default generator of `device` (so `torch.manual_seed` makes runs reproducible). A seed
    drawn on a CUDA device stays there and is read by the kernels: each replay of a captured CUDA
    graph then draws a new one, as torch's own random ops do. Inside torch.compile the draw is
    traced like any random op; a `generator` cannot be traced there (pass `seed` instead).
    """
    if seed is not None:
        if generator is not None:
            raise ValueError("wildcat: pass either seed or generator, not both")
        if isinstance(seed, Tensor):
            return seed
        if isinstance(seed, bool) or not isinstance(seed, (int, torch.SymInt)):
            raise TypeError(f"wildcat: seed must be an int, got {type(seed).__name__}")
        return torch.tensor(seed, dtype=torch.int64)
    if generator is not None:
        if torch.compiler.is_compiling():
            raise RuntimeError(
                "wildcat: a torch.Generator cannot be used inside torch.compile; pass seed=<int> "
                "for reproducible compiled calls, or neither for fresh seeds"
            )
        return torch.randint(0, _SEED_HIGH, (), generator=generator, device=generator.device)
    return torch.randint(0, _SEED_HIGH, (), device=device)


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, torch.SymInt)):
        raise TypeError(f"wildcat: {name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"wildcat: {name} must be >= {minimum}, got {value}")


def _check_scale(scale) -> None:
    if scale is None:
        return
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"wildcat: scale must be a float or None, got {type(scale).__name__}")
    if not (0 < scale < float("inf")):
        raise ValueError(f"wildcat: scale must be a finite positive number, got {scale}")


def _check_tensor(name: str, t) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"wildcat: {name} must be a torch.Tensor, got {type(t).__name__}")


def compress_kv(
    keys: Tensor,
    values: Tensor,
    r: int = 128,
    num_bins: int = 1,
    *,
    scale: Optional[float] = None,
    query_norm: Optional[Tensor] = None,
    tau: str = DEFAULT_TAU,
    center_values: bool = False,
    tol: float = DEFAULT_TOL,
    seed: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
) -> CompressedKV:
    """Compress keys (..., N, E) and values (..., N, D) into a weighted coreset of min(r, N)
    entries per leading index (ALGORITHM.md §2).

    query_norm (...): the largest norm of the queries that will attend (sets the temperature);
    omit it for query-agnostic compression, e.g. of a KV cache. See :class:`CompressedKV`.
    """
    _check_tensor("keys", keys)
    _check_tensor("values", values)
    _check_int("r", r, 1)
    _check_int("num_bins", num_bins, 1)
    _check_scale(scale)
    return ops.compress_kv(keys, values, r, num_bins, scale, query_norm,
                           draw_seed(seed, generator, keys.device), tau, center_values, tol)


def coreset_attention(
    query: Tensor,
    kv: CompressedKV,
    *,
    scale: Optional[float] = None,
    center_values: bool = False,
) -> Tensor:
    """Attention of query (..., Hq, M, E) over a compressed set (..., Hkv, r, ·) from compress_kv;
    Hq may be a multiple of Hkv (grouped-query attention). center_values must match the
    compress_kv call. Returns (..., Hq, M, D)."""
    _check_tensor("query", query)
    _check_scale(scale)
    return ops.coreset_attention(query, kv.core_keys, kv.core_values, kv.core_weights, scale,
                                 kv.value_min, kv.value_max, center_values)


def scaled_dot_product_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
    *,
    r: int = 128,
    num_bins: int = 1,
    generator: Optional[torch.Generator] = None,
    seed: Optional[int] = None,
    tau: str = DEFAULT_TAU,
    center_values: bool = False,
    tol: float = DEFAULT_TOL,
) -> Tensor:
    """WildCat attention with the signature of torch.nn.functional.scaled_dot_product_attention.

    query (..., Hq, M, E), key (..., Hkv, N, E), value (..., Hkv, N, D) → (..., Hq, M, D).
    Each kv head's N keys and values are compressed into a weighted coreset of r entries (in
    num_bins contiguous bins), then every query attends to it: O(N r) work instead of O(N M).
    With enable_gqa=True, Hq may be a multiple of Hkv; each kv head is compressed once, with the
    largest query norm of all query heads sharing it. r >= N gives exact attention.

    Not supported yet (they raise NotImplementedError, never ignored): attn_mask, is_causal=True,
    dropout_p > 0. Randomness: see :func:`draw_seed` (seed, generator).
    """
    if attn_mask is not None:
        raise NotImplementedError("wildcat.scaled_dot_product_attention: attn_mask is not supported yet")
    if is_causal:
        raise NotImplementedError("wildcat.scaled_dot_product_attention: is_causal=True is not supported yet")
    if dropout_p != 0.0:
        raise NotImplementedError(
            f"wildcat.scaled_dot_product_attention: dropout_p must be 0 (WildCat is an inference method), got {dropout_p}"
        )
    for name, t in (("query", query), ("key", key), ("value", value)):
        _check_tensor(name, t)
    _check_int("r", r, 1)
    _check_int("num_bins", num_bins, 1)
    _check_scale(scale)
    if not (query.dim() == key.dim() == value.dim() and query.dim() >= 2):
        raise ValueError(
            "wildcat.scaled_dot_product_attention: query, key and value must have one rank >= 2, got "
            f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}"
        )
    if not (query.dtype == key.dtype == value.dtype):
        raise TypeError(
            "wildcat.scaled_dot_product_attention: query, key and value must have one dtype, got "
            f"{query.dtype}, {key.dtype}, {value.dtype}"
        )
    if not query.is_floating_point():
        raise TypeError(f"wildcat.scaled_dot_product_attention: inputs must be floating point, got {query.dtype}")
    if not (query.device == key.device == value.device):
        raise RuntimeError(
            "wildcat.scaled_dot_product_attention: query, key and value must be on one device, got "
            f"{query.device}, {key.device}, {value.device}"
        )
    if key.shape[:-1] != value.shape[:-1]:
        raise ValueError(
            f"wildcat.scaled_dot_product_attention: key {tuple(key.shape)} and value {tuple(value.shape)} "
            "must match in every dim but the last (same heads and N)"
        )
    if query.shape[-1] != key.shape[-1]:
        raise ValueError(
            f"wildcat.scaled_dot_product_attention: query has E = {query.shape[-1]} but key has E = {key.shape[-1]}"
        )
    if query.dim() >= 3:
        if query.shape[:-3] != key.shape[:-3]:
            raise ValueError(
                f"wildcat.scaled_dot_product_attention: batch dims of query {tuple(query.shape)} and key "
                f"{tuple(key.shape)} must match"
            )
        q_heads, kv_heads = query.shape[-3], key.shape[-3]
        if enable_gqa:
            if q_heads % kv_heads != 0:
                raise ValueError(
                    f"wildcat.scaled_dot_product_attention: query heads ({q_heads}) must be a multiple of "
                    f"key/value heads ({kv_heads})"
                )
        elif q_heads != kv_heads:
            raise ValueError(
                f"wildcat.scaled_dot_product_attention: query has {q_heads} heads but key has {kv_heads}; "
                "pass enable_gqa=True for grouped-query attention"
            )
    else:
        kv_heads = None
    q_norm = query_norm_per_kv_head(query, kv_heads)
    core = ops.compress_kv(key, value, r, num_bins, scale, q_norm, draw_seed(seed, generator, key.device),
                           tau, center_values, tol)
    return ops.coreset_attention(query, core.core_keys, core.core_values, core.core_weights, scale,
                                 core.value_min, core.value_max, center_values)
