"""Determinism, concurrency and resource use (docs/RELIABILITY.md).

Same seed → bit-identical outputs across runs, CPU thread counts and CUDA graph replays; several
Python threads (CPU) or CUDA streams give the serial results; repeated calls leave memory flat;
peak extra memory per op follows the formulas in docs/RELIABILITY.md.
"""

import gc
import resource
import threading
import tracemalloc

import pytest
import torch

import wildcat


def inputs(device="cpu", dtype=torch.float32, b=2, hq=4, hkv=2, m=40, n=600, e=32, dv=24, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, m, e, generator=gen, dtype=torch.float64).to(dtype).to(device)
    k = torch.randn(b, hkv, n, e, generator=gen, dtype=torch.float64).to(dtype).to(device)
    v = torch.randn(b, hkv, n, dv, generator=gen, dtype=torch.float64).to(dtype).to(device)
    return q, k, v


def everything(q, k, v, seed=5):
    """Every op's outputs for one input: rp_nystrom, compress_kv, coreset_attention."""
    core = wildcat.compress_kv(k, v, r=48, num_bins=3, query_norm=wildcat.query_norm_per_kv_head(q, k.shape[-3]),
                               seed=seed)
    out = wildcat.coreset_attention(q, core)
    factor = torch.ops.wildcat.rp_nystrom(k * 0.3, 20, torch.tensor(seed), 1e-5)
    return (*core, out, *factor)


def assert_bit_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.dtype == y.dtype and torch.equal(x, y)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_same_seed_is_bit_identical_across_runs_and_thread_counts(dtype):
    q, k, v = inputs(dtype=dtype)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = everything(q, k, v)
        torch.set_num_threads(2)
        two = everything(q, k, v)
        again = everything(q, k, v)
    finally:
        torch.set_num_threads(threads)
    assert_bit_equal(one, two)
    assert_bit_equal(two, again)
    different = everything(q, k, v, seed=6)
    assert not torch.equal(different[3], one[3]), "another seed must pick other pivots"


def test_python_threads_give_the_serial_results():
    problems = [inputs(seed=s, n=300 + 50 * s) for s in range(6)]
    serial = [everything(*p, seed=s) for s, p in enumerate(problems)]
    results = [None] * len(problems)
    errors = []

    def work(i):
        try:
            for _ in range(3):
                got = everything(*problems[i], seed=i)
                assert_bit_equal(got, serial[i])
            results[i] = got
        except Exception as exc:  # reported below: an assertion in a thread would be lost
            errors.append((i, exc))

    workers = [threading.Thread(target=work, args=(i,)) for i in range(len(problems))]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert not errors, errors
    for got, want in zip(results, serial):
        assert_bit_equal(got, want)


def rss_kb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() // 1024


def test_memory_flat_over_10000_cpu_calls():
    """10,000 small calls through the public API: neither Python objects (tracemalloc) nor the
    process's resident memory (C++ allocations included) may grow after warm-up."""
    q, k, v = inputs(b=1, hq=2, hkv=1, m=4, n=24, e=8, dv=4)
    for _ in range(200):  # warm-up: allocator caches, dispatcher tables
        wildcat.scaled_dot_product_attention(q, k, v, enable_gqa=True, r=8, num_bins=2, seed=1)
    gc.collect()
    tracemalloc.start()
    start_py = tracemalloc.get_traced_memory()[0]
    start_rss = rss_kb()
    for i in range(10_000):
        wildcat.scaled_dot_product_attention(q, k, v, enable_gqa=True, r=8, num_bins=2, seed=i)
    gc.collect()
    grown_py = tracemalloc.get_traced_memory()[0] - start_py
    tracemalloc.stop()
    grown_rss = rss_kb() - start_rss
    # a leak of even 16 bytes per call would be 160 kB; the margins are allocator noise
    assert grown_py < 64 * 1024, f"Python memory grew by {grown_py} B over 10,000 calls"
    assert grown_rss < 2048, f"resident memory grew by {grown_rss} kB over 10,000 calls"


PEAK_CHILD = r"""
import resource, sys, torch, wildcat
op, dtype, b, h, n, m, e, dv, r, bins = sys.argv[1], getattr(torch, sys.argv[2]), *map(int, sys.argv[3:])
torch.set_num_threads(2)
# drawn in their dtype: a float32 draw converted afterwards would raise the high-water mark first
q, k, v = (torch.randn(*s, dtype=dtype) for s in ((b, h, m, e), (b, h, n, e), (b, h, n, dv)))
qn = wildcat.query_norm_per_kv_head(q)
small = [t[..., :64, :].clone() for t in (q, k, v)]  # warm-up: thread pool, dispatcher, allocator
core = wildcat.ops.compress_kv(small[1], small[2], 8, 1, None, qn, 1)
wildcat.ops.coreset_attention(small[0], *core[:3], None, core.value_min, core.value_max)
# the coreset's shape does not depend on N: a short sequence keeps its compression off the mark
core = wildcat.ops.compress_kv(k[..., :4 * r, :], v[..., :4 * r, :], r, bins, None, qn, 1) if op == "attend" else None
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
if op == "compress":
    result = wildcat.ops.compress_kv(k, v, r, bins, None, qn, 1)
else:
    result = wildcat.ops.coreset_attention(q, *core[:3], None, core.value_min, core.value_max)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
"""


