"""Per-call timing shared by the benchmark scripts: CUDA events around each call on the GPU,
perf_counter on the CPU.

call_times_ms waits for each call before the next, so the GPU is idle when a call starts and the
host's dispatch of the call (about 20 µs for one wildcat op) is inside its interval: the time a
user sees for one call. queued_call_times_ms enqueues the calls back to back, as
triton.testing.do_bench does (without its cache flush), so each call's dispatch overlaps the GPU
work of the calls before it: where a call's GPU time exceeds its dispatch, the interval is the
GPU's time for it, what a bandwidth is computed from."""

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
    warms up first): one event pair per call, one wait at the end. One more call goes first,
    untimed, since it starts on an idle GPU with its dispatch inside its interval."""
    if calls < 1:
        raise ValueError(f"queued_call_times_ms: calls must be >= 1, got {calls}")
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(calls)]
    fn()
    for start, end in events:
        start.record()
        fn()
        end.record()
    events[-1][1].synchronize()
    return [start.elapsed_time(end) for start, end in events]
