"""The coreset-attention phase alone on the GPU: wildcat.ops.coreset_attention over a given coreset.

H = 32 heads, r = 128 coreset entries, bfloat16 queries and keys, float32 values and weights (as
compress_kv returns them); M query rows per head for each M, E = D for each head dim. Prints the
median of 20 CUDA-event timings per shape (benchmarks/timing.py) and the HBM bandwidth it implies, counting the bytes
the phase must move: the queries read and the outputs written (2 · H · M · D · 2 bytes; the
coreset, under 2 MB, stays in L2). Issue #3 asks this phase to reach 60% of the H100's
3.35 TB/s at M >= 65,536. Two timings per shape: each call alone (the GPU idle when it starts, so
the op's host dispatch is inside the interval) and calls queued back to back (the GPU's time per
call, from which the bandwidth is computed).

    python benchmarks/bench_attention_phase.py
"""

import statistics

import torch

from timing import call_times_ms, queued_call_times_ms

import wildcat

HBM_TB_PER_S = 3.35


def main() -> None:
    torch.manual_seed(0)
    heads, rank = 32, 128
    for dim in (64, 128):
        for m in (16384, 65536, 262144):
            q = torch.randn(1, heads, m, dim, device="cuda").bfloat16()
            keys = torch.randn(1, heads, rank, dim, device="cuda").bfloat16()
            values = torch.randn(1, heads, rank, dim, device="cuda")
            weights = torch.rand(1, heads, rank, device="cuda")

            def call():
                return wildcat.ops.coreset_attention(q, keys, values, weights)

            for _ in range(3):
                call()
            torch.cuda.synchronize()
            alone = statistics.median(call_times_ms(call, 20, cuda=True))
            ms = statistics.median(queued_call_times_ms(call, 20))
            gigabytes = 2 * q.numel() * q.element_size() / 1e9
            print(f"D={dim} M={m}: {alone:.3f} ms a call alone, {ms:.3f} ms queued: {gigabytes / ms:.2f} TB/s = "
                  f"{100 * gigabytes / ms / HBM_TB_PER_S:.1f}% of {HBM_TB_PER_S} TB/s")


if __name__ == "__main__":
    main()
