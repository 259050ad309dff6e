"""Plain-PyTorch reference of WildCat attention: the oracle and the documented meaning of every op.

Everything here follows ../shared/ALGORITHM.md (sections cited inline) and runs in any floating
dtype: float64 inputs are computed in float64, every other dtype in float32, exactly like the
compiled ops. It is written to be read, not to be fast; tests compare the C++ and CUDA ops against
it. Randomness comes from the same counter-based generator (Philox4x32-10) as the compiled code,
written here with int64 tensor arithmetic, so the same seed picks the same pivots.

Functions
---------
- :func:`rp_nystrom`: randomly pivoted Cholesky with Nyström weights on pre-scaled points (§2.7),
  in rounds of block pivoting for more than 16 pivots (§7).
- :func:`compress_kv`: the whole of §2: bounds, centring, bins, temperature, pivots, weights.
- :func:`coreset_attention`: §3, attention of queries over a weighted coreset.
- :func:`wildcat_attention`: compression followed by coreset attention, as the public API does.
- :func:`exact_attention`: softmax attention, for comparisons.
"""

from __future__ import annotations

import itertools
import math
from typing import Optional

import torch
from torch import Tensor

from ._types import DEFAULT_TAU, DEFAULT_TOL, CompressedKV

__all__ = [
    "DEFAULT_TOL",
    "CompressedKV",
    "balanced_sizes",
    "compress_kv",
    "coreset_attention",
    "exact_attention",
    "key_scale",
    "lambert_w0",
    "log_exponential_noise",
    "philox4x32_10",
    "query_norm_per_kv_head",
    "rp_nystrom",
    "wildcat_attention",
]

# Numerators whose denominator is not above this are reported as 0 before clamping (§3).
DENOMINATOR_FLOOR = 1e-20

_TWO_RHO0 = 6.383202050647408
_CONSTANT_TAU2 = 3.94582
_MASK32 = 0xFFFFFFFF
_PHILOX_MUL = (0xD2511F53, 0xCD9E8D57)
_PHILOX_BUMP = (0x9E3779B9, 0xBB67AE85)

# Block pivoting (§7), the numbers of csrc/kernels/block_pivoting.h: bins of more slots than
# SEQUENTIAL_MAX_SLOTS choose their pivots in rounds of BLOCK_DRAWS draws; draw j of round t takes
# its noise from Philox step _BLOCK_DRAW_STEP + t * BLOCK_DRAWS + j and its acceptance uniform from
# step _BLOCK_ACCEPT_STEP + t * BLOCK_DRAWS + j (apart from the one-pivot steps 0 … r_b - 1).
SEQUENTIAL_MAX_SLOTS = 16
BLOCK_DRAWS = 32
_BLOCK_DRAW_STEP = 0x40000000
_BLOCK_ACCEPT_STEP = 0x80000000


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------
# Counter-based random numbers (csrc/kernels/philox.h)
# ---------------------------------------------------------------------------------------------


def _mulhilo32(a: int, b: Tensor) -> tuple[Tensor, Tensor]:
    """High and low 32-bit words of a * b for a < 2^32 and int64 tensor b < 2^32.

    The full 64-bit product does not fit a signed int64, so b is split into 16-bit halves.
    """
    p_lo = a * (b & 0xFFFF)  # < 2^48
    p_hi = a * (b >> 16)  # < 2^48
    t = p_lo + ((p_hi & 0xFFFF) << 16)
    return (p_hi >> 16) + (t >> 32), t & _MASK32


