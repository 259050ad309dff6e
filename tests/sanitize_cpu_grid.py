"""The degenerate-input cases of tests/python/test_degenerate.py through a sanitizer build of the
CPU ops (scripts/sanitize_cpu.sh): `python tests/sanitize_cpu_grid.py build/asan/libwildcat.so`,
with libasan preloaded. Loads the library directly (not the wildcat package, whose own extension
would register the ops a second time) and calls torch.ops.wildcat.*. Exits non-zero if an output
for finite input is not finite; AddressSanitizer and UBSan abort the process on any error."""

import math
import sys

import torch


def main(library: str) -> int:
    torch.ops.load_library(library)
    ops = torch.ops.wildcat
    gen = torch.Generator().manual_seed(0)
    failures = cases = 0

    def attend(q, k, v, rank, bins, seed=1):
        q_norm = torch.linalg.vector_norm(q.float() if q.dtype != torch.float64 else q, dim=-1).amax(-1)
        core = ops.compress_kv(k, v, rank, bins, None, q_norm.to(k.dtype), torch.tensor(seed), "lambert", False, 1e-5)
        return ops.coreset_attention(q, core[0], core[1], core[2], None, core[4], core[5], False)

    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        def randn(*shape, scale=1.0):
            return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)

        q = randn(2, 3, 5, 16)
        k = randn(2, 3, 90, 16)
        v = randn(2, 3, 90, 8)
        grid = [
            (q, randn(2, 3, 1, 16).expand(2, 3, 90, 16).contiguous(), v, 8, 4),  # all keys equal
            (q, k[:, :, torch.arange(90) % 3].contiguous(), v, 16, 1),            # 3 distinct keys
            (q, torch.zeros_like(k), v, 8, 2),                                    # zero keys
            (torch.zeros_like(q), k, v, 8, 2),                                    # zero queries
            (q, k[:, :, :1].contiguous(), v[:, :, :1].contiguous(), 4, 1),        # N = 1
            (q, k[:, :, :32].contiguous(), v[:, :, :32].contiguous(), 32, 4),     # N = r
            (q, k[:, :, :33].contiguous(), v[:, :, :33].contiguous(), 32, 4),     # N = r + 1
            (q, k[:, :, :6].contiguous(), v[:, :, :6].contiguous(), 4, 4),        # bins of length 1
            (q, randn(2, 3, 90, 16, scale=1e-6), v, 8, 2),                        # tiny key norms
            (q, randn(2, 3, 90, 16, scale=1e4 if dtype != torch.float16 else 1e3), v, 8, 2),  # huge
            (q, k, randn(2, 3, 90, 8, scale=2e4 if dtype == torch.float16 else 1e30).clamp(-6e4 if dtype == torch.float16 else -3e38, 6e4 if dtype == torch.float16 else 3e38), 16, 2),  # large values
            (q, k, v, 200, 3),                                                    # r > N
        ]
        for index, (qq, kk, vv, rank, bins) in enumerate(grid):
            cases += 1
            out = attend(qq, kk, vv, rank, bins)
            if not bool(torch.isfinite(out).all()):
                failures += 1
                print(f"non-finite output: {dtype}, grid case {index}")
        # non-finite input: must not crash or read out of bounds (its outputs are unspecified)
        for bad in (math.nan, math.inf):
            for target in ("key", "value", "query"):
                qq, kk, vv = q.clone(), k.clone(), v.clone()
                {"key": kk, "value": vv, "query": qq}[target][1, 2, 3, 0] = bad
                cases += 1
                attend(qq, kk, vv, 12, 2)
        x = randn(2, 50, 8)
        for rank, tol in ((10, 1e-5), (60, 0.0), (1, 0.5)):
            cases += 1
            pivots, kinv, rows = ops.rp_nystrom(x, rank, torch.tensor(3), tol)
            failures += not bool(torch.isfinite(kinv).all() and torch.isfinite(rows).all())
        cases += 1
        empty = ops.compress_kv(k[:, :, :0], v[:, :, :0], 8, 1, None, None, None, "lambert", False, 1e-5)
        failures += empty[1].shape != (2, 3, 0, 8)
    print(f"sanitize_cpu_grid: {cases} cases, {failures} non-finite or wrong outputs")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
