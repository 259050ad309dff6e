"""CUDA kernels against the CPU ops and the float64 oracle (skipped without a GPU)."""

import subprocess
import sys

import pytest
import torch

import wildcat
from wildcat import reference as ref

from conftest import randn

pytestmark = pytest.mark.cuda

FLOATS = [torch.float32, torch.bfloat16, torch.float16]


def to(device, *tensors):
    return [t.to(device) for t in tensors]


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize(
    "n,rank,bins,e,dv",
    [(97, 16, 3, 32, 16), (1025, 64, 4, 64, 64), (4096, 128, 16, 64, 64), (3000, 32, 1, 128, 64), (20000, 24, 1, 64, 64),
     # the resident path with bins split over clusters: 8 CTAs of 512 points (two per thread) and
     # two blocks of 8 slots; E = 128 over 5 CTAs, the last one shorter; 10 CTAs of four points per
     # thread (a non-portable cluster size); E = 128 over 12 CTAs, whose step inboxes do not fit the
     # weighted sums' space and take their own
     (8192, 32, 2, 64, 64), (5000, 24, 2, 128, 128), (20000, 8, 2, 64, 64), (12000, 24, 2, 128, 128),
     # block pivoting (bins of more than 16 slots): 128 slots, 400 (the leader's round matrices
     # too large for shared memory), and bins of 17 and 16 slots in one call (both pivot kernels)
     (6000, 128, 1, 64, 64), (3000, 400, 1, 64, 64), (3000, 33, 2, 96, 32),
     # weighted sums of value rows that are no whole 16-byte pieces (loaded one by one), and of
     # two blocks of columns (D + 1 > 72)
     (3000, 40, 1, 64, 37), (2500, 144, 1, 64, 128)],
)
def test_compress_picks_the_cpu_pivots(dtype, n, rank, bins, e, dv):
    """Same seed, same pivots as the CPU code in at least 99% of groups; equal pivots give equal
    weights and values to float tolerance. (20000 keys in one bin do not fit shared memory: the
    streamed path.)"""
    groups = 48
    k, v = randn(groups, n, e, dtype=dtype), randn(groups, n, dv, dtype=dtype)
    q_norm = torch.rand(groups) * 4 + 6
    cpu = wildcat.ops.compress_kv(k, v, rank, bins, None, q_norm, 123)
    gpu = wildcat.ops.compress_kv(*to("cuda", k, v), rank, bins, None, q_norm.cuda(), 123)
    assert_same_compression(gpu, cpu)
    # every group's core keys are its keys at its indices (also where the pivots differ from the CPU's)
    gathered = k.gather(1, gpu.core_indices.cpu()[..., None].expand(-1, -1, e))
    assert torch.equal(gpu.core_keys.cpu(), gathered)


def assert_same_compression(gpu, cpu):
    same = (gpu.core_indices.cpu() == cpu.core_indices).all(-1)
    assert same.float().mean() >= 0.99, f"{int((~same).sum())} of {same.numel()} groups differ"
    assert torch.equal(gpu.value_min.cpu(), cpu.value_min) and torch.equal(gpu.value_max.cpu(), cpu.value_max)
    assert torch.equal(gpu.core_keys.cpu()[same], cpu.core_keys[same])
    for name in ("core_values", "core_weights"):
        a, b = getattr(gpu, name).cpu()[same].double(), getattr(cpu, name)[same].double()
        scale = b.abs().amax(dim=tuple(range(1, b.dim())), keepdim=True).clamp_min(1.0)
        assert ((a - b).abs() / scale).max() < 2e-4, name


def test_compress_reads_values_that_are_not_16_byte_aligned():
    """Values one element past an aligned allocation: the weighted sums load them one by one (the
    statistics take their element-wise kernel); same pivots, weights and values as the CPU."""
    groups, n, rank, e = 8, 3000, 40, 64
    k = randn(groups, n, e, dtype=torch.bfloat16)
    storage = randn(groups * n * e + 1, dtype=torch.bfloat16)
    cpu = wildcat.ops.compress_kv(k, storage[1:].view(groups, n, e), rank, 1, None, None, 5)
    values = storage.cuda()[1:].view(groups, n, e)
    assert values.data_ptr() % 16 != 0
    gpu = wildcat.ops.compress_kv(k.cuda(), values, rank, 1, None, None, 5)
    assert_same_compression(gpu, cpu)