def philox4x32_10(counter: tuple, key0: int, key1: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Philox4x32-10 on int64 tensors holding 32-bit words (broadcast together)."""
    c0, c1, c2, c3 = (torch.as_tensor(c, dtype=torch.int64) for c in counter)
    for _ in range(10):
        hi0, lo0 = _mulhilo32(_PHILOX_MUL[0], c0)
        hi1, lo1 = _mulhilo32(_PHILOX_MUL[1], c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ key0, lo1, hi0 ^ c3 ^ key1, lo0
        key0 = (key0 + _PHILOX_BUMP[0]) & _MASK32
        key1 = (key1 + _PHILOX_BUMP[1]) & _MASK32
    return c0, c1, c2, c3


def _open_uniform(seed: int, group: Tensor, step, position: Tensor, dtype: torch.dtype) -> Tensor:
    """The uniform in (0, 1) of Philox step `step` at `position` (global index in the group's
    sequence) of `group`: word position % 4 of the quad position / 4. group, step (an int or an
    int64 tensor) and position broadcast. See csrc/kernels/philox.h."""
    seed = int(seed) & ((1 << 64) - 1)
    group = torch.as_tensor(group, dtype=torch.int64)
    position = torch.as_tensor(position, dtype=torch.int64)
    words = philox4x32_10(
        (position >> 2, step, group & _MASK32, group >> 32), seed & _MASK32, seed >> 32
    )
    word = torch.stack(torch.broadcast_tensors(*words), -1)
    word = word.gather(-1, (position & 3).expand(word.shape[:-1]).unsqueeze(-1)).squeeze(-1)
    return (2 * (word >> 9) + 1).to(dtype) * 2.0**-24  # exact in float32


def log_exponential_noise(
    seed: int, group: Tensor, step, position: Tensor, dtype: torch.dtype
) -> Tensor:
    """log E for E ~ Exp(1), the noise of pivot step `step` at `position` of `group` (broadcast
    as in :func:`_open_uniform`)."""
    return torch.log(-torch.log(_open_uniform(seed, group, step, position, dtype)))


# ---------------------------------------------------------------------------------------------
# Temperature (§2.5-2.6)
# ---------------------------------------------------------------------------------------------


def lambert_w0(z: Tensor) -> Tensor:
    """Principal branch of the Lambert W function for z >= 0 (Halley's iteration)."""
    w = torch.log1p(z)
    for _ in range(8):
        ew = torch.exp(w)
        f = w * ew - z
        w = w - f / (ew * (w + 1) - (w + 2) * f / (2 * w + 2))
    return w


def key_scale(
    beta: float, query_norm: Tensor, key_norm: Tensor, length: Tensor, tau: str
) -> Tensor:
    """m = sqrt(beta) / tau of x = m (k - k̄), per bin; 0 where R_q or R_k is 0."""
    ok = (query_norm > 0) & (key_norm > 0)
    rq = torch.where(ok, query_norm, torch.ones_like(query_norm))
    rk = torch.where(ok, key_norm, torch.ones_like(key_norm))
    if tau == "lambert":
        gamma = beta * rq * rk
        b = torch.log(length.to(rq.dtype)) / gamma + 2
        c = b / (2 * lambert_w0(b / _TWO_RHO0))
    elif tau == "constant":
        c = torch.full_like(rq, _CONSTANT_TAU2)
    else:
        raise ValueError(f"tau must be 'lambert' or 'constant', got {tau!r}")
    return torch.where(ok, torch.sqrt(beta * rq / (rk * c)), torch.zeros_like(rq))


def balanced_sizes(total: int, parts: int) -> list[int]:
    """Sizes of `parts` contiguous pieces of `total` items differing by at most one (§2.4)."""
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


# ---------------------------------------------------------------------------------------------
# Randomly pivoted Cholesky (§2.7)
# ---------------------------------------------------------------------------------------------


def _pivoted_cholesky(
    x: Tensor,
    valid: Tensor,
    steps: Tensor,
    groups: Tensor,
    offsets: Tensor,
    seed: int,
    tol: float,
    forced: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Run RPCholesky on B independent rows of points at once: rows of more than
    SEQUENTIAL_MAX_SLOTS steps choose their pivots in rounds (§7), the others one per step (§2.7).
    Forced pivots are taken one per step in every row.

    x: (B, n, E) scaled points, zero where not valid; valid: (B, n); steps: (B,) pivots wanted per
    row; groups, offsets: (B,) the random stream of each row (its group, and the global position
    of its first point). forced: (B, k) local pivots to use instead of sampling; a slot after the
    first that repeats the first pivot marks an early stop.

    Returns pivots (B, k) local indices (slots after an early stop repeat the first pivot), the
    inverse kinv = G_SS^-1 (B, k, k) and the kernel rows R = G(x_S, x) (B, k, n), with zero rows
    and columns for unused slots; k = max(steps).
    """
    B, n, _ = x.shape
    k = int(steps.max()) if B > 0 else 0
    pivots = torch.zeros(B, k, dtype=torch.int64, device=x.device)
    kinv = x.new_zeros(B, k, k)
    rows = x.new_zeros(B, k, n)
    in_rounds = steps > SEQUENTIAL_MAX_SLOTS
    if forced is not None:
        in_rounds = torch.zeros_like(in_rounds)
    for part, form in ((~in_rounds, _one_pivot_steps), (in_rounds, _pivot_rounds)):
        if part.any():
            args = (x[part], valid[part], steps[part], groups[part], offsets[part], seed, tol, k)
            if forced is not None:
                args += (forced[part],)
            pivots[part], kinv[part], rows[part] = form(*args)
    return pivots, kinv, rows


def _add_pivot(
    x: Tensor, valid: Tensor, d: Tensor, kinv: Tensor, rows: Tensor, slot: Tensor, p: Tensor, dp: Tensor,
    active: Tensor,
) -> None:
    """Make p (B,) the pivot of slot `slot` (B,) in the rows where `active`, with residual dp (B,)
    at p: its kernel row, the bordering update of kinv and the residual update of every point
    (§2.7). Updates d, kinv and rows in place; slots at or after `slot` must still be zero."""
    if not active.any():
        return
    batch = torch.arange(x.shape[0], device=x.device)
    used = int(slot[active].max()) + 1  # slots 0 … used - 1 take part
    slot = slot.clamp(max=used - 1)  # in range for the rows that are not active, which change nothing
    xp = x[batch, p]
    dp = torch.where(active, dp, torch.ones_like(dp))
    # R(l) = G(x_p, x_l) = exp(-|x_p - x_l|^2 / 2) from squared differences, as the ops do:
    # x_p·x_l - s_p/2 - s_l/2 cancels for nearby points, and with tol = 0 the inverse of an
    # ill-conditioned G_SS amplifies that (fuzzing found kinv off by 2e-5, relative)
    row = torch.exp(-((x - xp[:, None, :]) ** 2).sum(-1) / 2) * valid
    # bordering update of kinv = G_SS^-1: g = (kinv a, -1) / sqrt(d_p), kinv += g g^T, with
    # a_m = R_m(p); rows and kinv are zero from `slot` on, so a and g are too
    a = rows[batch, :used, p]
    g = (kinv[:, :used, :used] @ a[:, :, None])[..., 0]
    g[batch, slot] = -1.0
    g = g / torch.sqrt(dp)[:, None] * active[:, None]
    kinv[:, :used, :used] += g[:, :, None] * g[:, None, :]
    rows[batch, slot] = torch.where(active[:, None], row, rows[batch, slot])
    # residual: y is (minus) the new column of the Cholesky factor
    y = (g[:, :, None] * rows[:, :used]).sum(1)
    d[active] = torch.clamp(d[active] - y[active] ** 2, min=0.0)
    d[batch[active], p[active]] = 0.0


def _one_pivot_steps(x, valid, steps, groups, offsets, seed, tol, k, forced=None):
    """§2.7: one pivot per step, sampled from the residual left by the step before (or forced).
    Arguments and results as for :func:`_pivoted_cholesky`, k slots wide."""
    B, n, _ = x.shape
    dev = x.device
    s = (x * x).sum(-1)
    d = valid.to(x.dtype)  # residual diagonal of the Gaussian kernel
    pivots = torch.zeros(B, k, dtype=torch.int64, device=dev)
    kinv = x.new_zeros(B, k, k)
    rows = x.new_zeros(B, k, n)
    active = torch.ones(B, dtype=torch.bool, device=dev)
    positions = offsets[:, None] + torch.arange(n, device=dev)
    batch = torch.arange(B, device=dev)
    for i in range(k):
        candidates = d > tol
        active = active & (i < steps) & candidates.any(-1)
        if forced is not None:
            p = forced[:, i]
            if i > 0:
                active = active & (p != forced[:, 0])
        else:
            noise = log_exponential_noise(seed, groups[:, None], i, positions, x.dtype)
            score = torch.where(candidates, torch.log(d) + s - noise, -math.inf)
            p = score.argmax(-1)
        p = torch.where(active, p, pivots[:, 0])
        pivots[:, i] = p
        _add_pivot(x, valid, d, kinv, rows, torch.full_like(p, i), p, d[batch, p], active)
    return pivots, kinv, rows


def _pivot_rounds(x, valid, steps, groups, offsets, seed, tol, k):
    """§7: rounds of BLOCK_DRAWS draws from the residual at the round's start, each accepted with
    probability (its residual now) / (its residual when drawn). Arguments and results as for
    :func:`_pivoted_cholesky`, k slots wide.

    Every accepted pivot updates the residual of every point at once, so the residual of a draw
    given the pivots accepted so far is simply d at its index. The compiled ops keep the residuals
    of the round's draws apart and sweep the points once per round, with the same formulas in the
    same order (they differ only in rounding)."""
    B, n, _ = x.shape
    dev = x.device
    s = (x * x).sum(-1)
    d = valid.to(x.dtype)
    pivots = torch.zeros(B, k, dtype=torch.int64, device=dev)
    kinv = x.new_zeros(B, k, k)
    rows = x.new_zeros(B, k, n)
    count = torch.zeros(B, dtype=torch.int64, device=dev)
    running = torch.ones(B, dtype=torch.bool, device=dev)
    positions = offsets[:, None] + torch.arange(n, device=dev)
    batch = torch.arange(B, device=dev)
    draws = torch.arange(BLOCK_DRAWS, device=dev)
    for t in itertools.count():
        candidates = d > tol
        running = running & (count < steps) & candidates.any(-1)  # else done, or early stop
        if not running.any():
            break
        # every draw of the round at once, (B, draws, n): c_j = argmax(log d + s - log E_j)
        draw = t * BLOCK_DRAWS + draws
        noise = log_exponential_noise(seed, groups[:, None, None], _BLOCK_DRAW_STEP + draw[:, None],
                                      positions[:, None, :], x.dtype)
        score = torch.where(candidates[:, None, :], (torch.log(d) + s)[:, None, :] - noise, -math.inf)
        drawn = score.argmax(-1)
        drawn_from = d.gather(1, drawn)  # d^0_j
        uniform = _open_uniform(seed, groups[:, None], _BLOCK_ACCEPT_STEP + draw, offsets[:, None], x.dtype)
        for j in range(BLOCK_DRAWS):
            p = drawn[:, j]
            now = d[batch, p]
            accept = running & (count < steps) & (now > tol) & (uniform[:, j] * drawn_from[:, j] < now)
            slot = count.clamp(max=k - 1)
            pivots[batch, slot] = torch.where(accept, p, pivots[batch, slot])
            _add_pivot(x, valid, d, kinv, rows, count, p, now, accept)
            count += accept
    # unused slots repeat the first pivot
    unused = torch.arange(k, device=dev) >= count[:, None]
    pivots = torch.where(unused, pivots[:, :1], pivots)
    return pivots, kinv, rows


def rp_nystrom(points: Tensor, rank: int, seed: int, tol: float = DEFAULT_TOL):
    """Randomly pivoted Cholesky on the Gaussian kernel G(x, y) = exp(-|x - y|^2 / 2) of `points`
    (..., N, E), sampling pivots proportionally to d_l exp(|x_l|^2), the residual diagonal of the
    exponential kernel (§2.7; in rounds for r' > SEQUENTIAL_MAX_SLOTS, §7). Group g of the random
    stream is the flattened leading index.

    Returns pivots (..., r') int64, kinv = G_SS^-1 (..., r', r') and rows = G(x_S, x) (..., r', N)
    with r' = min(rank, N); slots after an early stop repeat the first pivot and have zero rows
    and columns in kinv and rows. Computed in float64 for float64 input, float32 otherwise.
    """
    lead = points.shape[:-2]
    n, e = points.shape[-2:]
    kept = min(rank, n)
    groups = math.prod(lead)
    x = points.reshape(groups, n, e).to(_acc_dtype(points.dtype))
    if n == 0 or groups == 0:
        return (
            torch.zeros(*lead, kept, dtype=torch.int64, device=x.device),
            x.new_zeros(*lead, kept, kept),
            x.new_zeros(*lead, kept, n),
        )
    pivots, kinv, rows = _pivoted_cholesky(
        x,
        torch.ones(groups, n, dtype=torch.bool, device=x.device),
        torch.full((groups,), kept, device=x.device),
        torch.arange(groups, device=x.device),
        torch.zeros(groups, dtype=torch.int64, device=x.device),
        seed,
        tol,
    )
    return pivots.reshape(*lead, kept), kinv.reshape(*lead, kept, kept), rows.reshape(*lead, kept, n)


# ---------------------------------------------------------------------------------------------
# Compression (§2)
# ---------------------------------------------------------------------------------------------


def compress_kv(
    keys: Tensor,
    values: Tensor,
    rank: int,
    num_bins: int = 1,
    scale: Optional[float] = None,
    query_norm: Optional[Tensor] = None,
    seed: int = 0,
    tau: str = DEFAULT_TAU,
    center_values: bool = False,
    tol: float = DEFAULT_TOL,
    core_indices: Optional[Tensor] = None,
    lengths: Optional[Tensor] = None,
    group_offset: int = 0,
) -> CompressedKV:
    """Compress keys (..., N, E) and values (..., N, D) of every group into a weighted coreset.

    query_norm (...,): R_q, the largest query norm of each group (attention mode); None for
    query-agnostic compression (R_q = R_k per bin). core_indices: pivots to use instead of
    sampling (as returned by a previous call), to compare arithmetic with the sampling fixed.
    lengths (...,): only the first lengths[g] keys of group g exist (the op's key padding).
    group_offset: the index of the first group in the random stream (used by `lengths`).
    """
    if lengths is not None:
        return _compress_lengths(keys, values, rank, num_bins, scale, query_norm, seed, tau, center_values,
                                 tol, core_indices, lengths)
    lead = keys.shape[:-2]
    n, e = keys.shape[-2:]
    dv = values.shape[-1]
    groups = math.prod(lead)
    acc = _acc_dtype(keys.dtype)
    beta = 1.0 / math.sqrt(e) if scale is None else float(scale)
    kept = min(rank, n)
    if n == 0 or groups == 0:
        zeros = torch.zeros(*lead, dv, dtype=acc, device=keys.device)
        return CompressedKV(
            keys.new_zeros(*lead, kept, e),
            torch.zeros(*lead, kept, dv, dtype=acc, device=keys.device),
            torch.zeros(*lead, kept, dtype=acc, device=keys.device),
            torch.zeros(*lead, kept, dtype=torch.int64, device=keys.device),
            zeros,
            zeros.clone(),
        )

    k_all = keys.reshape(groups, n, e).to(acc)
    v_all = values.reshape(groups, n, dv).to(acc)
    value_min, value_max = v_all.amin(1), v_all.amax(1)  # §2.1
    k_centred = k_all - k_all.mean(1, keepdim=True)  # §2.2
    if center_values:  # §2.3
        v_all = v_all - ((value_min + value_max) / 2)[:, None, :]

    # §2.4: bins of balanced length, slots split the same way; row g * C + b is (group g, bin b)
    lengths = balanced_sizes(n, num_bins)
    slots = balanced_sizes(rank, num_bins)
    starts = [sum(lengths[:b]) for b in range(num_bins)]
    width = max(lengths)
    dev = keys.device
    local = torch.arange(width, device=dev)
    valid = torch.stack([local < length for length in lengths])  # (C, width)
    index = torch.stack([start + torch.clamp(local, max=length - 1) for start, length in zip(starts, lengths)])
    sampled = [length > slot for length, slot in zip(lengths, slots)]
    rows = groups * num_bins
    kc = (k_centred[:, index] * valid[None, :, :, None]).reshape(rows, width, e)

    # §2.5-2.6: temperature per bin
    key_norm = kc.norm(dim=-1).amax(-1)
    if query_norm is None:
        rq = key_norm
    else:
        rq = query_norm.reshape(groups).to(acc).repeat_interleave(num_bins)
    bin_length = torch.tensor(lengths, device=dev).repeat(groups)
    m = key_scale(beta, rq, key_norm, bin_length, tau)
    x = m[:, None, None] * kc

    forced = None
    if core_indices is not None:
        forced = _forced_local_pivots(core_indices.reshape(groups, kept), lengths, slots, starts)
    steps = torch.tensor([slot if is_sampled else 0 for slot, is_sampled in zip(slots, sampled)], device=dev).repeat(groups)
    pivots, kinv, kernel_rows = _pivoted_cholesky(
        x,
        valid.repeat(groups, 1),
        steps,
        group_offset + torch.arange(groups, device=dev).repeat_interleave(num_bins),
        torch.tensor(starts, device=dev).repeat(groups),
        seed,
        tol,
        forced,
    )

    # §2.8: exponential-kernel weights W = diag(e^{-s_p/2}) kinv (R * e^{s_l/2}); V̂ = W V, w = W 1.
    # Factored around the bin's largest s, s_ref: e^{(s_l - s_ref)/2} <= 1 inside the sums and
    # e^{(s_ref - s_p)/2} outside, so no factor overflows on its own (the unfactored form gave
    # 0 * inf = NaN for β R_q R_k in the thousands, where e^{(s_l - s_p)/2} exceeds float32).
    s = (x * x).sum(-1)
    s_ref = s.amax(-1, keepdim=True)
    s_pivot = s.gather(1, pivots)
    v_bins = (v_all[:, index] * valid[None, :, :, None]).reshape(rows, width, dv)
    v_ones = torch.cat([v_bins, valid.repeat(groups, 1)[..., None].to(acc)], -1)
    inner = kinv @ ((kernel_rows * torch.exp((s - s_ref) / 2)[:, None, :]) @ v_ones)  # (rows, k, dv + 1)
    log_outer = (s_ref - s_pivot) / 2  # (rows, k), >= 0
    width_slots = pivots.shape[1]
    inner = inner.reshape(groups, num_bins, width_slots, dv + 1)
    log_outer = log_outer.reshape(groups, num_bins, width_slots)
    pivots = pivots.reshape(groups, num_bins, width_slots)

    # Every slot as (inner value | inner weight, log of its outer factor); exact slots have factor 1
    out_inner, out_log, out_indices = [], [], []
    for b in range(num_bins):
        if sampled[b]:
            out_inner.append(inner[:, b, : slots[b]])
            out_log.append(log_outer[:, b, : slots[b]])
            out_indices.append(starts[b] + pivots[:, b, : slots[b]])
        else:  # a bin no longer than its share keeps its keys exactly
            span = slice(starts[b], starts[b] + lengths[b])
            out_inner.append(torch.cat([v_all[:, span], v_all.new_ones(groups, lengths[b], 1)], -1))
            out_log.append(v_all.new_zeros(groups, lengths[b]))
            out_indices.append(torch.arange(span.start, span.stop, device=dev).expand(groups, -1))
    inner, log_outer = torch.cat(out_inner, 1), torch.cat(out_log, 1)
    # Overflow guard (§2.8): Ô is unchanged when every V̂ and w of a group is multiplied by one
    # factor (bins share one softmax, so never per bin). Where the group's largest |V̂| or |w| would
    # exceed the dtype's range, less headroom for attention's sums over the kept slots, all of the
    # group's slots are divided by e^{shift}; otherwise shift = 0 and V̂ = W V, w = W 1 exactly.
    limit = math.log(torch.finfo(acc).max) - math.log(2 * kept)
    log_magnitude = log_outer + inner.abs().amax(-1).log()
    shift = (log_magnitude.amax(-1, keepdim=True) - limit).clamp_min(0.0)
    # A slot whose inner sums are small may still have e^{log_outer - shift} beyond the range
    # (0 * inf would be NaN): there the product is formed through logarithms.
    exponent = (log_outer - shift)[..., None]
    direct = inner * torch.exp(exponent)
    through_logs = torch.sign(inner) * torch.exp(inner.abs().log() + exponent)
    scaled = torch.where(exponent < math.log(torch.finfo(acc).max), direct, through_logs)
    core_values, core_weights = scaled[..., :dv], scaled[..., dv]
    indices = torch.cat(out_indices, 1)
    core_keys = keys.reshape(groups, n, e)[torch.arange(groups, device=dev)[:, None], indices]
    return _with_lead(lead, core_keys, core_values, core_weights, indices, value_min, value_max)


def _with_lead(lead, *per_group: Tensor) -> CompressedKV:
    """The coreset from per-group tensors (groups, ...), with the keys' leading dims restored."""
    return CompressedKV(*(t.reshape(*lead, *t.shape[1:]) for t in per_group))


def _compress_lengths(keys, values, rank, num_bins, scale, query_norm, seed, tau, center_values, tol,
                      core_indices, lengths) -> CompressedKV:
    """compress_kv with key padding: each group g is compressed alone on its first lengths[g]
    keys (as group g of the random stream), then laid out in the op's slots: min(r, N) of them,
    bin b's entries from slot balanced_start(min(r, N), C, b); slots a short group cannot fill get
    weight 0, value 0 and the index of the bin's first key (0 for an empty bin)."""
    lead = keys.shape[:-2]
    n, e = keys.shape[-2:]
    dv = values.shape[-1]
    groups = math.prod(lead)
    acc = _acc_dtype(keys.dtype)
    kept = min(rank, n)
    k_all, v_all = keys.reshape(groups, n, e), values.reshape(groups, n, dv)
    counts = lengths.reshape(groups).tolist()
    out_keys = keys.new_zeros(groups, kept, e)
    out_values = torch.zeros(groups, kept, dv, dtype=acc, device=keys.device)
    out_weights = torch.zeros(groups, kept, dtype=acc, device=keys.device)
    out_indices = torch.zeros(groups, kept, dtype=torch.int64, device=keys.device)
    out_min = torch.zeros(groups, dv, dtype=acc, device=keys.device)
    out_max = torch.zeros(groups, dv, dtype=acc, device=keys.device)
    for g, count in enumerate(counts):
        if count == 0:
            out_keys[g] = k_all[g, 0]
            continue
        qn = None if query_norm is None else query_norm.reshape(groups)[g]
        forced = None if core_indices is None else core_indices.reshape(groups, kept)[g, : min(rank, count)]
        if forced is not None and count < rank:
            forced = None  # every bin is kept exactly: nothing is sampled
        sub = compress_kv(k_all[g, :count], v_all[g, :count], rank, num_bins, scale, qn, seed, tau,
                          center_values, tol, forced, group_offset=g)
        out_min[g], out_max[g] = sub.value_min, sub.value_max
        if count >= rank:  # the same slots as the op's
            out_keys[g], out_values[g], out_weights[g], out_indices[g] = (
                sub.core_keys, sub.core_values, sub.core_weights, sub.core_indices)
            continue
        taken = 0  # every bin is kept exactly; spread the bins over the op's slot layout
        for b, (length, room) in enumerate(zip(balanced_sizes(count, num_bins), balanced_sizes(kept, num_bins))):
            first = sum(balanced_sizes(kept, num_bins)[:b])
            span = slice(first, first + length)
            out_keys[g, span] = sub.core_keys[taken : taken + length]
            out_values[g, span] = sub.core_values[taken : taken + length]
            out_weights[g, span] = sub.core_weights[taken : taken + length]
            out_indices[g, span] = sub.core_indices[taken : taken + length]
            pad = sub.core_indices[taken] if length > 0 else 0
            out_indices[g, first + length : first + room] = pad
            out_keys[g, first + length : first + room] = k_all[g, pad]
            taken += length
    return _with_lead(lead, out_keys, out_values, out_weights, out_indices, out_min, out_max)


def _forced_local_pivots(core_indices: Tensor, lengths, slots, starts) -> Tensor:
    """(groups, r') global pivots → (groups * C, max slots) local pivots per (group, bin) row."""
    groups = core_indices.shape[0]
    width = max(slots)
    out = torch.zeros(groups, len(lengths), width, dtype=torch.int64, device=core_indices.device)
    offset = 0
    for b, (length, slot, start) in enumerate(zip(lengths, slots, starts)):
        taken = min(length, slot)
        if length > slot:
            out[:, b, :slot] = core_indices[:, offset : offset + slot] - start
        offset += taken
    return out.reshape(groups * len(lengths), width)


# ---------------------------------------------------------------------------------------------
# Coreset attention (§3) and the whole pipeline
# ---------------------------------------------------------------------------------------------


def _expand_kv_heads(t: Tensor, query_heads: Optional[int], head_dim: int) -> Tensor:
    """Repeat kv heads so that query head h reads kv head h // (Hq / Hkv) (the oracle may copy).
    query_heads is None for inputs without a head dimension."""
    if query_heads is None or t.shape[head_dim] == query_heads:
        return t
    kv_heads = t.shape[head_dim]
    return t.repeat_interleave(query_heads // kv_heads, dim=head_dim)


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
    """Ô(q) = Σ_s exp(β q·k_s) V̂_s / Σ_s exp(β q·k_s) w_s, clamped to [value_min, value_max].

    query (..., Hq, M, E); core tensors (..., Hkv, r, ·) with Hq a multiple of Hkv (GQA);
    value bounds (..., Hkv, D). Returns (..., Hq, M, D) in the query's dtype.
    """
    acc = _acc_dtype(query.dtype)
    e = query.shape[-1]
    beta = 1.0 / math.sqrt(e) if scale is None else float(scale)
    q = query.to(acc)
    heads = query.shape[-3] if query.dim() >= 3 else None
    keys = _expand_kv_heads(core_keys.to(acc), heads, -3)
    values = _expand_kv_heads(core_values.to(acc), heads, -3)
    weights = _expand_kv_heads(core_weights.to(acc), heads, -2)
    logits = beta * (q @ keys.transpose(-1, -2))
    if logits.shape[-1] == 0:
        out = q.new_zeros(*logits.shape[:-1], values.shape[-1])
    else:
        p = torch.exp(logits - logits.amax(-1, keepdim=True))
        numerator = p @ values
        denominator = p @ weights[..., None]
        positive = denominator > DENOMINATOR_FLOOR
        out = torch.where(positive, numerator / torch.where(positive, denominator, 1.0), 0.0)

    def bound(t: Optional[Tensor]) -> Optional[Tensor]:
        return None if t is None else _expand_kv_heads(t.to(acc), heads, -2)[..., None, :]

    low, high = bound(value_min), bound(value_max)
    if center_values:
        out = out + (low + high) / 2
    if low is not None:
        out = torch.maximum(out, low)
    if high is not None:
        out = torch.minimum(out, high)
    return out.to(query.dtype)


def query_norm_per_kv_head(query: Tensor, kv_heads: Optional[int] = None) -> Tensor:
    """R_q per group: the largest query norm over the M queries of every query head sharing a kv
    head. query (..., Hq, M, E) → (..., Hkv); a rank-2 query (M, E) gives a scalar."""
    # dtype= reads the input once; .to() first would write a float32 copy of every query
    norms = torch.linalg.vector_norm(query, dim=-1, dtype=_acc_dtype(query.dtype))
    if query.shape[-2] == 0:
        norms = norms.new_zeros(norms.shape[:-1])
    else:
        norms = norms.amax(-1)
    if query.dim() < 3 or kv_heads is None or kv_heads == query.shape[-3]:
        return norms
    return norms.unflatten(-1, (kv_heads, -1)).amax(-1)


def wildcat_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    rank: int,
    num_bins: int = 1,
    scale: Optional[float] = None,
    seed: int = 0,
    tau: str = DEFAULT_TAU,
    center_values: bool = False,
    tol: float = DEFAULT_TOL,
) -> Tensor:
    """WildCat attention: compress every kv head with the query norm of its group, then attend."""
    kv_heads = key.shape[-3] if key.dim() >= 3 else None
    q_norm = query_norm_per_kv_head(query, kv_heads)
    core = compress_kv(key, value, rank, num_bins, scale, q_norm, seed, tau, center_values, tol)
    return coreset_attention(
        query, core.core_keys, core.core_values, core.core_weights, scale,
        core.value_min, core.value_max, center_values,
    )


def exact_attention(query: Tensor, key: Tensor, value: Tensor, scale: Optional[float] = None) -> Tensor:
    """softmax(β Q Kᵀ) V in the query's accumulation dtype (GQA by repeating kv heads)."""
    acc = _acc_dtype(query.dtype)
    beta = 1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale)
    heads = query.shape[-3] if query.dim() >= 3 else None
    k = _expand_kv_heads(key.to(acc), heads, -3)
    v = _expand_kv_heads(value.to(acc), heads, -3)
    if k.shape[-2] == 0:
        return query.new_zeros(*query.shape[:-1], v.shape[-1]).to(acc)
    return torch.softmax(beta * (query.to(acc) @ k.transpose(-1, -2)), -1) @ v
