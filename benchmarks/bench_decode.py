"""Decode step over a WildCat-compressed KV cache against exact SDPA over the full cache (issue #6).

For each prompt length N it measures, on one attention layer (batch B, Hq query / Hkv kv heads,
head dim E, one query token):

- cache memory: the full cache (keys + values in the model dtype) and the weighted cache
  (sink + r + window entries: keys in the model dtype, values and weights float32, plus bounds);
- decode step latency: torch SDPA over the full cache, cuDNN backend first (then flash,
  efficient, math: the table says which ran), against the weighted cache's attention, twice:
  `kernel` is wildcat.cache.decode_attention on contiguous entries (the attention call alone),
  `cache` is WeightedKVCache.attention as the transformers integration calls it (live views of
  the growing buffers, one appended token);
- compression time of one layer's cache (compress_kv_cache; median of --slow-iters runs);
- with --prefill: prefill time of a small random Llama (--layers layers, E = 128 heads) on the
  prompt against compress_cache of its whole cache (medians of --slow-iters runs). Its weights
  are random, so its keys are not a trained model's: the compression time can differ there
  (fewer distinct keys stop the pivot loop early).

Times are medians over --iters runs after --warmup runs (CUDA events on the GPU, perf_counter on
the CPU). Writes <out>.md and <out>.json.

GPU (the issue's setting):  python benchmarks/bench_decode.py --out benchmarks/results/h100_decode
CPU smoke test:             python benchmarks/bench_decode.py --device cpu --n 2048 4096 --r 64 \
                                --q-heads 8 --kv-heads 2 --head-dim 64 --dtype float32 --iters 5 \
                                --prefill --layers 1 --out /tmp/decode
"""

from __future__ import annotations

import argparse
import json
import math
import statistics

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from timing import call_times_ms

import wildcat
from wildcat.cache import compress_kv_cache, decode_attention

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def timer(device: torch.device):
    """measure(fn, warmup, iters) -> median seconds per call (benchmarks/timing.py)."""
    def measure(fn, warmup: int, iters: int) -> float:
        for _ in range(warmup):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return statistics.median(call_times_ms(fn, iters, device.type == "cuda")) / 1e3
    return measure


