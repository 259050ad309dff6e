"""WildCat as a Hugging Face transformers attention implementation (transformers >= 4.48, which has
`AttentionInterface`; models must dispatch through it, as transformers 5 models do).

    import wildcat.integrations.transformers as wt
    wt.register(r=128)
    model = AutoModel.from_pretrained(path, attn_implementation="wildcat")

`register` adds "wildcat" to transformers' `AttentionInterface` (and, on versions that pick mask
builders per implementation, to `AttentionMaskInterface`). Options come from `register(...)`, and a
model overrides them with a dict in `model.config.wildcat`, e.g. `model.config.wildcat = {"r": 64}`.

Meant for encoders (bidirectional attention): their padding masks reach WildCat as key-padding masks,
which it handles natively. Causal attention (decoders) and other masks follow WildCat's `fallback`
option: exact SDPA with a one-time warning, or an error.
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor, nn
from transformers import AttentionInterface

from ..functional import scaled_dot_product_attention as _wildcat_sdpa
from ..patching import OPTION_NAMES, check_options, key_padding_mask

try:  # versions with masking_utils pick the mask builder per implementation
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
except ImportError:  # older ones build masks in the model; attention_forward recognises their padding masks
    AttentionMaskInterface = sdpa_mask = None
try:  # the mask rule of encoders, in versions that name it
    from transformers.masking_utils import bidirectional_mask_function
except ImportError:
    bidirectional_mask_function = None

__all__ = [
    "ATTENTION_NAME",
    "IMPLEMENTATION",
    "WildCatCache",
    "WildCatLayer",
    "attention_forward",
    "cache_nbytes",
    "compress_cache",
    "generate_with_compressed_cache",
    "make_attention_mask",
    "register",
    "register_cache_attention",
    "unregister",
    "wildcat_cache_attention",
]

IMPLEMENTATION = "wildcat"

# Options set by the last register() call; model.config.wildcat entries take precedence.
_defaults: dict = {}

# Arguments some models pass that change the scores in ways WildCat cannot express; dropping them
# would silently change the model.
_UNSUPPORTED = ("softcap", "position_bias", "s_aux")


def _options(module: nn.Module) -> dict:
    override = getattr(getattr(module, "config", None), "wildcat", None)
    if override is None:
        return _defaults
    if not isinstance(override, dict):
        raise TypeError(f"wildcat: model.config.wildcat must be a dict of WildCat options, got "
                        f"{type(override).__name__}")
    unknown = sorted(set(override) - OPTION_NAMES)
    if unknown:
        raise TypeError(f"wildcat: model.config.wildcat has unknown option(s) {unknown}; expected some of "
                        f"{sorted(OPTION_NAMES)}")
    return {**_defaults, **override}


def attention_forward(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Optional[Tensor],
    dropout: float = 0.0,
    scaling: Optional[float] = None,
    is_causal: Optional[bool] = None,
    **kwargs,
) -> tuple[Tensor, None]:
    """The attention function transformers calls for attn_implementation="wildcat".

    query (B, Hq, M, E), key (B, Hkv, N, E), value (B, Hkv, N, D) → ((B, M, Hq, D), None), the
    contract of transformers' sdpa_attention_forward. Grouped-query heads are handled by WildCat
    without repeating keys.
    """
    for name in _UNSUPPORTED:
        if kwargs.get(name) is not None:
            raise NotImplementedError(
                f"wildcat attention: {name} is not supported ({type(module).__name__} passed one); "
                "use attn_implementation='sdpa' or 'eager' for this model"
            )
    if dropout != 0.0:
        raise ValueError(
            f"wildcat attention: dropout must be 0, got {dropout} in {type(module).__name__}; WildCat is for "
            "inference: call model.eval()"
        )
    # As transformers' sdpa path: the module's own flag unless the caller says otherwise, and a
    # single query (decoding) or an explicit mask never means is_causal.
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    is_causal = query.shape[2] > 1 and attention_mask is None and is_causal
    out = _wildcat_sdpa(
        query, key, value, key_padding_mask(attention_mask), 0.0, is_causal, scaling,
        getattr(module, "num_key_value_groups", 1) > 1, **_options(module),
    )
    return out.transpose(1, 2).contiguous(), None


def make_attention_mask(*args, **kwargs) -> Optional[Tensor]:
    """Mask builder for attn_implementation="wildcat": transformers' boolean SDPA mask, except
    that a bidirectional (encoder) mask, which is the same for every query, is built with one query
    row, (B, 1, 1, N): the key-padding form WildCat handles natively, with no host check needed
    (so it works inside torch.compile). Builders of versions without `q_length` get the SDPA mask
    unchanged; attention_forward then recognises padding on the host."""
    if (bidirectional_mask_function is not None and "q_length" in kwargs
            and kwargs.get("mask_function") is bidirectional_mask_function):
        kwargs["q_length"] = 1
    return sdpa_mask(*args, **kwargs)


def register(**options) -> None:
    """Make attn_implementation="wildcat" available to transformers models, with default WildCat
    options (r, num_bins, tau, center_values, tol, seed, fallback settings); each call replaces the
    defaults of the previous one. A model's `config.wildcat` dict overrides them per model."""
    check_options(options, "wildcat.integrations.transformers.register")
    _defaults.clear()
    _defaults.update(options)
    AttentionInterface.register(IMPLEMENTATION, attention_forward)
    if AttentionMaskInterface is not None:
        AttentionMaskInterface.register(IMPLEMENTATION, make_attention_mask)


def unregister() -> None:
    """Remove "wildcat" from transformers' interfaces (models loaded with it then fail to run)."""
    AttentionInterface._global_mapping.pop(IMPLEMENTATION, None)
    if AttentionMaskInterface is not None:
        AttentionMaskInterface._global_mapping.pop(IMPLEMENTATION, None)
    _defaults.clear()


# KV-cache compression for decoder models (issue #6), implemented in ._hf_cache.
from ._hf_cache import (  # noqa: E402
    ATTENTION_NAME,
    WildCatCache,
    WildCatLayer,
    cache_nbytes,
    compress_cache,
    generate_with_compressed_cache,
    register_cache_attention,
    wildcat_cache_attention,
)
