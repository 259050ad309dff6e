"""A weighted KV cache: a pre-computed prompt cache compressed query-agnostically, then decoded
against (ALGORITHM.md §1 and §2.5, issue #6).

Per kv head the cache holds entries (key, value, weight). Compressing a prompt of N tokens keeps
its first `sink` and last `window` tokens exact (weight 1) and replaces the middle by a WildCat
coreset of r entries: the original keys at the pivots (un-centred, so they share one softmax with
exact keys), compressed values V̂ = W V and signed Nyström weights w = W 1. Tokens appended while
decoding carry weight 1. Attention over the cache is the §1 estimator over all entries,

    out(q) = Σ_s e^{β q·k_s} V̂_s / Σ_s e^{β q·k_s} w_s,

clamped to the column-wise range of every value the cache has seen (the prompt's and the appended
tokens'), exactly as exact attention's output, a convex combination of those values, lies in it.
Decoding costs O(sink + r + window + appended) time and memory per step, not O(N).

This module is framework-free; wildcat.integrations._hf_cache wraps it in a transformers Cache.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import Tensor

from ._types import DEFAULT_TAU, DEFAULT_TOL
from .functional import _check_int, compress_kv

__all__ = [
    "DEFAULT_R",
    "DEFAULT_SINK",
    "DEFAULT_WINDOW",
    "WeightedKVCache",
    "compress_kv_cache",
    "decode_attention",
    "weighted_attention",
]

DEFAULT_SINK = 32
DEFAULT_WINDOW = 32
DEFAULT_R = 512
# Spare entries allocated beyond the compressed prompt, and the least a full buffer grows by:
# appending then costs amortised O(1) copies per token instead of a re-concatenation per step.
_MIN_GROWTH = 256
# As in coreset_attention (ALGORITHM.md §3): a denominator not above this gives output 0.
_DENOMINATOR_FLOOR = 1e-20


def decode_attention(query: Tensor, keys: Tensor, values: Tensor, weights: Tensor, scale: float,
                     value_min: Tensor, value_max: Tensor) -> Tensor:
    """§1 attention of every query over every entry of a weighted cache, no mask.

    query (B, Hq, M, E); keys (B, Hkv, S, E) in the query's dtype; values (B, Hkv, S, D) and
    weights (B, Hkv, S) float32; value_min, value_max (B, Hkv, D). Hq a multiple of Hkv (GQA by
    index arithmetic, no copies). Returns (B, Hq, M, D) in the query's dtype.

    The one place the decode step calls a kernel, so that a dedicated decode kernel (split over
    the cache length) can replace coreset_attention here without touching any caller.
    """
    return torch.ops.wildcat.coreset_attention(query, keys, values, weights, scale, value_min,
                                               value_max, False)


def weighted_attention(query: Tensor, keys: Tensor, values: Tensor, weights: Tensor, scale: float,
                       value_min: Tensor, value_max: Tensor, tail_mask: Optional[Tensor] = None) -> Tensor:
    """§1 attention over a weighted cache whose last T entries are masked per query.

    Shapes as :func:`decode_attention`, plus tail_mask (B or 1, 1, M, T) bool (True: attend),
    applied to the last T entries; every earlier entry is visible to every query. This is how a
    multi-token step attends: the new tokens are the tail, causally masked among themselves.
    Plain PyTorch in float32, O(Hq M S) memory: meant for a few tokens, not a prompt.
    """
    if tail_mask is None:
        return decode_attention(query, keys, values, weights, scale, value_min, value_max)
    batch, q_heads, m, e = query.shape
    kv_heads, size = keys.shape[1], keys.shape[2]
    group = q_heads // kv_heads
    tail = tail_mask.shape[-1]
    # Query heads of one kv head are consecutive (GQA layout); grouping them lets one matmul per
    # kv head serve all of them without repeating keys or values.
    q = query.reshape(batch, kv_heads, group * m, e).float()
    logits = torch.matmul(q, keys.float().transpose(-1, -2)).mul_(scale)
    logits = logits.view(batch, kv_heads, group, m, size)
    visible = torch.ones(batch, 1, 1, m, size, dtype=torch.bool, device=query.device)
    visible[..., size - tail:] = tail_mask.unsqueeze(1)
    logits = logits.masked_fill(~visible, float("-inf")).view(batch, kv_heads, group * m, size)
    # The head entries are always visible, so every row has a finite maximum.
    probs = torch.exp(logits - logits.amax(dim=-1, keepdim=True))
    num = torch.matmul(probs, values.float())
    den = torch.matmul(probs, weights.float().unsqueeze(-1))
    out = torch.where(den > _DENOMINATOR_FLOOR, num / den, torch.zeros_like(num))
    out = torch.clamp(out, value_min.float().unsqueeze(2), value_max.float().unsqueeze(2))
    return out.view(batch, q_heads, m, -1).to(query.dtype)


class WeightedKVCache:
    """One attention layer's weighted cache: entries (key, value, weight) per batch row and kv head.

    Storage, with capacity C >= length: keys (B, Hkv, C, E) in the model's dtype, values
    (B, Hkv, C, D) and weights (B, Hkv, C) float32 (the compressed values and signed weights lose
    accuracy in 16 bits), value_min / value_max (B, Hkv, D) float32. Entries [0, length) are
    live: the compressed prompt (sink, coreset, window) first, then the appended tokens in order.
    `seq_length` counts the tokens the cache stands for (prompt plus appended), which is what
    positions continue from; `prompt_length` is the prompt's share of it.

    Build one with :func:`compress_kv_cache`.
    """

    def __init__(self, keys: Tensor, values: Tensor, weights: Tensor, value_min: Tensor, value_max: Tensor,
                 prompt_length: int, spare: int = _MIN_GROWTH):
        length = keys.shape[2]
        capacity = length + spare
        self.keys = keys.new_empty(*keys.shape[:2], capacity, keys.shape[3])
        self.values = values.new_empty(*values.shape[:2], capacity, values.shape[3], dtype=torch.float32)
        self.weights = weights.new_empty(*weights.shape[:2], capacity, dtype=torch.float32)
        self.keys[:, :, :length] = keys
        self.values[:, :, :length] = values
        self.weights[:, :, :length] = weights
        self.value_min = value_min.float().contiguous()
        self.value_max = value_max.float().contiguous()
        self.length = length
        self.prompt_length = prompt_length
        self.seq_length = prompt_length

    @property
    def appended(self) -> int:
        """Tokens appended since compression (each one exact entry at the end)."""
        return self.seq_length - self.prompt_length

    def live(self) -> tuple[Tensor, Tensor, Tensor]:
        """Views (no copies) of the live keys, values and weights."""
        n = self.length
        return self.keys[:, :, :n], self.values[:, :, :n], self.weights[:, :, :n]

    def append(self, keys: Tensor, values: Tensor) -> None:
        """Append exact tokens keys (B, Hkv, T, E), values (B, Hkv, T, D), weight 1 each."""
        if keys.shape[:2] != self.keys.shape[:2] or keys.shape[3] != self.keys.shape[3]:
            raise ValueError(f"wildcat: keys to append must have shape (B, Hkv, T, E) = "
                             f"({self.keys.shape[0]}, {self.keys.shape[1]}, T, {self.keys.shape[3]}), "
                             f"got {tuple(keys.shape)}")
        if values.shape[:3] != keys.shape[:3] or values.shape[3] != self.values.shape[3]:
            raise ValueError(f"wildcat: values to append must have shape (B, Hkv, T, D) = "
                             f"({keys.shape[0]}, {keys.shape[1]}, {keys.shape[2]}, {self.values.shape[3]}), "
                             f"got {tuple(values.shape)}")
        count = keys.shape[2]
        end = self.length + count
        if end > self.keys.shape[2]:
            self._grow(max(end, self.keys.shape[2] + max(self.keys.shape[2], _MIN_GROWTH)))
        self.keys[:, :, self.length:end] = keys
        self.values[:, :, self.length:end] = values
        self.weights[:, :, self.length:end] = 1.0
        # In place, so the bounds stay on the device and no step waits for the host.
        torch.minimum(self.value_min, values.float().amin(dim=2), out=self.value_min)
        torch.maximum(self.value_max, values.float().amax(dim=2), out=self.value_max)
        self.length = end
        self.seq_length += count

    def _grow(self, capacity: int) -> None:
        n = self.length
        for name in ("keys", "values", "weights"):
            old = getattr(self, name)
            new = old.new_empty(*old.shape[:2], capacity, *old.shape[3:])
            new[:, :, :n] = old[:, :, :n]
            setattr(self, name, new)

    def attention(self, query: Tensor, scale: Optional[float] = None, tail_mask: Optional[Tensor] = None) -> Tensor:
        """Attention of query (B, Hq, M, E) over the live entries → (B, Hq, M, D).

        tail_mask: see :func:`weighted_attention`; None means every query sees every entry (a
        one-token decode step after its token was appended).
        """
        if scale is None:
            scale = 1.0 / math.sqrt(query.shape[-1])
        keys, values, weights = self.live()
        return weighted_attention(query, keys, values, weights, scale, self.value_min, self.value_max, tail_mask)

    def nbytes(self, allocated: bool = False) -> int:
        """Bytes of the live entries and bounds (or, allocated=True, of the whole buffers)."""
        n = self.keys.shape[2] if allocated else self.length
        per_entry = sum(t.element_size() * (t[:, :, :1].numel()) for t in (self.keys, self.values, self.weights))
        return n * per_entry + 2 * self.value_min.numel() * self.value_min.element_size()

    def select_batch(self, index: Tensor) -> None:
        """Keep (and reorder) the batch rows at `index` (beam search, batch selection)."""
        for name in ("keys", "values", "weights", "value_min", "value_max"):
            setattr(self, name, getattr(self, name).index_select(0, index.to(self.keys.device)))

    def repeat_batch(self, repeats: int) -> None:
        """Repeat every batch row `repeats` times, consecutively (several sequences per prompt)."""
        for name in ("keys", "values", "weights", "value_min", "value_max"):
            setattr(self, name, getattr(self, name).repeat_interleave(repeats, dim=0))


def _resolve_rank(middle: int, r: Optional[int], compression_ratio: Optional[float]) -> int:
    if r is not None and compression_ratio is not None:
        raise ValueError(f"wildcat: pass r or compression_ratio, not both (got r={r}, "
                         f"compression_ratio={compression_ratio})")
    if compression_ratio is not None:
        if isinstance(compression_ratio, bool) or not isinstance(compression_ratio, (int, float)):
            raise TypeError(f"wildcat: compression_ratio must be a number, got {type(compression_ratio).__name__}")
        if not compression_ratio >= 1:
            raise ValueError(f"wildcat: compression_ratio must be >= 1, got {compression_ratio}")
        return max(1, math.ceil(middle / compression_ratio))
    if r is None:
        return DEFAULT_R
    _check_int("r", r, 1)
    return r


def compress_kv_cache(
    keys: Tensor,
    values: Tensor,
    r: Optional[int] = None,
    num_bins: int = 1,
    *,
    compression_ratio: Optional[float] = None,
    sink: int = DEFAULT_SINK,
    window: int = DEFAULT_WINDOW,
    key_mask: Optional[Tensor] = None,
    scale: Optional[float] = None,
    query_norm: Union[Tensor, float, None] = None,
    tau: str = DEFAULT_TAU,
    tol: float = DEFAULT_TOL,
    seed: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
) -> WeightedKVCache:
    """Compress one layer's prompt cache keys (B, Hkv, N, E), values (B, Hkv, N, D) into a
    :class:`WeightedKVCache` of at most sink + r + window entries per kv head.

    - sink, window: the first `sink` and last `window` tokens stay exact (weight 1). With a
      key_mask the sink is each row's first `sink` valid tokens.
    - r or compression_ratio: coreset size of the middle tokens (r = ceil(middle / ratio));
      default r = DEFAULT_R. A middle of at most r tokens stays exact (compress_kv keeps it).
    - num_bins, tau, tol, seed, generator: as :func:`wildcat.compress_kv`.
    - query_norm: bound on the norm of the queries that will attend, per (B, Hkv) or one float.
      None (default): no queries are known at compression time, so R_q = R_k per bin, the
      query-agnostic mode of ALGORITHM.md §2.5.
    - key_mask (B, N) bool, True = real token: for left-padded batches. Padding never enters the
      coreset and its exact sink/window entries get weight 0 (they then add nothing to either sum
      of §1).
    """
    for name, t in (("keys", keys), ("values", values)):
        if not isinstance(t, Tensor):
            raise TypeError(f"wildcat: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"wildcat: {name} must have shape (B, Hkv, N, ·), got {tuple(t.shape)}")
    if keys.shape[:3] != values.shape[:3]:
        raise ValueError(f"wildcat: keys {tuple(keys.shape)} and values {tuple(values.shape)} must match "
                         "in (B, Hkv, N)")
    _check_int("sink", sink, 0)
    _check_int("window", window, 0)
    batch, kv_heads, n, _ = keys.shape
    sink, window = min(sink, n), min(window, n - min(sink, n))
    middle = n - sink - window
    rank = _resolve_rank(middle, r, compression_ratio)
    if isinstance(query_norm, (int, float)) and not isinstance(query_norm, bool):
        query_norm = torch.full((batch, kv_heads), float(query_norm), device=keys.device)

    vals32 = values.float()
    if key_mask is not None:
        key_mask = _check_key_mask(key_mask, batch, n, keys.device)
        if bool(key_mask.all()):
            key_mask = None
    if key_mask is None:
        value_min, value_max = vals32.amin(dim=2), vals32.amax(dim=2)
        head_k, head_v = keys[:, :, :sink], vals32[:, :, :sink]
        head_w = torch.ones(batch, kv_heads, sink, device=keys.device)
        mid_keys, mid_values, mid_mask = keys[:, :, sink:n - window], values[:, :, sink:n - window], None
    else:
        head_k, head_v, head_w, mid_mask = _padded_sink(keys, vals32, key_mask, sink, window)
        valid = key_mask[:, None, :, None]
        value_min = vals32.masked_fill(~valid, float("inf")).amin(dim=2)
        value_max = vals32.masked_fill(~valid, float("-inf")).amax(dim=2)
        # The middle spans every position before the window; the mask leaves each row's own
        # middle (after its padding and its sink).
        mid_keys, mid_values = keys[:, :, :n - window], values[:, :, :n - window]

    parts_k, parts_v, parts_w = [head_k], [head_v], [head_w]
    if middle > 0:
        extra = {} if mid_mask is None else {"key_mask": mid_mask[:, None, :].expand(batch, kv_heads, -1)}
        core = compress_kv(mid_keys, mid_values, rank, num_bins, scale=scale, query_norm=query_norm, tau=tau,
                           tol=tol, seed=seed, generator=generator, **extra)
        parts_k.append(core.core_keys)
        parts_v.append(core.core_values.float())
        parts_w.append(core.core_weights.float())
    tail_v = vals32[:, :, n - window:]
    tail_w = torch.ones(batch, kv_heads, window, device=keys.device)
    if key_mask is not None:
        # Padding inside the window (a row shorter than it): zero value and weight, no effect.
        tail_w = tail_w * key_mask[:, None, n - window:]
        tail_v = tail_v * tail_w.unsqueeze(-1)
    parts_k.append(keys[:, :, n - window:])
    parts_v.append(tail_v)
    parts_w.append(tail_w)
    return WeightedKVCache(torch.cat(parts_k, dim=2), torch.cat(parts_v, dim=2), torch.cat(parts_w, dim=2),
                           value_min, value_max, prompt_length=n)


def _check_key_mask(key_mask: Tensor, batch: int, n: int, device: torch.device) -> Tensor:
    if not isinstance(key_mask, Tensor) or key_mask.shape != (batch, n):
        shape = tuple(key_mask.shape) if isinstance(key_mask, Tensor) else type(key_mask).__name__
        raise ValueError(f"wildcat: key_mask must have shape (B, N) = ({batch}, {n}), got {shape}")
    key_mask = key_mask.to(device=device, dtype=torch.bool)
    # Left padding (what generation uses) keeps every row's tokens contiguous and last, so the
    # window is the same positions in every row and appended tokens follow each row's prompt.
    if bool((key_mask[:, 1:] < key_mask[:, :-1]).any()):
        raise ValueError("wildcat: key_mask must be left padding (each row False... then True...)")
    return key_mask


def _padded_sink(keys: Tensor, vals32: Tensor, key_mask: Tensor, sink: int, window: int):
    """Sink entries of a left-padded batch: each row's first `sink` real tokens, and the mask of
    each row's middle (its real tokens after the sink and before the window)."""
    batch, kv_heads, n, _ = keys.shape
    start = n - key_mask.sum(dim=1)  # first real position of each row
    pos = start[:, None] + torch.arange(sink, device=keys.device)  # (B, sink)
    # A row shorter than sink + window: sink positions inside the window are exact there already.
    in_sink = pos < n - window
    idx = pos.clamp(max=n - 1)[:, None, :, None]
    head_k = keys.gather(2, idx.expand(batch, kv_heads, sink, keys.shape[3]))
    head_v = vals32.gather(2, idx.expand(batch, kv_heads, sink, vals32.shape[3]))
    head_v = head_v * in_sink[:, None, :, None]
    head_w = in_sink[:, None, :].expand(batch, kv_heads, sink).float()
    positions = torch.arange(n - window, device=keys.device)
    mid_mask = key_mask[:, :n - window] & (positions[None, :] >= (start + sink)[:, None])
    return head_k, head_v, head_w, mid_mask
