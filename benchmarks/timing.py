"""Per-call timing shared by the benchmark scripts: CUDA events around each call on the GPU (host
work that overlaps queued GPU work is not counted), perf_counter on the CPU.

call_times_ms waits for each call before the next, so the GPU is idle when a call starts and the
host's dispatch of the call (about 20 µs for one wildcat op) is inside its interval: the time a
user sees for one call. queued_call_times_ms enqueues the calls back to back, as
triton.testing.do_bench does, so each call's dispatch overlaps the calls before it and its
interval is the GPU's time for it: what a bandwidth is computed from."""

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


def queued_call_times_ms(fn, calls: int) -> list[float]:
    """GPU milliseconds of each of `calls` calls of fn queued back to back (CUDA only; the caller
    warms up first): one event pair per call, one wait at the end."""
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(calls)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    events[-1][1].synchronize()
    return [start.elapsed_time(end) for start, end in events]