@pytest.mark.parametrize("e", [64, 128])
def test_compress_with_lengths_picks_the_cpu_pivots(e):
    """Key padding on the resident path: groups whose valid keys end inside a CTA's slice, at a
    slice boundary, leave whole CTAs of a cluster without points, or have no keys at all."""
    groups, n, rank, bins = 8, 6000, 16, 2
    k, v = randn(groups, n, e, dtype=torch.bfloat16), randn(groups, n, e, dtype=torch.bfloat16)
    lengths = torch.tensor([n, 5999, 4097, 2048, 1500, 40, 17, 0])
    q_norm = torch.rand(groups) * 4 + 6
    cpu = wildcat.ops.compress_kv(k, v, rank, bins, None, q_norm, 5, lengths=lengths)
    gpu = wildcat.ops.compress_kv(*to("cuda", k, v), rank, bins, None, q_norm.cuda(), 5, lengths=lengths.cuda())
    assert_same_compression(gpu, cpu)


@pytest.mark.parametrize("e", [64, 128])
def test_block_pivoting_over_a_cluster_picks_the_cpu_pivots(e):
    """Few groups of long bins: each bin's rounds run on a cluster of up to 8 CTAs, with key padding that
    ends inside a CTA's points, a short bin (3,001 keys), and bins with at most as many keys as
    slots (kept exactly)."""
    groups, n, rank = 6, 30000, 64
    k, v = randn(groups, n, e, dtype=torch.bfloat16), randn(groups, n, e, dtype=torch.bfloat16)
    lengths = torch.tensor([n, 29999, 20001, 3001, 64, 40])
    q_norm = torch.rand(groups) * 4 + 6
    cpu = wildcat.ops.compress_kv(k, v, rank, 1, None, q_norm, 8, lengths=lengths)
    gpu = wildcat.ops.compress_kv(*to("cuda", k, v), rank, 1, None, q_norm.cuda(), 8, lengths=lengths.cuda())
    assert_same_compression(gpu, cpu)


def test_block_pivoting_stages_older_coefficients_in_passes():
    """float64 points and 1,000 slots: the leader's row cache holds 687 rows of the round's draws
    (227 KB of shared memory, the round matrices in global memory), so once more than 687 pivots are
    taken a sweep stages the older slots' g coefficients 64 at a time instead of all at once."""
    groups, n, rank = 2, 2000, 1000
    k, v = randn(groups, n, 64, dtype=torch.float64), randn(groups, n, 64, dtype=torch.float64)
    cpu = wildcat.ops.compress_kv(k, v, rank, 1, None, None, 4)
    # a sweep with more than 687 older slots needs a round to start past them: 688 + 32 pivots
    assert (cpu.core_weights != 0).sum(-1).min() >= 720
    gpu = wildcat.ops.compress_kv(*to("cuda", k, v), rank, 1, None, None, 4)
    assert_same_compression(gpu, cpu)


def test_block_pivoting_stops_early_on_duplicate_keys():
    """Five distinct keys repeated: the rounds stop once every residual is below tol, as on the CPU."""
    base = randn(2, 5, 64)
    k = base[:, torch.arange(3000) % 5].contiguous()
    v = randn(2, 3000, 64)
    cpu = wildcat.ops.compress_kv(k, v, 40, 1, None, None, 3)
    gpu = wildcat.ops.compress_kv(*to("cuda", k, v), 40, 1, None, None, 3)
    assert torch.equal(gpu.core_indices.cpu(), cpu.core_indices)
    weights = gpu.core_weights.cpu()
    assert torch.isfinite(weights).all() and ((weights != 0).sum(-1) <= 5).all()
    torch.testing.assert_close(weights, cpu.core_weights, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype,e,dv,path", [
    (torch.bfloat16, 64, 64, "resident_bin_kernel"), (torch.float16, 128, 128, "resident_bin_kernel"),
    (torch.float32, 64, 64, "pivot_kernel"), (torch.bfloat16, 64, 32, "pivot_kernel")])
