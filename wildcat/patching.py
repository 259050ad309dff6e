"""`wildcat.patch`: run WildCat in place of torch.nn.functional.scaled_dot_product_attention.

Models that call SDPA through the module attribute (`torch.nn.functional.scaled_dot_product_attention(...)`
or `F.scaled_dot_product_attention(...)` with `import torch.nn.functional as F`) look the function up
at call time, so replacing that attribute reroutes them. Code that bound the function to a name of
its own before patching (`from torch.nn.functional import scaled_dot_product_attention`) keeps the
original and is not rerouted; nor is a C++ caller.
"""

from __future__ import annotations

import inspect
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .functional import scaled_dot_product_attention as _wildcat_sdpa
from .nn import WildCat

__all__ = ["Patch", "patch"]

# Additive mask entries at or below this count as "masked" when an additive float mask is read as a
# key-padding mask: exp(-1e4) underflows to 0 in every float format, so dropping such keys changes
# exact attention only if logits spanned thousands. It covers the -10000.0 of older BERT code,
# finfo(dtype).min and -inf.
_MASKED_ADDITIVE = -1.0e4


# WildCat settings a drop-in path accepts: those of `wildcat.WildCat` except `scale`, which the
# caller of SDPA passes itself. Read from the signature so new settings need no edit here.
OPTION_NAMES = frozenset(inspect.signature(WildCat.__init__).parameters) - {"self", "scale"}


def check_options(options: dict, where: str) -> None:
    """Reject unknown setting names (a typo must not silently use a default) and bad values, before
    any attention call."""
    unknown = sorted(set(options) - OPTION_NAMES)
    if unknown:
        raise TypeError(f"{where}: unknown WildCat option(s) {unknown}; expected some of {sorted(OPTION_NAMES)}")
    WildCat(**options)  # its constructor checks every value and names the bad one


def key_padding_mask(attn_mask: Optional[Tensor]) -> Optional[Tensor]:
    """An SDPA mask in the key-padding form wildcat handles natively, when it is one.

    A mask that is the same for every query row and only keeps or drops keys (boolean, or additive
    with entries 0 or <= -1e4) becomes a boolean mask (..., 1, N), True = attend. Anything else is
    returned unchanged, and wildcat's `fallback` policy applies to it. A boolean mask whose query dim
    is already 1 is taken as it is; the others are read on the host, so inside torch.compile (where
    that would break the graph) they are passed on unchanged.
    """
    if attn_mask is None or attn_mask.dim() < 2:
        return attn_mask
    is_bool = attn_mask.dtype == torch.bool
    if (is_bool and attn_mask.shape[-2] == 1) or torch.compiler.is_compiling():
        return attn_mask
    attend = attn_mask if is_bool else attn_mask == 0
    first_row = attend[..., :1, :]
    pure = (attend == first_row).all()
    if not is_bool:
        pure &= (attend | (attn_mask <= _MASKED_ADDITIVE)).all()
    return first_row if bool(pure) else attn_mask


# Options of the active patches, innermost last. While it is non-empty, the SDPA attribute of
# torch.nn.functional is `_patched_sdpa` and `_saved_sdpa` holds what was there before.
_active: list = []
_saved_sdpa = None


def _patched_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                  enable_gqa=False):
    return _wildcat_sdpa(query, key, value, key_padding_mask(attn_mask), dropout_p, is_causal, scale,
                         enable_gqa, **_active[-1])


def _push(options: dict) -> None:
    global _saved_sdpa
    if not _active:
        _saved_sdpa = F.scaled_dot_product_attention
        F.scaled_dot_product_attention = _patched_sdpa
    _active.append(options)


def _pop(options: dict) -> None:
    # By identity and from the innermost end: handles may be released in any order.
    for i in range(len(_active) - 1, -1, -1):
        if _active[i] is options:
            del _active[i]
            break
    # Leave the attribute alone if someone replaced our wrapper meanwhile: restoring would drop theirs.
    if not _active and F.scaled_dot_product_attention is _patched_sdpa:
        F.scaled_dot_product_attention = _saved_sdpa


class Patch:
    """Handle of one `wildcat.patch`: a context manager, or call `unpatch()` (idempotent)."""

    def __init__(self, model: Optional[nn.Module], options: dict) -> None:
        # A private copy: its identity marks this patch on the stack, and later edits of the
        # caller's dict must not change a running patch.
        self.options = dict(options)
        self.model = model
        self._hooks = []
        if model is None:
            _push(self.options)
        else:
            # Only while this model's forward runs (also when it raises: always_call).
            self._hooks = [
                model.register_forward_pre_hook(lambda *_: _push(self.options)),
                model.register_forward_hook(lambda *_: _pop(self.options), always_call=True),
            ]
        self.active = True

    def unpatch(self) -> None:
        if not self.active:
            return
        self.active = False
        if self.model is None:
            _pop(self.options)
        for hook in self._hooks:
            hook.remove()

    def __enter__(self) -> "Patch":
        return self

    def __exit__(self, *exc_info) -> None:
        self.unpatch()

    def __repr__(self) -> str:
        scope = "global" if self.model is None else type(self.model).__name__
        return f"wildcat.Patch({scope}, {self.options}, active={self.active})"


def patch(model: Optional[nn.Module] = None, **options) -> Patch:
    """Route `torch.nn.functional.scaled_dot_product_attention` to WildCat.

    `options` are WildCat's settings (r, num_bins, tau, center_values, tol, seed, and the fallback
    settings of `wildcat.scaled_dot_product_attention`); the caller's own SDPA arguments (mask,
    is_causal, scale, enable_gqa, dropout_p) are passed through. Key-padding masks are converted to
    the form WildCat handles natively; other masks and is_causal=True follow the `fallback` option.

    With `model`, only calls made while that model's forward runs are rerouted (through forward
    hooks); without it, every call in the process is, until the patch ends. The patch starts at
    once and ends at the end of a `with` block or on `unpatch()`; patches nest, the innermost wins.

        with wildcat.patch(r=64, seed=0):
            out = model(x)

        handle = wildcat.patch(model, r=64)
        ...
        handle.unpatch()

    Only callers that look the function up on `torch.nn.functional` at call time are rerouted:
    a name bound earlier (`from torch.nn.functional import scaled_dot_product_attention`) keeps the
    original. The global patch is process-wide, so it reaches every thread.
    """
    if model is not None and not isinstance(model, nn.Module):
        raise TypeError(f"wildcat.patch: model must be a torch.nn.Module or None, got {type(model).__name__}")
    check_options(options, "wildcat.patch")
    return Patch(model, options)
