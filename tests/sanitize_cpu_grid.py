"""The degenerate-input cases of tests/python/test_degenerate.py through a sanitizer build of the
CPU ops (scripts/sanitize_cpu.sh): `python tests/sanitize_cpu_grid.py build/asan/libwildcat.so`,
with libasan preloaded. Loads the library directly (not the wildcat package, whose own extension
would register the ops a second time) and calls torch.ops.wildcat.*. Exits non-zero if an output
for finite input is not finite; AddressSanitizer and UBSan abort the process on any error."""

import sys

import torch
from degenerate_inputs import finite_cases, non_finite_cases


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
        grid = finite_cases(dtype, "cpu", 16, 8, gen)
        for label, qq, kk, vv, rank, bins in grid:
            cases += 1
            out = attend(qq, kk, vv, rank, bins)
            if not bool(torch.isfinite(out).all()):
                failures += 1
                print(f"non-finite output: {dtype}, {label}")
        q, k, v = grid[-1][1:4]
        for _, qq, kk, vv in non_finite_cases(q, k, v):
            cases += 1
            attend(qq, kk, vv, 12, 2)
        x = torch.randn(2, 50, 8, generator=gen, dtype=torch.float64).to(dtype)
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
