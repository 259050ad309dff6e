"""Hugging Face transformers: decode against a WildCat-compressed prompt cache (issue #6).

Usage (see README, "Compressing a KV cache")::

    from wildcat.integrations._hf_cache import compress_cache, register_cache_attention
    model.set_attn_implementation(register_cache_attention())   # "wildcat_cache"
    cache = DynamicCache(config=model.config)
    model(prompt[:, :-1], past_key_values=cache)                 # exact prefill
    cache = compress_cache(cache, r=512)                          # WildCatCache
    out = model.generate(prompt, past_key_values=cache, max_new_tokens=...)

How transformers is hooked (checked against 5.x and the layered caches of 4.56+):

- A decoder attention module calls ``past_key_values.update(k, v, layer_idx)`` and passes what
  it returns as ``key``/``value`` to the function registered under ``config._attn_implementation``
  in ``AttentionInterface``; the cache object itself is not passed on. :class:`WildCatLayer`
  therefore returns views of its buffers that carry the layer (attribute ``_wildcat_layer`` on
  the key view), and :func:`wildcat_cache_attention` reads the weights and value bounds from it.
  Keys without it (a plain cache during prefill, sliding-window layers left uncompressed) go to
  transformers' own SDPA attention, so one registered name serves prefill and decoding.
- Masks: the name is also registered in ``AttentionMaskInterface`` with the SDPA mask (otherwise
  transformers passes no mask at all for unknown names, which would break padded prefill).
  ``get_mask_sizes`` reports only the tokens appended since compression (offset = prompt length),
  so a mask costs O(new tokens), not O(N). After compression the prompt's entries are visible to
  every new query (they all precede it; padding has weight 0), and the mask is applied to the
  appended tokens only: a multi-token step is causal among its tokens.
- ``get_seq_length`` is the number of tokens the cache stands for (prompt + appended), not the
  number of entries, so positions (RoPE) continue from the prompt's true length.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from ..cache import DEFAULT_SINK, DEFAULT_WINDOW, WeightedKVCache, compress_kv_cache
from .._types import DEFAULT_TAU, DEFAULT_TOL

try:
    from transformers.cache_utils import Cache, CacheLayerMixin
except ImportError as exc:  # pragma: no cover - exercised only without transformers
    raise ImportError("wildcat.integrations._hf_cache needs transformers (pip install transformers)") from exc

__all__ = [
    "ATTENTION_NAME",
    "WildCatCache",
    "WildCatLayer",
    "compress_cache",
    "generate_with_compressed_cache",
    "register_cache_attention",
    "wildcat_cache_attention",
]

ATTENTION_NAME = "wildcat_cache"


class WildCatLayer(CacheLayerMixin):
    """One attention layer of a :class:`WildCatCache`: a :class:`wildcat.cache.WeightedKVCache`."""

    is_compileable = False
    is_sliding = False
    # crop would have to undo value-bound updates; assisted decoding is not supported.
    is_croppable = False

    def __init__(self, weighted: WeightedKVCache):
        super().__init__()
        self.weighted = weighted
        self.dtype, self.device = weighted.keys.dtype, weighted.keys.device
        self.is_initialized = True

    # The base class's offload/prefetch/reset read these two attributes.
    @property
    def keys(self) -> Tensor:
        return self.weighted.keys

    @keys.setter
    def keys(self, value) -> None:
        if value is not None:
            self.weighted.keys = value

    @property
    def values(self) -> Tensor:
        return self.weighted.values

    @values.setter
    def values(self, value) -> None:
        if value is not None:
            self.weighted.values = value

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        raise RuntimeError("wildcat: a WildCatLayer is built by compress_cache, never lazily")

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        self.weighted.append(key_states, value_states)
        keys, values, _ = self.weighted.live()
        keys._wildcat_layer = self
        return keys, values

    def get_mask_sizes(self, query_length) -> tuple[int, int]:
        # transformers 4.56-4.5x pass cache_position (a tensor of the new positions) instead.
        if isinstance(query_length, Tensor):
            query_length = query_length.shape[0]
        return self.weighted.appended + query_length, self.weighted.prompt_length

    def get_seq_length(self) -> int:
        return self.weighted.seq_length

    def get_max_length(self) -> int:
        return -1

    def get_max_cache_shape(self) -> int:  # transformers 4.x name of get_max_length
        return -1

    def reset(self) -> None:
        raise NotImplementedError("wildcat: a compressed cache cannot be reset; build a new one with compress_cache")

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("wildcat: a compressed cache cannot be cropped (assisted decoding is not supported)")

    def reorder_cache(self, beam_idx: Tensor) -> None:
        self.weighted.select_batch(beam_idx)

    def batch_select_indices(self, indices: Tensor) -> None:
        self.weighted.select_batch(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.weighted.repeat_batch(repeats)

    def nbytes(self, allocated: bool = False) -> int:
        return self.weighted.nbytes(allocated)


class WildCatCache(Cache):
    """A transformers ``Cache`` whose full-attention layers hold weighted caches.

    Layers that were sliding-window layers in the source cache are kept as they were (already
    bounded, exact). Build it with :func:`compress_cache`.
    """

    def __init__(self, layers: list):
        super().__init__(layers=layers)

    def nbytes(self, allocated: bool = False) -> int:
        """Bytes held by the cache: live entries (or, allocated=True, whole buffers), every layer."""
        total = 0
        for layer in self.layers:
            if isinstance(layer, WildCatLayer):
                total += layer.nbytes(allocated)
            elif getattr(layer, "keys", None) is not None:
                total += layer.keys.nbytes + layer.values.nbytes
        return total


def _source_layers(cache) -> list:
    """(keys, values, layer-or-None) per layer of a transformers cache, 5.x and 4.x layouts."""
    if hasattr(cache, "layers"):
        return [(getattr(layer, "keys", None), getattr(layer, "values", None), layer) for layer in cache.layers]
    if hasattr(cache, "key_cache"):  # transformers < 4.56
        return [(k, v, None) for k, v in zip(cache.key_cache, cache.value_cache)]
    raise TypeError(f"wildcat: cache must be a transformers Cache holding keys and values, got {type(cache).__name__}")


def cache_nbytes(cache) -> int:
    """Bytes of the keys and values of a plain transformers cache (for comparisons)."""
    return sum(k.nbytes + v.nbytes for k, v, _ in _source_layers(cache) if k is not None)


def compress_cache(
    cache,
    r: Optional[int] = None,
    num_bins: int = 1,
    *,
    compression_ratio: Optional[float] = None,
    sink: int = DEFAULT_SINK,
    window: int = DEFAULT_WINDOW,
    attention_mask: Optional[Tensor] = None,
    query_norm: Union[Tensor, float, None] = None,
    scale: Optional[float] = None,
    tau: str = DEFAULT_TAU,
    tol: float = DEFAULT_TOL,
    seed: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
) -> WildCatCache:
    """Compress a filled transformers cache (e.g. a ``DynamicCache`` after prefill) once.

    Every full-attention layer becomes a :class:`WildCatLayer`: first ``sink`` and last
    ``window`` tokens exact, the middle a WildCat coreset of ``r`` entries per kv head (or
    ``ceil(middle / compression_ratio)``), query-agnostic unless ``query_norm`` bounds the query
    norms (see :func:`wildcat.cache.compress_kv_cache`). ``attention_mask`` (B, N): the prompt's
    mask for a left-padded batch. ``scale`` defaults to 1/sqrt(head_dim), as the model's own.
    Sliding-window layers are kept unchanged. The source cache is not modified.
    """
    layers = []
    for index, (keys, values, layer) in enumerate(_source_layers(cache)):
        if layer is not None and getattr(layer, "is_sliding", False):
            layers.append(layer)
            continue
        if keys is None or keys.dim() != 4 or keys.shape[2] == 0:
            raise ValueError(f"wildcat: layer {index} of the cache holds no keys; run the prefill first")
        layer_seed = None if seed is None else seed + index
        weighted = compress_kv_cache(keys, values, r, num_bins, compression_ratio=compression_ratio, sink=sink,
                                     window=window, key_mask=attention_mask, scale=scale, query_norm=query_norm,
                                     tau=tau, tol=tol, seed=layer_seed, generator=generator)
        layers.append(WildCatLayer(weighted))
    return WildCatCache(layers)


def _tail_mask(attention_mask: Optional[Tensor], m: int, tail: int, device) -> Tensor:
    """Boolean (B or 1, 1, m, tail) mask over the last `tail` entries (the appended tokens)."""
    if attention_mask is None:
        # transformers leaves the mask out when plain causal masking suffices.
        rows = torch.arange(m, device=device)[:, None] + (tail - m)
        return (torch.arange(tail, device=device)[None, :] <= rows)[None, None]
    mask = attention_mask[..., -tail:]
    if mask.dtype != torch.bool:  # additive float mask of older transformers / eager
        mask = mask == 0
    return mask


def wildcat_cache_attention(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Optional[Tensor],
    scaling: Optional[float] = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[Tensor, None]:
    """An ``AttentionInterface`` function: §1 attention over a :class:`WildCatLayer`'s entries.

    query (B, Hq, M, E); returns (B, M, Hq, D) and no attention weights, as transformers expects.
    One-token steps (M = 1) go through :func:`wildcat.cache.decode_attention` (the compiled op);
    multi-token steps use the plain-PyTorch masked form. Keys from any other cache: SDPA.
    """
    layer = getattr(key, "_wildcat_layer", None)
    if layer is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if dropout != 0.0:
        raise NotImplementedError(f"wildcat: dropout must be 0 with a compressed cache (inference only), got {dropout}")
    m = query.shape[2]
    tail_mask = None if m == 1 else _tail_mask(attention_mask, m, layer.weighted.appended, query.device)
    out = layer.weighted.attention(query, scale=scaling, tail_mask=tail_mask)
    return out.transpose(1, 2).contiguous(), None


def register_cache_attention(name: str = ATTENTION_NAME) -> str:
    """Register :func:`wildcat_cache_attention` (and the SDPA mask) under ``name``; returns it,
    for ``model.set_attn_implementation(name)`` or ``from_pretrained(attn_implementation=name)``."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(name, wildcat_cache_attention)
    AttentionMaskInterface.register(name, sdpa_mask)
    return name


