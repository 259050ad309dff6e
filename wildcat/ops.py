"""Thin typed wrappers over torch.ops.wildcat.* (schemas and shapes in csrc/library.cpp).

These take every argument explicitly, including the seed (an int, or a one-element int64 tensor
on the CPU or the inputs' device); wildcat.functional adds defaults, seeding from a generator
and the SDPA-compatible interface.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from . import _fake  # noqa: F401  (fake kernels for torch.compile)
from ._types import DEFAULT_TAU, DEFAULT_TOL, CompressedKV

Seed = Union[int, Tensor, None]


def seed_tensor(seed: int, device: Optional[torch.device]) -> Tensor:
    """An int seed as the ops take it: a CPU scalar in eager mode (read on the host, no kernel
    launch); inside torch.compile a tensor on the inputs' device, because a CPU tensor between
    CUDA ops splits the graph and cudagraph trees (mode="reduce-overhead") reject it as an input
    that is not in their memory pool."""
    if torch.compiler.is_compiling() and device is not None:
        return torch.full((), seed, dtype=torch.int64, device=device)
    return torch.tensor(seed, dtype=torch.int64)


def _seed_tensor(seed: Seed, device: torch.device) -> Optional[Tensor]:
    if seed is None or isinstance(seed, Tensor):
        return seed
    return seed_tensor(seed, device)


def rp_nystrom(points: Tensor, rank: int, seed: Seed = 0, tol: float = DEFAULT_TOL) -> tuple[Tensor, Tensor, Tensor]:
    """Randomly pivoted Cholesky: (pivots, kinv, rows) of the Gaussian kernel of `points`.

    Up to 16 pivots are taken one per step (docs/ALGORITHM.md §2.7), more in rounds of 32 draws
    with rejection (§7): the same distribution, different pivots for the same seed."""
    return torch.ops.wildcat.rp_nystrom(points, rank, _seed_tensor(seed, points.device), tol)


def compress_kv(
    keys: Tensor,
    values: Tensor,
    rank: int,
    num_bins: int = 1,
    scale: Optional[float] = None,
    query_norm: Optional[Tensor] = None,
    seed: Seed = 0,
    tau: str = DEFAULT_TAU,
    center_values: bool = False,
    tol: float = DEFAULT_TOL,
    lengths: Optional[Tensor] = None,
) -> CompressedKV:
    """Weighted coreset of keys (..., N, E) and values (..., N, D), per leading index; with
    `lengths` (..., int64), only the first lengths[...] keys of each group exist."""
    return CompressedKV(
        *torch.ops.wildcat.compress_kv(keys, values, rank, num_bins, scale, query_norm, _seed_tensor(seed, keys.device), tau,
                                       center_values, tol, lengths)
    )


def query_norm(query: Tensor, kv_heads: int) -> Tensor:
    """R_q per kv head: the largest norm over the queries (..., Hq, M, E) of every query head
    sharing a kv head → (..., kv_heads); a rank-2 query (M, E) gives a 0-dim tensor."""
    return torch.ops.wildcat.query_norm(query, kv_heads)


def coreset_attention(
    query: Tensor,
    core_keys: Tensor,
    core_values: Tensor,
    core_weights: Tensor,
    scale: Optional[float] = None,
    value_min: Optional[Tensor] = None,
    value_max: Optional[Tensor] = None,
    center_values: bool = False,
) -> Tensor:
    """Attention of query (..., Hq, M, E) over a weighted coreset (..., Hkv, r, ·)."""
    return torch.ops.wildcat.coreset_attention(
        query, core_keys, core_values, core_weights, scale, value_min, value_max, center_values
    )
