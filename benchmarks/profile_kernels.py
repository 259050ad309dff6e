"""CUDA time per kernel of one WildCat call (torch.profiler), to see which phase bounds it.

    python benchmarks/profile_kernels.py [--n 16384 65536] [--num-bins 1 16 64]
"""

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

import wildcat


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, nargs="+", default=[16384, 65536])
    parser.add_argument("--num-bins", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--r", type=int, default=128)
    args = parser.parse_args()
    for n in args.n:
        q, k, v = (torch.randn(1, args.heads, n, args.head_dim, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        for bins in args.num_bins:
            call = lambda: wildcat.coreset_attention(  # noqa: E731
                q, wildcat.compress_kv(k, v, args.r, bins, query_norm=wildcat.ops.query_norm(q, args.heads), seed=1))
            call()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                call()
                torch.cuda.synchronize()
            print(f"\n== N={n} H={args.heads} E={args.head_dim} r={args.r} num_bins={bins} ==")
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=60))


if __name__ == "__main__":
    main()