def test_compress_takes_the_resident_path_where_it_applies(dtype, e, dv, path):
    """The tests above exercise the path they mean to: 16-bit keys with E = D in {64, 128} take the
    cluster-resident kernel, other shapes the general pivot kernel."""
    k, v = randn(4, 3000, e, dtype=dtype).cuda(), randn(4, 3000, dv, dtype=dtype).cuda()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        wildcat.ops.compress_kv(k, v, 32, 2, None, None, 1)
        torch.cuda.synchronize()
    names = [event.name for event in prof.events()]
    assert any(path in name for name in names), sorted(set(names))
    other = "pivot_kernel" if path == "resident_bin_kernel" else "resident_bin_kernel"
    assert not any(other in name for name in names), sorted(set(names))


@pytest.mark.parametrize("dtype", FLOATS)
def test_bins_of_more_than_16_slots_take_block_pivoting(dtype):
    k, v = randn(4, 3000, 64, dtype=dtype).cuda(), randn(4, 3000, 64, dtype=dtype).cuda()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        wildcat.ops.compress_kv(k, v, 34, 2, None, None, 1)
        torch.cuda.synchronize()
    names = {event.name.split("<")[0].split("(")[0].split("::")[-1] for event in prof.events()}
    assert "block_pivot_kernel" in names and "pivot_kernel" not in names, sorted(names)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("n,rank,bins,e", [(512, 32, 1, 64), (1025, 64, 4, 128), (300, 48, 3, 96), (2048, 128, 16, 64)])
def test_accuracy_rule_against_float64_oracle(dtype, n, rank, bins, e):
    """At most twice the error of the same algorithm in plain PyTorch at the same dtype, pivots
    held fixed (both compression and attention on the GPU; oracle on the CPU)."""
    q, k, v = randn(2, 4, 64, e, dtype=dtype), randn(2, 2, n, e, dtype=dtype), randn(2, 2, n, e, dtype=dtype)
    q_norm = ref.query_norm_per_kv_head(q, 2)
    core = wildcat.ops.compress_kv(*to("cuda", k, v), rank, bins, None, q_norm.cuda(), 9)
    out = wildcat.ops.coreset_attention(q.cuda(), core.core_keys, core.core_values, core.core_weights, None,
                                        core.value_min, core.value_max).cpu()
    indices = core.core_indices.cpu()

    def oracle(q_, k_, v_):
        c = ref.compress_kv(k_, v_, rank, bins, None, ref.query_norm_per_kv_head(q_, 2), 9, core_indices=indices)
        return ref.coreset_attention(q_, c.core_keys, c.core_values, c.core_weights, None, c.value_min, c.value_max)

    exact64 = oracle(q.double(), k.double(), v.double())
    plain = oracle(q, k, v)
    err = (out.double() - exact64).abs().max()
    err_plain = (plain.double() - exact64).abs().max()
    assert err <= 2 * err_plain, (float(err), float(err_plain))


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("e,dv,rank", [(64, 64, 128), (128, 128, 256), (64, 64, 512), (96, 40, 70), (256, 256, 33)])
def test_attention_kernels_against_oracle(dtype, e, dv, rank):
    """Both attention kernels (tensor cores for 16-bit E = D in {64, 128}, the general one
    otherwise) on a given coreset with signed weights: the 2x rule against plain PyTorch."""
    q = randn(2, 4, 200, e, dtype=dtype)
    keys = randn(2, 2, rank, e, dtype=dtype)
    values = randn(2, 2, rank, dv) * 3
    weights = torch.rand(2, 2, rank) * 1.5 - 0.25
    vmin, vmax = values.amin(-2) - 1, values.amax(-2) + 1
    out = wildcat.ops.coreset_attention(*to("cuda", q, keys, values, weights), None, vmin.cuda(), vmax.cuda()).cpu()
    exact64 = ref.coreset_attention(q.double(), keys.double(), values.double(), weights.double(), None, vmin.double(), vmax.double())
    plain = ref.coreset_attention(q, keys, values, weights, None, vmin, vmax)
    err = (out.double() - exact64).abs().max()
    err_plain = (plain.double() - exact64).abs().max()
    assert err <= 2 * err_plain, (float(err), float(err_plain))