def generate_with_compressed_cache(
    model,
    input_ids: Tensor,
    attention_mask: Optional[Tensor] = None,
    *,
    compress: Optional[dict] = None,
    **generate_kwargs,
):
    """``model.generate`` with the prompt cache compressed once after prefill.

    Prefills all but the last prompt token exactly, compresses that cache with
    :func:`compress_cache` (keyword arguments in ``compress``), then generates: the last prompt
    token is the first decode step over the compressed cache. Sets the model's attention
    implementation to the registered wildcat one. Returns what ``generate`` returns.
    """
    from transformers import DynamicCache

    if input_ids.shape[1] < 2:
        raise ValueError(f"wildcat: the prompt needs at least 2 tokens to compress its cache, got {input_ids.shape[1]}")
    model.set_attn_implementation(register_cache_attention())
    cache = DynamicCache(config=model.config)
    prefix_mask = position_ids = None
    if attention_mask is not None:
        prefix_mask = attention_mask[:, :-1]
        # The positions generate gives a left-padded batch (real tokens count from 0).
        position_ids = (prefix_mask.long().cumsum(-1) - 1).masked_fill(prefix_mask == 0, 0)
    with torch.no_grad():
        model(input_ids=input_ids[:, :-1], attention_mask=prefix_mask, position_ids=position_ids,
              past_key_values=cache, use_cache=True)
    compressed = compress_cache(cache, attention_mask=prefix_mask, **(compress or {}))
    return model.generate(input_ids=input_ids, attention_mask=attention_mask, past_key_values=compressed,
                          **generate_kwargs)