def graph_ms(calls: list, device: torch.device, replays: int = 10, trials: int = 5) -> float:
    """Milliseconds per call on the GPU: the callables `calls` (one per layer) captured in one
    CUDA graph, replayed `replays` times back to back (median of `trials`). A decode step runs as
    one graph of every layer's calls, so no call pays host dispatch, nor a graph launch of its
    own; per-call events (the eager columns) include the host's work whenever it is longer than
    the GPU's."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for fn in calls:
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in calls:
            fn()
    for _ in range(5):
        graph.replay()
    samples = []
    for _ in range(trials):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / (replays * len(calls)))
    return statistics.median(samples)


def sdpa_full(q, k, v):
    """A callable for exact SDPA over the full cache and the backend that runs it.

    cuDNN first, as the issue asks; GQA through enable_gqa, or, where a backend refuses it,
    with K/V repeated to the query heads beforehand (outside the timed call; reported)."""
    group = q.shape[1] // k.shape[1]
    candidates = [("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION),
                  ("efficient", SDPBackend.EFFICIENT_ATTENTION), ("math", SDPBackend.MATH)]
    for name, backend in candidates:
        for repeat in (False, True):
            kk = k.repeat_interleave(group, 1) if repeat else k
            vv = v.repeat_interleave(group, 1) if repeat else v

            def call(kk=kk, vv=vv, backend=backend, repeat=repeat):
                with sdpa_kernel(backend):
                    return F.scaled_dot_product_attention(q, kk, vv, enable_gqa=not repeat)
            try:
                call()
            except RuntimeError:
                continue
            return call, name + (" (kv repeated)" if repeat else "")
    raise RuntimeError("no SDPA backend ran")


def bench_layer(n: int, args, device, dtype, measure) -> dict:
    g = torch.Generator(device=device).manual_seed(n)
    shape = (args.batch, args.kv_heads, n, args.head_dim)
    keys = torch.randn(shape, generator=g, device=device, dtype=dtype)
    values = torch.randn(shape, generator=g, device=device, dtype=dtype)
    query = torch.randn(args.batch, args.q_heads, 1, args.head_dim, generator=g, device=device, dtype=dtype)
    scale = 1.0 / math.sqrt(args.head_dim)

    compress = lambda: compress_kv_cache(keys, values, args.r, args.num_bins, sink=args.sink,  # noqa: E731
                                         window=args.window, seed=0)
    compress_s = measure(compress, 1, args.slow_iters)
    cache = compress()
    new = torch.randn(args.batch, args.kv_heads, 1, args.head_dim, generator=g, device=device, dtype=dtype)
    cache.append(new, new)
    k_live, v_live, w_live = (t.contiguous() for t in cache.live())

    sdpa, backend = sdpa_full(query, keys, values)
    row = {
        "N": n,
        "entries": cache.length,
        "full_bytes": keys.nbytes + values.nbytes,
        "weighted_bytes": cache.nbytes(),
        "sdpa_backend": backend,
        "sdpa_ms": 1e3 * measure(sdpa, args.warmup, args.iters),
        "kernel_ms": 1e3 * measure(lambda: decode_attention(query, k_live, v_live, w_live, scale, cache.value_min,
                                                            cache.value_max), args.warmup, args.iters),
        "cache_ms": 1e3 * measure(lambda: cache.attention(query, scale), args.warmup, args.iters),
        "compress_layer_ms": 1e3 * compress_s,
    }
    if device.type == "cuda":
        def kernel(k=k_live, v=v_live, w=w_live):
            return decode_attention(query, k, v, w, scale, cache.value_min, cache.value_max)
        # one layer's cache 32 times (it stays in L2), then 32 layers' caches (each read from HBM,
        # as in a real step; the full caches exceed L2 either way)
        row["sdpa_graph_ms"] = graph_ms([sdpa] * args.graph_layers, device)
        row["kernel_graph_ms"] = graph_ms([kernel] * args.graph_layers, device)
        row["speedup_graph"] = row["sdpa_graph_ms"] / row["kernel_graph_ms"]
        del sdpa
        sdpa_layers = [sdpa_full(query, torch.randn_like(keys), torch.randn_like(values))[0]
                       for _ in range(args.graph_layers)]
        row["sdpa_layers_ms"] = graph_ms(sdpa_layers, device)
        del sdpa_layers
        kernel_layers = [lambda k=k_live.clone(), v=v_live.clone(), w=w_live.clone(): kernel(k, v, w)
                         for _ in range(args.graph_layers)]
        row["kernel_layers_ms"] = graph_ms(kernel_layers, device)
        row["speedup_layers"] = row["sdpa_layers_ms"] / row["kernel_layers_ms"]
    row["memory_ratio"] = row["full_bytes"] / row["weighted_bytes"]
    row["speedup_kernel"] = row["sdpa_ms"] / row["kernel_ms"]
    row["speedup_cache"] = row["sdpa_ms"] / row["cache_ms"]
    return row


def bench_prefill(n: int, args, device, dtype, measure) -> dict:
    from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

    from wildcat.integrations.transformers import compress_cache

    config = LlamaConfig(vocab_size=1024, hidden_size=args.q_heads * args.head_dim, intermediate_size=4096,
                         num_hidden_layers=args.layers, num_attention_heads=args.q_heads,
                         num_key_value_heads=args.kv_heads, head_dim=args.head_dim, max_position_embeddings=n + 16)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype).eval()
    model.set_attn_implementation("sdpa")
    ids = torch.randint(0, 1024, (args.batch, n), device=device)

    def prefill():
        cache = DynamicCache(config=config)
        with torch.no_grad():
            model.model(input_ids=ids, past_key_values=cache, use_cache=True)
        return cache

    prefill_s = measure(prefill, 1, args.slow_iters)
    cache = prefill()
    squeeze = lambda: compress_cache(cache, args.r, args.num_bins, sink=args.sink, window=args.window,  # noqa: E731
                                     seed=0)
    compress_s = measure(squeeze, 1, args.slow_iters)
    del model, cache
    return {"N": n, "layers": args.layers, "prefill_ms": 1e3 * prefill_s, "compress_ms": 1e3 * compress_s,
            "compress_over_prefill": compress_s / prefill_s}


def markdown(meta: dict, rows: list, prefill_rows: list) -> str:
    lines = [f"# Decode step over a WildCat-compressed KV cache ({meta['device_name']})", "",
             f"batch {meta['batch']}, {meta['q_heads']} query / {meta['kv_heads']} kv heads, E = D = {meta['head_dim']}, "
             f"{meta['dtype']}; r = {meta['r']}, num_bins = {meta['num_bins']}, sink = {meta['sink']}, "
             f"window = {meta['window']}; one query token; medians of {meta['iters']} runs "
             f"after {meta['warmup']} warm-up runs. `kernel`: decode_attention on contiguous entries; "
             "`cache`: WeightedKVCache.attention as the transformers integration calls it.", "",
             "| N | entries | full cache MB | weighted MB | memory ratio | SDPA backend | SDPA ms | kernel ms | "
             "cache ms | speed-up kernel | speed-up cache | compress 1 layer ms |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['N']} | {r['entries']} | {r['full_bytes'] / 2**20:.2f} | {r['weighted_bytes'] / 2**20:.3f} "
                     f"| {r['memory_ratio']:.1f}x | {r['sdpa_backend']} | {r['sdpa_ms']:.4f} | {r['kernel_ms']:.4f} "
                     f"| {r['cache_ms']:.4f} | {r['speedup_kernel']:.2f}x | {r['speedup_cache']:.2f}x "
                     f"| {r['compress_layer_ms']:.1f} |")
    graphed = [r for r in rows if "kernel_graph_ms" in r]
    if graphed:
        lines += ["", f"GPU time per call, as a decode step runs it (every layer's calls in one CUDA graph): "
                  f"{meta['graph_layers']} calls captured in one graph, 10 replays back to back, median of 5 such "
                  "runs. `one cache`: the same layer's cache in every call (the weighted cache stays in L2); "
                  f"`{meta['graph_layers']} caches`: a distinct cache per call, as the layers of a model (read "
                  "from HBM).", "",
                  "| N | SDPA one cache ms | kernel one cache ms | speed-up | SDPA "
                  f"{meta['graph_layers']} caches ms | kernel {meta['graph_layers']} caches ms | speed-up |",
                  "|---|---|---|---|---|---|---|"]
        for r in graphed:
            lines.append(f"| {r['N']} | {r['sdpa_graph_ms']:.4f} | {r['kernel_graph_ms']:.4f} | {r['speedup_graph']:.2f}x "
                         f"| {r['sdpa_layers_ms']:.4f} | {r['kernel_layers_ms']:.4f} | {r['speedup_layers']:.2f}x |")
    if prefill_rows:
        lines += ["", f"Prompt compression against prefill: random Llama, {prefill_rows[0]['layers']} layers, "
                  f"hidden {meta['q_heads'] * meta['head_dim']}, SDPA prefill.", "",
                  "| N | prefill ms | compress_cache ms | compress / prefill |", "|---|---|---|---|"]
        for r in prefill_rows:
            lines.append(f"| {r['N']} | {r['prefill_ms']:.1f} | {r['compress_ms']:.1f} | "
                         f"{r['compress_over_prefill']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=list(DTYPES), default="bfloat16")
    p.add_argument("--n", type=int, nargs="+", default=[32768, 131072])
    p.add_argument("--r", type=int, default=512)
    p.add_argument("--num-bins", type=int, default=16)
    p.add_argument("--sink", type=int, default=32)
    p.add_argument("--window", type=int, default=32)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--q-heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--graph-layers", type=int, default=32, help="calls per CUDA graph (GPU)")
    p.add_argument("--slow-iters", type=int, default=3, help="runs (median) of compression and prefill")
    p.add_argument("--prefill", action="store_true", help="also time prefill of a random Llama against compress_cache")
    p.add_argument("--layers", type=int, default=2, help="layers of the random Llama (--prefill)")
    p.add_argument("--out", required=True, help="output path without extension: writes <out>.md and <out>.json")
    args = p.parse_args()

    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    measure = timer(device)
    rows = []
    for n in args.n:
        rows.append(bench_layer(n, args, device, dtype, measure))
        print(rows[-1], flush=True)
    prefill_rows = []
    if args.prefill:
        for n in args.n:
            prefill_rows.append(bench_prefill(n, args, device, dtype, measure))
            print(prefill_rows[-1], flush=True)
    meta = dict(vars(args), device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
                torch=torch.__version__, wildcat=wildcat.__version__, cuda_built=wildcat.cuda_built())
    with open(args.out + ".json", "w") as f:
        json.dump({"meta": meta, "decode": rows, "prefill": prefill_rows}, f, indent=2)
    text = markdown(meta, rows, prefill_rows)
    with open(args.out + ".md", "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
