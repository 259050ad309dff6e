"""WildCat attention as functions: a drop-in for torch.nn.functional.scaled_dot_product_attention,
and the two phases (compress_kv, coreset_attention) for callers that reuse a compressed set."""

from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import Tensor

from . import ops
from ._types import DEFAULT_TAU, DEFAULT_TOL, CompressedKV

__all__ = [
    "DEFAULT_MIN_SEQ_LEN",
    "compress_kv",
    "coreset_attention",
    "draw_seed",
    "query_norm_per_kv_head",
    "scaled_dot_product_attention",
]

_SEED_HIGH = 2**63 - 1

# Below this many keys, scaled_dot_product_attention runs exact attention. On the H100 (bf16, 32
# heads, r = 128) WildCat measured 1.49x cuDNN at N = 4,096 with num_bins = 16 and 1.53x with
# num_bins = 64, and 9.1x and 12.0x at N = 16,384 (benchmarks/results/h100_suite.md,
# benchmarks/NOTES.md); num_bins = 1, the default, measured 0.19x at 4,096, 1.17x at 16,384 and
# 5.8x at 65,536 (benchmarks/results/h100_bins1.md). The threshold follows the binned settings,
# which are faster from 4,096 keys on; num_bins = 1 passes cuDNN only at about 16,384 keys, which
# callers of that setting can reflect in min_seq_len.
DEFAULT_MIN_SEQ_LEN = 8192

FALLBACKS = ("sdpa", "error")

# torch's own SDPA, bound at import: wildcat.patch() may replace the attribute of
# torch.nn.functional later, and the exact fallback must never call back into wildcat.
_torch_sdpa = torch.nn.functional.scaled_dot_product_attention
_warned: set = set()


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
        return ops.seed_tensor(seed, device)
    if generator is not None:
        if torch.compiler.is_compiling():
            raise RuntimeError(
                "wildcat: a torch.Generator cannot be used inside torch.compile; pass seed=<int> "
                "for reproducible compiled calls, or neither for fresh seeds"
            )
        return torch.randint(0, _SEED_HIGH, (), generator=generator, device=generator.device)
    return torch.randint(0, _SEED_HIGH, (), device=device)


def query_norm_per_kv_head(query: Tensor, kv_heads: Optional[int] = None) -> Tensor:
    """R_q per group, the `query_norm` compress_kv takes: the largest query norm over the M queries
    of every query head sharing a kv head. query (..., Hq, M, E) → (..., kv_heads) (kv_heads
    defaults to Hq); a rank-2 query (M, E) gives a scalar. The op wildcat::query_norm (one read of
    the queries on CUDA); wildcat.reference.query_norm_per_kv_head is its plain-PyTorch form."""
    if query.dim() < 3:
        kv_heads = 1
    elif kv_heads is None:
        kv_heads = query.shape[-3]
    return ops.query_norm(query, kv_heads)


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


def _check_key_mask(op: str, key_mask, keys: Tensor) -> Tensor:
    _check_tensor("key_mask", key_mask)
    if key_mask.dtype != torch.bool:
        raise TypeError(f"wildcat.{op}: key_mask must be a bool tensor (True = keep), got {key_mask.dtype}")
    if key_mask.device != keys.device:
        raise RuntimeError(f"wildcat.{op}: key_mask is on {key_mask.device} but keys are on {keys.device}")
    try:
        return key_mask.expand(keys.shape[:-1])
    except RuntimeError:
        raise ValueError(
            f"wildcat.{op}: key_mask {tuple(key_mask.shape)} does not broadcast to the keys' "
            f"(..., N) = {tuple(keys.shape[:-1])}"
        ) from None


