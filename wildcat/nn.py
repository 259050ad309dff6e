"""WildCat attention as an nn.Module."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ._types import DEFAULT_TAU, DEFAULT_TOL
from .functional import FALLBACKS, _check_int, _check_scale, scaled_dot_product_attention


class WildCat(nn.Module):
    """WildCat attention: forward(query, key, value) on (..., H, N, E) tensors.

    Args:
        r: coreset size per kv head (r >= N is exact attention).
        num_bins: contiguous bins compressed independently (r is split over them). More bins are
            faster (fewer sequential pivot steps) and keep local structure; fewer bins share the
            coreset budget over the whole sequence.
        scale: softmax scale; default 1/sqrt(E).
        tau: temperature rule, "lambert" (closed form of the paper) or "constant".
        center_values: compress values relative to the middle of their range.
        tol: residual below which a key counts as represented (early stop).
        seed: fixed seed for every call (deterministic); None draws a fresh seed per call from
            torch's default generator (or from `generator` passed to forward).
        fallback: what masks WildCat cannot apply natively and is_causal=True do: "sdpa" runs
            exact attention (warning once), "error" raises. Boolean key-padding masks are native.
        min_seq_len: with fewer keys, exact attention runs (faster there); None: the library's
            default (wildcat.functional.DEFAULT_MIN_SEQ_LEN), 0: always WildCat.

    Query heads may be a multiple of key/value heads (grouped-query attention). There is no
    backward: WildCat is an inference method.
    """

    def __init__(
        self,
        r: int = 128,
        num_bins: int = 1,
        scale: Optional[float] = None,
        *,
        tau: str = DEFAULT_TAU,
        center_values: bool = False,
        tol: float = DEFAULT_TOL,
        seed: Optional[int] = None,
        fallback: str = "sdpa",
        min_seq_len: Optional[int] = None,
    ) -> None:
        super().__init__()
        _check_int("r", r, 1)
        _check_int("num_bins", num_bins, 1)
        _check_scale(scale)
        if tau not in ("lambert", "constant"):
            raise ValueError(f"wildcat.WildCat: tau must be 'lambert' or 'constant', got {tau!r}")
        if seed is not None:
            _check_int("seed", seed, -(2**63))
        if fallback not in FALLBACKS:
            raise ValueError(f"wildcat.WildCat: fallback must be one of {FALLBACKS}, got {fallback!r}")
        if min_seq_len is not None:
            _check_int("min_seq_len", min_seq_len, 0)
        self.r = r
        self.num_bins = num_bins
        self.scale = scale
        self.tau = tau
        self.center_values = center_values
        self.tol = tol
        self.seed = seed
        self.fallback = fallback
        self.min_seq_len = min_seq_len

    def forward(self, query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor] = None,
                is_causal: bool = False, *, generator: Optional[torch.Generator] = None) -> Tensor:
        return scaled_dot_product_attention(
            query, key, value, attn_mask=attn_mask, is_causal=is_causal, scale=self.scale,
            enable_gqa=query.dim() >= 3, r=self.r, num_bins=self.num_bins, generator=generator,
            seed=self.seed, tau=self.tau, center_values=self.center_values, tol=self.tol,
            fallback=self.fallback, min_seq_len=self.min_seq_len,
        )

    def extra_repr(self) -> str:
        return (f"r={self.r}, num_bins={self.num_bins}, scale={self.scale}, tau={self.tau!r}, "
                f"center_values={self.center_values}, seed={self.seed}, fallback={self.fallback!r}, "
                f"min_seq_len={self.min_seq_len}")