def peak_extra_bytes(op, dtype, b, h, n, m, e, dv, r, bins):
    """Growth of the resident high-water mark over one call in a fresh process: every
    allocation of the op (tensors and C++ scratch), its outputs included, at page granularity."""
    import subprocess
    import sys
    args = [str(x) for x in (b, h, n, m, e, dv, r, bins)]
    done = subprocess.run([sys.executable, "-c", PEAK_CHILD, op, str(dtype).removeprefix("torch."), *args],
                          capture_output=True, text=True, timeout=300, check=True)
    return int(done.stdout.split()[-1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_peak_memory_of_the_ops_follows_the_formulas(dtype):
    """Peak extra memory against docs/RELIABILITY.md's formulas. compress_kv: an accumulation-
    dtype copy of K and V unless they are float32 already, the outputs, and per running task
    (group, bin) scratch of about 4·n_b·(E + r_b + 6) + 8·r_b·(r_b + D) bytes. coreset_attention:
    float32 copies of Q (unless float32) and the float32 output, plus the cast output."""
    b, h, n, m, e, dv, r, bins = 1, 8, 32768, 16384, 64, 64, 128, 2
    size = 2 if dtype == torch.bfloat16 else 4
    mib = 1 << 20
    kv_copy = 0 if size == 4 else 4 * b * h * n * (e + dv)
    n_b, r_b = n // bins, r // bins
    scratch = 2 * (4 * n_b * (e + r_b + 6) + 8 * r_b * (r_b + dv))  # two threads
    outputs = 4 * b * h * (r * dv + r) + 8 * b * h * r + size * b * h * r * e
    compress = peak_extra_bytes("compress", dtype, b, h, n, m, e, dv, r, bins)
    predicted = kv_copy + scratch + outputs
    assert compress <= 1.25 * predicted + 8 * mib, (compress, predicted)
    assert compress >= 0.5 * kv_copy, (compress, predicted)
    attend = peak_extra_bytes("attend", dtype, b, h, n, m, e, dv, r, bins)
    q_copy = 0 if size == 4 else 4 * b * h * m * e
    predicted = q_copy + 4 * b * h * m * dv + (size * b * h * m * dv if size != 4 else 0)
    assert 0.5 * predicted <= attend <= 1.25 * predicted + 8 * mib, (attend, predicted)


@pytest.mark.cuda
def test_cuda_graph_replays_are_bit_identical_with_a_fixed_seed():
    q, k, v = inputs("cuda", torch.bfloat16, n=2048, e=64, dv=64)
    fixed = wildcat.WildCat(r=64, num_bins=4, seed=11)
    eager = fixed(q, k, v)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fixed(q, k, v)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fixed(q, k, v)
    for _ in range(5):
        graph.replay()
        assert torch.equal(out, eager)


@pytest.mark.cuda
def test_cuda_streams_give_the_serial_results():
    problems = [inputs("cuda", torch.bfloat16, seed=s, n=1000 + 100 * s, e=64, dv=64) for s in range(4)]
    serial = [everything(*p, seed=s) for s, p in enumerate(problems)]
    torch.cuda.synchronize()
    streams = [torch.cuda.Stream() for _ in problems]
    results = []
    for s, (stream, p) in enumerate(zip(streams, problems)):
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            results.append(everything(*p, seed=s))
    torch.cuda.synchronize()
    for got, want in zip(results, serial):
        assert_bit_equal(got, want)


@pytest.mark.cuda
def test_cuda_memory_flat_over_100000_calls():
    q, k, v = inputs("cuda", torch.bfloat16, b=1, hq=2, hkv=1, m=4, n=64, e=64, dv=64)
    seed = torch.tensor(1, device="cuda")
    for _ in range(100):
        wildcat.scaled_dot_product_attention(q, k, v, enable_gqa=True, r=16, num_bins=2, seed=seed)
    torch.cuda.synchronize()
    start = torch.cuda.memory_allocated()
    for _ in range(100_000):
        wildcat.scaled_dot_product_attention(q, k, v, enable_gqa=True, r=16, num_bins=2, seed=seed)
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == start


@pytest.mark.cuda
def test_cuda_peak_extra_memory_of_the_ops():
    """Measured by torch's caching allocator; the formulas are in docs/RELIABILITY.md."""
    b, h, n, e, dv, m, r, bins = 1, 8, 16384, 64, 64, 1024, 128, 16
    q, k, v = inputs("cuda", torch.bfloat16, b=b, hq=h, hkv=h, m=m, n=n, e=e, dv=dv)
    qn = wildcat.query_norm_per_kv_head(q)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    core = wildcat.ops.compress_kv(k, v, r, bins, None, qn, 1)
    torch.cuda.synchronize()
    compress = torch.cuda.max_memory_allocated() - base
    print(f"compress_kv peak extra {compress} B")
    assert compress < 4 * b * h * n * (e + dv), "compress_kv must not hold float32 copies of K and V"
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    wildcat.ops.coreset_attention(q, *core[:3], None, core.value_min, core.value_max)
    torch.cuda.synchronize()
    attend = torch.cuda.max_memory_allocated() - base
    print(f"coreset_attention peak extra {attend} B")
    assert attend <= 2 * b * h * m * dv + 4 * b * h * r * (e + dv + 1) + (1 << 20)
