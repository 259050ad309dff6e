"""Every CUDA kernel path on small inputs, and the degenerate inputs of test_degenerate.py, for
compute-sanitizer (memcheck, racecheck, initcheck, synccheck):
`compute-sanitizer --tool memcheck python tests/sanitize_grid.py` (scripts/gpu_check.sh sanitize). Exits non-zero if an
output is not finite; the sanitizer's own report says whether memory was used correctly."""

import sys

import torch
from degenerate_inputs import finite_cases, non_finite_cases

import wildcat


def main() -> int:
    torch.manual_seed(0)
    dev = "cuda"
    failures = 0
    cases = [
        # (dtype, N, r, bins, E, D, Hq, Hkv, M): smem-resident and streamed keys, exact bins,
        # early stop, both attention kernels, GQA
        (torch.bfloat16, 300, 32, 3, 64, 64, 4, 2, 70),
        (torch.float16, 200, 16, 2, 128, 128, 2, 2, 65),
        (torch.float32, 97, 16, 3, 32, 16, 2, 1, 33),
        (torch.float64, 64, 64, 4, 16, 8, 2, 2, 9),          # every bin exact
        (torch.bfloat16, 2500, 24, 1, 64, 64, 2, 2, 40),     # keys streamed from global memory
        (torch.bfloat16, 130, 200, 1, 64, 64, 2, 2, 17),     # r > N
        (torch.bfloat16, 9000, 24, 2, 64, 64, 2, 2, 40),     # resident bins over clusters of 5 CTAs
        (torch.float16, 3000, 24, 2, 128, 128, 2, 2, 33),    # resident, E = 128, 3 CTAs
        (torch.bfloat16, 20000, 8, 2, 64, 64, 2, 1, 9),      # resident, 10 CTAs (non-portable cluster)
        (torch.bfloat16, 8192, 16, 2, 64, 64, 1, 1, 9),      # resident, bins of 4,096: 8 CTAs of 512 keys
        (torch.bfloat16, 4100, 40, 1, 64, 64, 2, 2, 9),      # block pivoting over clusters of 4 CTAs
        (torch.float32, 3000, 33, 2, 40, 24, 2, 1, 9),       # bins of 17 and 16 slots: both pivot kernels
        (torch.float64, 900, 80, 1, 16, 8, 2, 2, 9),         # block pivoting in double
        (torch.bfloat16, 700, 40, 1, 64, 37, 2, 2, 9),       # weighted sums: values one by one (D = 37)
        (torch.float16, 600, 144, 1, 32, 80, 2, 2, 9),       # weighted sums: two blocks of pivots and columns
    ]
    for dtype, n, r, bins, e, dv, hq, hkv, m in cases:
        q = torch.randn(1, hq, m, e, device=dev).to(dtype)
        k = torch.randn(1, hkv, n, e, device=dev).to(dtype)
        v = torch.randn(1, hkv, n, dv, device=dev).to(dtype)
        out = wildcat.scaled_dot_product_attention(q, k, v, enable_gqa=True, r=r, num_bins=bins, seed=1,
                                                   min_seq_len=0)
        failures += not bool(torch.isfinite(out).all())
        # key padding: a full row, a short one, an empty one (bins without keys)
        mask = torch.arange(n, device=dev) < torch.tensor([[n], [n // 3], [0]], device=dev)
        out = wildcat.scaled_dot_product_attention(q.expand(3, -1, -1, -1), k.expand(3, -1, -1, -1),
                                                   v.expand(3, -1, -1, -1), attn_mask=mask[:, None, None, :],
                                                   enable_gqa=True, r=r, num_bins=bins, seed=1, min_seq_len=0)
        failures += not bool(torch.isfinite(out).all())
    duplicates = torch.randn(3, 64, device=dev)[torch.arange(500, device=dev) % 3].reshape(1, 1, 500, 64)
    out = wildcat.scaled_dot_product_attention(duplicates, duplicates, duplicates, r=32, seed=2,
                                               min_seq_len=0)  # early stop
    failures += not bool(torch.isfinite(out).all())
    # the decode path over a cache's live prefix: clusters with 16-byte asynchronous copies
    # (aligned rows), element-wise copies (rows of 129), several chunks per span (5000 entries)
    q = torch.randn(2, 32, 1, 128, device=dev).to(torch.bfloat16)
    for width, size, live in ((128, 700, 577), (129, 700, 577), (128, 5200, 5000)):
        keys = torch.randn(2, 8, size, width, device=dev).to(torch.bfloat16)
        values, weights = torch.randn(2, 8, size, width, device=dev), torch.rand(2, 8, size, device=dev)
        out = wildcat.ops.coreset_attention(q, keys[:, :, :live, -128:], values[:, :, :live, -128:],
                                            weights[:, :, :live])
        failures += not bool(torch.isfinite(out).all())
    # the tensor-core kernel with several query blocks per warp (the next block's copy in flight),
    # a partial last block and a padded last key chunk (r = 100)
    for e in (64, 128):
        q = torch.randn(1, 32, 4000, e, device=dev).to(torch.bfloat16)
        keys = torch.randn(1, 32, 100, e, device=dev).to(torch.bfloat16)
        out = wildcat.ops.coreset_attention(q, keys, torch.randn(1, 32, 100, e, device=dev),
                                            torch.rand(1, 32, 100, device=dev))
        failures += not bool(torch.isfinite(out).all())
    for rank in (12, 40):  # one pivot per step; block pivoting
        pivots, kinv, rows = wildcat.ops.rp_nystrom(torch.randn(2, 150, 8, device=dev) * 0.5, rank, seed=3)
        failures += not bool(torch.isfinite(kinv).all() and torch.isfinite(rows).all())
    failures += degenerate_cases(dev)
    torch.cuda.synchronize()
    print(f"sanitize_grid: {failures} non-finite outputs")
    return 1 if failures else 0


def degenerate_cases(dev) -> int:
    """The inputs of tests/python/test_degenerate.py (tests/degenerate_inputs.py), every dtype: the
    kernels must stay in bounds and initialised on them."""
    failures = 0
    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        cases = finite_cases(dtype, dev, 64, 64, gen)
        for label, q, k, v, rank, bins in cases:
            out = wildcat.scaled_dot_product_attention(q, k, v, r=rank, num_bins=bins, seed=4, min_seq_len=0)
            if not bool(torch.isfinite(out).all()):
                failures += 1
                print(f"non-finite output: {dtype}, {label}")
        for _, q, k, v in non_finite_cases(*cases[-1][1:4]):
            wildcat.scaled_dot_product_attention(q, k, v, r=12, num_bins=2, seed=4, min_seq_len=0)
    return failures


if __name__ == "__main__":
    sys.exit(main())
