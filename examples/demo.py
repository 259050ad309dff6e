#!/usr/bin/env python
"""WildCat attention against exact attention: speed and error on one representative size.

Runs on the GPU when there is one and wildcat was built with CUDA, else on the CPU:
  GPU: bf16, B=1, H=32, N=M=65536, E=D=64; torch SDPA with its default backend choice.
  CPU: fp32, B=1, H=8,  N=M=16384, E=D=64; torch SDPA.
WildCat uses r=128 coreset keys per head, with 1 and 16 bins (and 64 on the GPU). Errors are against exact attention
computed in fp32 (chunked over queries); "mean of V" (each head's mean value, for every query) is
the trivial answer, to give the errors a scale. The full harness is benchmarks/bench_attention.py.
"""

import math
import statistics
import time

import torch
import torch.nn.functional as F

import wildcat

cuda = torch.cuda.is_available() and wildcat.cuda_built()
device = torch.device("cuda" if cuda else "cpu")
dtype = torch.bfloat16 if cuda else torch.float32
B, H, N, E = (1, 32, 65536, 64) if cuda else (1, 8, 16384, 64)
WARMUP, REPS = (3, 10) if cuda else (1, 3)


def timed(fn):
    """(output of the first call, median ms over REPS calls after WARMUP warm-up calls)."""
    out = fn()
    for _ in range(WARMUP - 1):
        fn()
    times = []
    for _ in range(REPS):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return out, statistics.median(times)


def exact_fp32(q, k, v, chunk_bytes=256 * 2**20):
    """softmax(Q K^T / sqrt(E)) V in fp32, a block of queries at a time (the full N x N logits
    would not fit)."""
    rows = max(1, chunk_bytes // (q.shape[0] * q.shape[1] * k.shape[2] * 4))
    kt, v32 = k.float().transpose(-1, -2), v.float()
    out = torch.empty(*q.shape[:-1], v.shape[-1], device=q.device)
    for s in range(0, q.shape[2], rows):
        out[:, :, s:s + rows] = torch.softmax(q[:, :, s:s + rows].float() @ kt / math.sqrt(q.shape[-1]), -1) @ v32
    return out


def errors(out, exact):
    diff = out.float() - exact
    return (diff.norm() / exact.norm()).item(), diff.abs().max().item()


def main():
    name = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name}; torch {torch.__version__}; wildcat {wildcat.__version__} "
          f"(CUDA kernels built: {wildcat.cuda_built()})")
    print(f"shapes: B={B} H={H} N=M={N} E=D={E} {str(dtype).replace('torch.', '')}, "
          "i.i.d. N(0,1) q, k, v, non-causal\n")

    # r >= N: every key is kept with weight 1, so WildCat is exact attention (up to rounding).
    g = torch.Generator(device=device).manual_seed(1)
    small = [torch.randn(1, 2, 64, E, generator=g, device=device) for _ in range(3)]
    diff = (wildcat.scaled_dot_product_attention(*small, r=64, seed=0, min_seq_len=0) - exact_fp32(*small)).abs().max().item()
    print(f"r >= N check (N=64, r=64, fp32): max |wildcat - exact| = {diff:.1e}\n")

    q, k, v = (torch.randn(B, H, N, E, generator=g, device=device).to(dtype) for _ in range(3))
    exact = exact_fp32(q, k, v)
    results = [("torch SDPA (exact)", *timed(lambda: F.scaled_dot_product_attention(q, k, v)))]
    for bins in ((1, 16, 64) if cuda else (1, 16)):
        results.append((f"wildcat r=128 bins={bins}", *timed(
            lambda: wildcat.scaled_dot_product_attention(q, k, v, r=128, num_bins=bins, seed=0,
                                                 min_seq_len=0))))
    sdpa_ms = results[0][2]

    print(f"{'method':<24}{'time ms':>10}{'speed-up':>10}{'rel Frob err':>14}{'max-abs err':>13}")
    for label, out, ms in results:
        rel, mx = errors(out, exact)
        print(f"{label:<24}{ms:>10.2f}{sdpa_ms / ms:>9.2f}x{rel:>14.4f}{mx:>13.4f}")
    rel, mx = errors(v.float().mean(2, keepdim=True).expand_as(exact), exact)
    print(f"{'mean of V (trivial)':<24}{'':>10}{'':>10}{rel:>14.4f}{mx:>13.4f}")
    print(f"\ntimes: median of {REPS} after {WARMUP} warm-up ({'CUDA events' if cuda else 'wall clock'}); "
          "errors vs fp32 exact attention.\ni.i.d. Gaussian q.k is the hard regime (BENCHMARKS.md); for structured "
          "inputs run benchmarks/bench_attention.py --inputs lowrank clustered heavytail.")


if __name__ == "__main__":
    main()
