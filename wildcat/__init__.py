"""wildcat: WildCat attention (Schröder & Mackey, 2026) for PyTorch.

Near-linear-time attention: each kv head's N keys and values are compressed into a weighted
coreset of r keys (randomly pivoted Cholesky with Nyström weights), then every query attends to
the coreset. Ops are registered as torch.ops.wildcat.* (CPU, and CUDA when built with it).
"""

import torch  # noqa: F401  (loads libtorch before the extension)

from . import _C  # noqa: F401  (registers the ops)
from . import _fake  # noqa: F401
from . import ops, reference
from ._types import DEFAULT_TAU, DEFAULT_TOL, CompressedKV
from .functional import (
    DEFAULT_MIN_SEQ_LEN,
    compress_kv,
    coreset_attention,
    draw_seed,
    query_norm_per_kv_head,
    scaled_dot_product_attention,
)
from .nn import WildCat
from .patching import Patch, patch

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_MIN_SEQ_LEN",
    "DEFAULT_TAU",
    "DEFAULT_TOL",
    "CompressedKV",
    "Patch",
    "WildCat",
    "compress_kv",
    "coreset_attention",
    "cuda_built",
    "draw_seed",
    "ops",
    "patch",
    "query_norm_per_kv_head",
    "reference",
    "scaled_dot_product_attention",
]


def cuda_built() -> bool:
    """Whether this build of wildcat has CUDA kernels (a GPU is still needed to run them)."""
    return _C.cuda_built()