def _compress(keys: Tensor, values: Tensor, key_mask: Optional[Tensor], *args) -> CompressedKV:
    """ops.compress_kv(keys, values, *args) of the keys where key_mask (..., N, broadcast to the
    keys) is True; args are the op's arguments after the values, up to tol. The kept keys move,
    in order, to the front of each group (a stable partition without host synchronisation), the
    op compresses the first `lengths` keys of every group, and the pivots are mapped back to the
    original positions."""
    if key_mask is None:
        return ops.compress_kv(keys, values, *args)
    n, e, dv = keys.shape[-2], keys.shape[-1], values.shape[-1]
    keep = key_mask.to(torch.int64)
    lengths = keep.sum(-1)
    destination = torch.where(key_mask, keep.cumsum(-1) - 1, lengths[..., None] + (1 - keep).cumsum(-1) - 1)
    source = torch.arange(n, device=keys.device).expand_as(destination)
    order = torch.empty_like(destination).scatter_(-1, destination, source)  # order[j]: origin of slot j
    packed_keys = keys.gather(-2, order[..., None].expand(*order.shape, e))
    packed_values = values.gather(-2, order[..., None].expand(*order.shape, dv))
    kv = ops.compress_kv(packed_keys, packed_values, *args, lengths)
    indices = order.gather(-1, kv.core_indices)
    return kv._replace(core_indices=indices)


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
    key_mask: Optional[Tensor] = None,
) -> CompressedKV:
    """Compress keys (..., N, E) and values (..., N, D) into a weighted coreset of min(r, N)
    entries per leading index (ALGORITHM.md §2).

    query_norm (...): the largest norm of the queries that will attend (sets the temperature);
    omit it for query-agnostic compression, e.g. of a KV cache. key_mask: bool, broadcastable to
    (..., N), True = the key exists; masked keys never enter a coreset nor the value bounds, and
    the kept keys are binned as if they were the whole sequence. core_indices are positions in
    the original sequence. See :class:`CompressedKV`.
    """
    _check_tensor("keys", keys)
    _check_tensor("values", values)
    _check_int("r", r, 1)
    _check_int("num_bins", num_bins, 1)
    _check_scale(scale)
    if key_mask is not None:
        if keys.dim() >= 2 and values.shape[:-1] == keys.shape[:-1]:
            key_mask = _check_key_mask("compress_kv", key_mask, keys)
        else:
            key_mask = None  # the op raises its error for these shapes
    return _compress(keys, values, key_mask, r, num_bins, scale, query_norm, draw_seed(seed, generator, keys.device),
                     tau, center_values, tol)


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


def _key_padding_mask(attn_mask: Tensor, query: Tensor, kv_heads: Optional[int]) -> Optional[Tensor]:
    """attn_mask as a per-kv-head key mask (..., Hkv, N), or None when it is not a boolean
    key-padding mask that WildCat can apply natively: a float mask, a mask that differs between
    queries (its M dim is not 1), or one that differs between query heads sharing a kv head."""
    if attn_mask.dtype != torch.bool or attn_mask.dim() > query.dim():
        return None
    if attn_mask.dim() >= 2 and attn_mask.shape[-2] != 1:
        return None
    mask = attn_mask.reshape((1,) * (query.dim() - attn_mask.dim()) + tuple(attn_mask.shape))
    mask = mask.squeeze(-2) if mask.dim() >= 2 else mask  # (..., H or 1, N)
    if kv_heads is not None and mask.dim() >= 2:
        heads = mask.shape[-2]
        if heads not in (1, kv_heads):  # per query head under GQA: may differ within a kv group
            return None
    return mask


