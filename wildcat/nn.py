"""WildCat attention as an nn.Module."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ._types import DEFAULT_TAU, DEFAULT_TOL
from .functional import _check_int, _check_scale, scaled_dot_product_attention


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
    ) -> None:
        super().__init__()
        _check_int("r", r, 1)
        _check_int("num_bins", num_bins, 1)
        _check_scale(scale)
        if tau not in ("lambert", "constant"):
            raise ValueError(f"wildcat.WildCat: tau must be 'lambert' or 'constant', got {tau!r}")
        if seed is not None:
            _check_int("seed", seed, -(2**63))
        self.r = r
        self.num_bins = num_bins
        self.scale = scale
        self.tau = tau
        self.center_values = center_values
        self.tol = tol
        self.seed = seed

    def forward(self, query: Tensor, key: Tensor, value: Tensor, *,
                generator: Optional[torch.Generator] = None) -> Tensor:
        return scaled_dot_product_attention(
            query, key, value, scale=self.scale, enable_gqa=True, r=self.r, num_bins=self.num_bins,
            generator=generator, seed=self.seed, tau=self.tau, center_values=self.center_values,
            tol=self.tol,
        )

    def extra_repr(self) -> str:
        return (f"r={self.r}, num_bins={self.num_bins}, scale={self.scale}, tau={self.tau!r}, "
                f"center_values={self.center_values}, seed={self.seed}")
