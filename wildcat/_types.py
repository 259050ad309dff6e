"""Types and defaults shared by the ops, the public API and the reference."""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor

# Residual-diagonal threshold below which a key counts as represented: it is never chosen as a
# pivot, and a bin whose keys are all represented stops early (ALGORITHM.md §2.7, early stop).
# Well above float32 rounding of the residual (about 1e-7 per step), far below any residual that
# matters for the estimate (the kernel diagonal is 1).
DEFAULT_TOL = 1e-5
# Temperature rule of §2.5 used unless another is asked for (README: "Choosing tau").
DEFAULT_TAU = "lambert"


class CompressedKV(NamedTuple):
    """A weighted coreset per group (every leading index of the keys), as compress_kv returns it.

    With r' = min(r, N):

    - core_keys (..., r', E): the original keys at the pivots (input dtype, not centred), so they
      can be mixed with other keys in one softmax.
    - core_values (..., r', D): compressed values V̂ = W V (float32; float64 for float64 input).
    - core_weights (..., r'): signed weights w = W 1; may be negative.
    - core_indices (..., r'): int64 positions of the pivots in the sequence.
    - value_min, value_max (..., D): column-wise bounds of the values; attention output is clamped
      to them, as exact attention's output (a convex combination of values) lies between them.
    """

    core_keys: Tensor
    core_values: Tensor
    core_weights: Tensor
    core_indices: Tensor
    value_min: Tensor
    value_max: Tensor