def _fallback(reason: str, fallback: str) -> None:
    """Apply the fallback policy for an input WildCat does not approximate natively."""
    if fallback == "error":
        raise NotImplementedError(
            f"wildcat.scaled_dot_product_attention: {reason} is not supported by WildCat "
            "(pass fallback='sdpa' to run exact attention instead)"
        )
    if reason not in _warned and not torch.compiler.is_compiling():
        _warned.add(reason)
        warnings.warn(
            f"wildcat.scaled_dot_product_attention: {reason} is not supported by WildCat; running exact "
            "torch.nn.functional.scaled_dot_product_attention instead (fallback='sdpa'; this warning is "
            "shown once per reason; pass fallback='error' to raise)",
            stacklevel=3,
        )


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
    fallback: str = "sdpa",
    min_seq_len: Optional[int] = None,
) -> Tensor:
    """WildCat attention with the signature of torch.nn.functional.scaled_dot_product_attention.

    query (..., Hq, M, E), key (..., Hkv, N, E), value (..., Hkv, N, D) → (..., Hq, M, D).
    Each kv head's N keys and values are compressed into a weighted coreset of r entries (in
    num_bins contiguous bins), then every query attends to it: O(N r) work instead of O(N M).
    With enable_gqa=True, Hq may be a multiple of Hkv; each kv head is compressed once, with the
    largest query norm of all query heads sharing it. r >= N gives exact attention.

    attn_mask: a boolean key-padding mask (True = attend) broadcastable to (..., 1, 1, N) or
    (..., H, 1, N) is applied natively: masked keys never enter a coreset. A query whose keys are
    all masked gets 0 (SDPA gives NaN). Any other mask (per query, additive float) and
    is_causal=True follow `fallback`: "sdpa" runs exact SDPA (warning once per reason), "error"
    raises NotImplementedError. dropout_p must be 0: WildCat is an inference method.

    min_seq_len: with fewer keys than this, exact SDPA runs instead (it is faster there); None
    means DEFAULT_MIN_SEQ_LEN, 0 always runs WildCat. Randomness: see :func:`draw_seed`.
    """
    if fallback not in FALLBACKS:
        raise ValueError(f"wildcat.scaled_dot_product_attention: fallback must be one of {FALLBACKS}, got {fallback!r}")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)):
        raise TypeError(f"wildcat.scaled_dot_product_attention: dropout_p must be a float, got {type(dropout_p).__name__}")
    if dropout_p != 0.0:
        raise ValueError(
            f"wildcat.scaled_dot_product_attention: dropout_p must be 0 (WildCat is an inference method), got {dropout_p}"
        )
    if min_seq_len is None:
        min_seq_len = DEFAULT_MIN_SEQ_LEN
    _check_int("min_seq_len", min_seq_len, 0)
    for name, t in (("query", query), ("key", key), ("value", value)):
        _check_tensor(name, t)
    if attn_mask is not None:
        _check_tensor("attn_mask", attn_mask)
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
    if attn_mask is not None and attn_mask.device != query.device:
        raise RuntimeError(
            f"wildcat.scaled_dot_product_attention: attn_mask is on {attn_mask.device} but query is on {query.device}"
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
    if attn_mask is not None:
        full = (*query.shape[:-1], key.shape[-2])
        try:
            torch.broadcast_shapes(attn_mask.shape, full)
        except RuntimeError:
            raise ValueError(
                f"wildcat.scaled_dot_product_attention: attn_mask {tuple(attn_mask.shape)} does not broadcast to "
                f"(..., Hq, M, N) = {full}"
            ) from None
        if attn_mask.dtype != torch.bool and attn_mask.dtype != query.dtype:
            raise TypeError(
                "wildcat.scaled_dot_product_attention: attn_mask must be bool or the query's dtype "
                f"{query.dtype}, got {attn_mask.dtype}"
            )

    def exact() -> Tensor:
        return _torch_sdpa(query, key, value, attn_mask=attn_mask, is_causal=is_causal, scale=scale,
                           enable_gqa=enable_gqa)

    if is_causal:
        _fallback("is_causal=True", fallback)
        return exact()
    key_mask = None
    if attn_mask is not None:
        key_mask = _key_padding_mask(attn_mask, query, kv_heads)
        if key_mask is None:
            _fallback("an attn_mask that is not a boolean key-padding mask (per-query, per-query-head "
                      "under GQA, or additive float)", fallback)
            return exact()
    if key.shape[-2] < min_seq_len:
        return exact()

    q_norm = query_norm_per_kv_head(query, kv_heads)
    if key_mask is not None:
        key_mask = key_mask.expand(key.shape[:-1])
    core = _compress(key, value, key_mask, r, num_bins, scale, q_norm, draw_seed(seed, generator, key.device), tau,
                     center_values, tol)
    return ops.coreset_attention(query, core.core_keys, core.core_values, core.core_weights, scale,
                                 core.value_min, core.value_max, center_values)
