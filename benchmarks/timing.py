"""Per-call timing shared by the benchmark scripts: CUDA events around each call on the GPU (host
work that overlaps queued GPU work is not counted), perf_counter on the CPU."""

from __future__ import annotations

import time

import torch


def call_times_ms(fn, calls: int, cuda: bool) -> list[float]:
    """Milliseconds of each of `calls` calls of fn (the caller warms up first)."""
    times = []
    for _ in range(calls):
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
    return times