@pytest.mark.parametrize("e", [64, 128])
@pytest.mark.parametrize("growth", ["rising", "falling"])
def test_tensor_core_attention_with_logits_that_grow_across_chunks(e, growth):
    """The tensor-core kernel moves its running maximum only when a chunk's logits exceed it by
    2^8: key norms that rise along the coreset (later chunks' logits tens of units above the first
    ones, some rows rescaled and some not) and fall (no rescaling after the first chunk) keep the
    2x rule; r = 200 leaves a partial last chunk."""
    dtype = torch.bfloat16
    rank = 200
    q = randn(2, 4, 130, e, dtype=dtype)
    norms = torch.linspace(0.1, 8.0, rank)
    if growth == "falling":
        norms = norms.flip(0)
    keys = (randn(2, 2, rank, e) * norms[:, None]).to(dtype)
    values = randn(2, 2, rank, e)
    weights = torch.rand(2, 2, rank) + 0.1  # positive: a sharp softmax on a negative weight would test the floor
    out = wildcat.ops.coreset_attention(*to("cuda", q, keys, values, weights)).cpu()
    exact64 = ref.coreset_attention(q.double(), keys.double(), values.double(), weights.double())
    plain = ref.coreset_attention(q, keys, values, weights)
    err = (out.double() - exact64).abs().max()
    err_plain = (plain.double() - exact64).abs().max()
    assert err <= 2 * err_plain, (float(err), float(err_plain))


@pytest.mark.parametrize("e", [64, 128])
def test_tensor_core_attention_keeps_every_value_column_relative(e):
    """The tensor-core kernel multiplies P V̂ in float16 with each column scaled by its own power
    of two: columns from 1e-30 to 1e30 (and a zero one) each keep the 2x rule relative to their
    own magnitude, where one float16 scale would overflow the large and flush the small."""
    dtype = torch.bfloat16
    rank = 96
    q = randn(1, 4, 150, e, dtype=dtype)
    keys = randn(1, 2, rank, e, dtype=dtype)
    magnitude = 10.0 ** torch.linspace(-30, 30, e)
    magnitude[e // 3] = 0.0
    values = randn(1, 2, rank, e) * magnitude
    weights = (torch.rand(1, 2, rank) * 1.5 - 0.25) * 1e-6
    out = wildcat.ops.coreset_attention(*to("cuda", q, keys, values, weights)).cpu()
    assert torch.isfinite(out).all()
    exact64 = ref.coreset_attention(q.double(), keys.double(), values.double(), weights.double())
    plain = ref.coreset_attention(q, keys, values, weights)
    per_column = magnitude.double().clamp_min(1e-300)
    err = ((out.double() - exact64).abs() / per_column).amax()
    err_plain = ((plain.double() - exact64).abs() / per_column).amax()
    assert (out[..., e // 3] == 0).all()
    assert err <= 2 * err_plain, (float(err), float(err_plain))


@pytest.mark.parametrize("center", [False, True])
@pytest.mark.parametrize("m", [4097, 6273])
@pytest.mark.parametrize("e", [64, 128])
def test_tensor_core_attention_over_many_query_tiles(e, m, center):
    """The tensor-core kernel's CTAs share 32 heads' query tiles: several tiles per CTA, the next
    one's rows copied while this one computes, shares that cross from one head into the next. On a
    132-SM H100 the host picks equal item counts for M = 4,097 at E = 128 and shares weighted by
    the coreset staging elsewhere (kernels::MmaShares), and shares cross into the next kv head's
    coreset (staged anew) in every case but M = 4,097 at E = 64. The last tile reaches past M with
    a warp block holding one row (16-row blocks at E = 128, 32-row at E = 64); 32 heads over 8 kv
    heads; a padded last key chunk (r = 100); with and without centred values (a kernel each): the
    2x rule, and the last row against the same row computed alone (by the decode kernel)."""
    dtype = torch.bfloat16
    q = randn(1, 32, m, e, dtype=dtype)
    keys = randn(1, 8, 100, e, dtype=dtype)
    values = randn(1, 8, 100, e)
    weights = torch.rand(1, 8, 100) * 1.5 - 0.25
    vmin, vmax = values.amin(-2) - 1, values.amax(-2) + 1
    args = to("cuda", keys, values, weights)
    out = wildcat.ops.coreset_attention(q.cuda(), *args, None, vmin.cuda(), vmax.cuda(), center).cpu()
    exact64 = ref.coreset_attention(q.double(), keys.double(), values.double(), weights.double(), None,
                                    vmin.double(), vmax.double(), center)
    plain = ref.coreset_attention(q, keys, values, weights, None, vmin, vmax, center)
    err = (out.double() - exact64).abs().max()
    err_plain = (plain.double() - exact64).abs().max()
    assert err <= 2 * err_plain, (float(err), float(err_plain))
    alone = wildcat.ops.coreset_attention(q[:, :, -1:].cuda(), *args, None, vmin.cuda(), vmax.cuda(), center).cpu()
    # two kernels' bfloat16 roundings of outputs up to ~5 in magnitude: one ulp there is 2^-5
    torch.testing.assert_close(out[:, :, -1:], alone, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("m,e", [(1, 64), (64, 64), (64, 32), (70, 128)])
def test_attention_reads_strided_entry_views(dtype, m, e):
    """Entries as the live prefix of over-allocated buffers (a KV cache's views), on every kernel
    (decode, tensor-core and general): equal to contiguous copies, and to the CPU op."""
    buffers = (randn(2, 4, 300, e, dtype=dtype, device="cuda"), randn(2, 4, 300, e, device="cuda"),
               torch.rand(2, 4, 300, device="cuda"))
    views = tuple(t[:, :, :200] for t in buffers)
    assert not views[0].is_contiguous()
    q = randn(2, 8, m, e, dtype=dtype, device="cuda")
    got = wildcat.ops.coreset_attention(q, *views)
    assert torch.equal(got, wildcat.ops.coreset_attention(q, *(t.contiguous() for t in views)))
    # The equality above is the exact check; this one catches a misread that both calls would
    # share. Its tolerance is that of a 16-bit output rounded on two devices (outputs are O(1)); a
    # misread entry moves outputs by O(1).
    on_cpu = wildcat.ops.coreset_attention(q.cpu(), *(t.cpu() for t in views))
    torch.testing.assert_close(got.cpu().float(), on_cpu.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("dtype", FLOATS + [torch.float64])
@pytest.mark.parametrize("n,rank,bins", [(1, 1, 1), (97, 97, 1), (97, 128, 5), (1025, 1025, 16)])
def test_rank_at_least_length_is_exact(dtype, n, rank, bins):
    q, k, v = randn(1, 4, 33, 64, dtype=dtype), randn(1, 2, n, 64, dtype=dtype), randn(1, 2, n, 64, dtype=dtype)
    out = wildcat.scaled_dot_product_attention(*to("cuda", q, k, v), enable_gqa=True, r=rank, num_bins=bins).cpu()
    exact = ref.exact_attention(q.double(), k.double(), v.double())
    if dtype == torch.float64:
        torch.testing.assert_close(out, exact, atol=1e-10, rtol=0)
        return
    sdpa = torch.nn.functional.scaled_dot_product_attention(*to("cuda", q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1))).cpu()
    sdpa_err = (sdpa.double() - exact).abs().max()
    assert (out.double() - exact).abs().max() <= 2 * sdpa_err  # no worse than twice torch's SDPA


def test_rank_far_above_length_keeps_every_key():
    """r >> N keeps every key (§2.4). With every bin kept exactly the per-slot workspaces get no
    slots: sized by r, as they were, 2^40 slots asked for petabytes."""
    k, v = randn(2, 300, 64, dtype=torch.bfloat16), randn(2, 300, 64, dtype=torch.bfloat16)
    gpu = wildcat.ops.compress_kv(*to("cuda", k, v), 2**40, 3, None, None, 5)
    assert torch.equal(gpu.core_keys.cpu(), k) and torch.equal(gpu.core_values.cpu(), v.float())
    assert torch.equal(gpu.core_weights.cpu(), torch.ones(2, 300))
    assert torch.equal(gpu.core_indices.cpu(), torch.arange(300).expand(2, -1))


def test_more_kept_entries_than_one_write_grid_covers():
    """More than 65,535 chunks of 16 slots in one group: the coreset's write kernel steps over the
    chunks its grid cannot hold (it used to refuse r above 1,048,560)."""
    n = 65_536 * 16 + 1000
    k, v = randn(1, n, 8, dtype=torch.bfloat16), randn(1, n, 8, dtype=torch.bfloat16)
    gpu = wildcat.ops.compress_kv(*to("cuda", k, v), n, 1, None, None, 5)
    assert torch.equal(gpu.core_keys.cpu(), k) and torch.equal(gpu.core_values.cpu(), v.float())
    assert torch.equal(gpu.core_weights.cpu(), torch.ones(1, n))
    assert torch.equal(gpu.core_indices.cpu(), torch.arange(n)[None])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_overflow_shift_found_over_several_bins_and_column_tiles_matches_the_cpu(dtype):
    """Norms large enough that the coreset's entries reach the shift's limit in every group, with
    8 bins per group: the group's largest entry, and so its shift, comes from several finalize CTAs
    (one bin and one tile would let any reduction pass)."""
    groups, n, rank, bins = 4, 2048, 64, 8
    k, v = randn(groups, n, 64, dtype=dtype) * 40, randn(groups, n, 64, dtype=dtype)
    q_norm = torch.full((groups,), 320.0)
    cpu = wildcat.ops.compress_kv(k, v, rank, bins, None, q_norm, 3)
    largest = torch.maximum(cpu.core_values.abs().amax((1, 2)), cpu.core_weights.abs().amax(1))
    assert (largest > 1e36).all(), largest
    gpu = wildcat.ops.compress_kv(*to("cuda", k, v), rank, bins, None, q_norm.cuda(), 3)
    assert_same_compression(gpu, cpu)


def test_zero_query_norm_with_key_differences_beyond_float():
    """A zero query norm makes the key scale 0 and every kernel entry 1; the resident kernel's
    distances from raw 16-bit key differences overflow float there (keys near +-2e38) and must not
    turn 0 * inf into NaN."""
    groups, n = 4, 3000
    k = (torch.rand(groups, n, 64, generator=torch.Generator().manual_seed(0)) * 4 - 2) * 1e38
    k, v = k.to(torch.bfloat16), randn(groups, n, 64, dtype=torch.bfloat16)
    assert torch.isinf(k.float()[:, :1] - k.float()).any()
    q_norm = torch.zeros(groups)
    cpu = wildcat.ops.compress_kv(k, v, 32, 2, None, q_norm, 4)
    gpu = wildcat.ops.compress_kv(*to("cuda", k, v), 32, 2, None, q_norm.cuda(), 4)
    assert torch.isfinite(gpu.core_values).all() and torch.isfinite(gpu.core_weights).all()
    assert_same_compression(gpu, cpu)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("shape,kv_heads", [((2, 8, 1000, 64), 2), ((1, 4, 3, 128), 4), ((40, 2051, 32), 5),
                                            ((5, 64), 1), ((2, 4, 0, 64), 2), ((1, 2, 300, 20), 1)])
def test_query_norm_matches_the_reference(dtype, shape, kv_heads):
    """The CUDA kernel (16-bit queries with E a power-of-two multiple of 8 up to 256; the others take
    the ATen form) against the reference helper on the CPU: float32 sums, so within a few ulps."""
    q = randn(*shape, dtype=dtype) * 3
    got = wildcat.ops.query_norm(q.cuda(), kv_heads).cpu()
    expected = ref.query_norm_per_kv_head(q, kv_heads)
    assert got.shape == expected.shape and got.dtype == expected.dtype
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)


def test_float64_matches_the_oracle():
    q, k, v = randn(2, 4, 30, 32, dtype=torch.float64), randn(2, 2, 400, 32, dtype=torch.float64), randn(2, 2, 400, 16, dtype=torch.float64)
    got = wildcat.scaled_dot_product_attention(*to("cuda", q, k, v), enable_gqa=True, r=40, num_bins=4, seed=3).cpu()
    torch.testing.assert_close(got, ref.wildcat_attention(q, k, v, 40, 4, seed=3), atol=1e-10, rtol=0)


@pytest.mark.parametrize("rank", [12, 24, 100])
def test_rp_nystrom_matches_cpu(rank):
    """One pivot per step (12) and block pivoting (24; 100 in four rounds or more)."""
    x = randn(8, 300, 16) * 0.4
    cpu = wildcat.ops.rp_nystrom(x, rank, seed=5)
    gpu = [t.cpu() for t in wildcat.ops.rp_nystrom(x.cuda(), rank, seed=5)]
    assert torch.equal(gpu[0], cpu[0])
    torch.testing.assert_close(gpu[1], cpu[1], atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(gpu[2], cpu[2], atol=1e-6, rtol=0)


def test_seed_on_the_device_equals_the_same_seed_on_the_host():
    q, k, v = to("cuda", randn(1, 4, 50, 64, dtype=torch.bfloat16), randn(1, 4, 900, 64, dtype=torch.bfloat16),
                  randn(1, 4, 900, 64, dtype=torch.bfloat16))
    host = wildcat.scaled_dot_product_attention(q, k, v, r=32, num_bins=2, seed=77)
    device = wildcat.scaled_dot_product_attention(q, k, v, r=32, num_bins=2, seed=torch.tensor(77, device="cuda"))
    assert torch.equal(host, device)


def test_outputs_are_finite_bounded_and_deterministic():
    q, k, v = to("cuda", randn(2, 8, 700, 64, dtype=torch.bfloat16) * 2, randn(2, 8, 3000, 64, dtype=torch.bfloat16) * 2,
                  randn(2, 8, 3000, 64, dtype=torch.bfloat16))
    a = wildcat.scaled_dot_product_attention(q, k, v, r=64, num_bins=4, seed=1)
    b = wildcat.scaled_dot_product_attention(q, k, v, r=64, num_bins=4, seed=1)
    assert torch.equal(a, b)
    assert torch.isfinite(a).all()
    assert (a >= v.amin(-2, keepdim=True)).all() and (a <= v.amax(-2, keepdim=True)).all()


def test_manual_cuda_graph_capture_replays():
    q, k, v = to("cuda", randn(1, 4, 256, 64, dtype=torch.bfloat16), randn(1, 4, 2048, 64, dtype=torch.bfloat16),
                  randn(1, 4, 2048, 64, dtype=torch.bfloat16))
    fixed, fresh = wildcat.WildCat(r=64, num_bins=4, seed=11), wildcat.WildCat(r=64, num_bins=4)
    expected = fixed(q, k, v)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up outside the graph
        for _ in range(2):
            fixed(q, k, v)
            fresh(q, k, v)
    torch.cuda.current_stream().wait_stream(stream)
    graph_fixed, graph_fresh = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph_fixed):
        out_fixed = fixed(q, k, v)
    with torch.cuda.graph(graph_fresh):
        out_fresh = fresh(q, k, v)
    q.copy_(randn(1, 4, 256, 64, dtype=torch.bfloat16).cuda())  # replays see new inputs
    expected = fixed(q, k, v)
    graph_fixed.replay()
    assert torch.equal(out_fixed, expected)
    graph_fresh.replay()
    first = out_fresh.clone()
    graph_fresh.replay()
    assert not torch.equal(out_fresh, first), "the seed drawn on the GPU must change between replays"
    assert torch.isfinite(out_fresh).all()


def test_compile_reduce_overhead():
    """cudagraph trees take the whole compiled call: the int seed becomes a tensor on the inputs'
    device inside the graph (a CPU one was an input outside their memory pool)."""
    q, k, v = to("cuda", randn(1, 4, 256, 64, dtype=torch.bfloat16), randn(1, 4, 2048, 64, dtype=torch.bfloat16),
                  randn(1, 4, 2048, 64, dtype=torch.bfloat16))
    module = wildcat.WildCat(r=64, num_bins=4, seed=5)
    compiled = torch.compile(module, mode="reduce-overhead", fullgraph=True)
    for _ in range(3):
        out = compiled(q, k, v)
    # inductor may round the query norm differently: bf16 tolerance, same pivots
    torch.testing.assert_close(out, module(q, k, v))


def test_cuda_build_reports_cuda():
    assert wildcat.cuda_built()


def test_bad_cuda_input_raises_instead_of_crashing():
    """Errors raised in the CUDA glue reach Python as exceptions (run apart: a crash must not
    take the test session down)."""
    code = ("import torch, wildcat\n"
            "q = torch.randn(1, 1, 4, 300, device='cuda')\n"
            "wildcat.ops.coreset_attention(q, q, q, torch.ones(1, 1, 4, device='cuda'))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "ValueError" in result.stderr and "E, D <= 256" in result.stderr
