#!/usr/bin/env python
"""Speed and error of WildCat attention against exact attention (protocol: ../shared/BENCHMARKS.md).

Two modes:
  bench (default): time wildcat, the plain-PyTorch oracle (wildcat.reference) and torch SDPA side by
      side on the same inputs; report speed-up over the fastest SDPA backend, exact-equivalent
      TFLOP/s, the attention phase's achieved bandwidth, peak extra memory and error vs fp32 exact.
  tau: error only; relative Frobenius error of tau="lambert" vs tau="constant" (value centring on
      and off), averaged over seeds, per input kind, so the default tau is chosen by measurement.

Outputs go to benchmarks/results/<name>.{md,csv,json,png} (<name>_tau.{md,json} in tau mode).
Examples:
  python benchmarks/bench_attention.py --name h100_suite                        # GPU defaults
  python benchmarks/bench_attention.py --name cpu_smoke --n 1024..8192 --heads 4 --r 128 \
      --num-bins 1 16 --inputs gaussian clustered --phases
  python benchmarks/bench_attention.py --mode tau --name cpu_smoke --n 1024 2048
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from timing import call_times_ms, queued_call_times_ms

import wildcat
from wildcat import reference

RESULTS = Path(__file__).resolve().parent / "results"
H100_BW = 3.35e12  # bytes/s, HBM3 of the H100 SXM, the bar of BENCHMARKS.md
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

# Input distributions. Queries come from the same distribution as keys (same per-head projection or
# centres; a query head uses the parameters of the kv head it reads), values are always N(0,1).
LOWRANK, LOWRANK_NOISE = 8, 0.1
CLUSTERS, CLUSTER_SPREAD = 32, 0.25
HEAVY_SIGMA = 0.5
KINDS = {
    "gaussian": "i.i.d. N(0,1) entries",
    "lowrank": f"rank-{LOWRANK} projection of N(0,1) codes (random per head, unit variance per "
               f"coordinate) + {LOWRANK_NOISE}*N(0,1) noise",
    "clustered": f"{CLUSTERS} N(0,1) centres per head; point = random centre + {CLUSTER_SPREAD}*N(0,1)",
    "heavytail": f"N(0,1) vectors scaled per row by a log-normal magnitude exp({HEAVY_SIGMA}*z), z~N(0,1)",
}


def parse_ints(tokens):
    """'1024 4096' or '2^10..2^18' / '1024..8192' (a range steps by powers of two)."""
    def one(x):
        base, _, exp = x.partition("^")
        return int(base) ** int(exp) if exp else int(base)

    out = []
    for tok in tokens:
        for part in str(tok).split(","):
            if ".." in part:
                lo, hi = (one(x) for x in part.split(".."))
                while lo <= hi:
                    out.append(lo)
                    lo *= 2
            elif part:
                out.append(one(part))
    return out


def make_inputs(kind, B, H, Hkv, N, E, dtype, device, seed):
    """q (B,H,N,E), k, v (B,Hkv,N,E) drawn in fp32 from `kind`, then cast to dtype."""
    g = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, device=device)

    per_q = H // Hkv  # query head h shares the parameters of kv head h // per_q

    if kind == "gaussian":
        draw = lambda heads, expand: randn(B, heads, N, E)  # noqa: E731
    elif kind == "lowrank":
        proj = randn(B, Hkv, LOWRANK, E) / math.sqrt(LOWRANK)
        draw = lambda heads, expand: (randn(B, heads, N, LOWRANK) @ proj.repeat_interleave(expand, 1)  # noqa: E731
                                      + LOWRANK_NOISE * randn(B, heads, N, E))
    elif kind == "clustered":
        centres = randn(B, Hkv, CLUSTERS, E)

        def draw(heads, expand):
            idx = torch.randint(0, CLUSTERS, (B, heads, N, 1), generator=g, device=device)
            return (torch.take_along_dim(centres.repeat_interleave(expand, 1), idx, dim=2)
                    + CLUSTER_SPREAD * randn(B, heads, N, E))
    elif kind == "heavytail":
        draw = lambda heads, expand: randn(B, heads, N, E) * torch.exp(HEAVY_SIGMA * randn(B, heads, N, 1))  # noqa: E731
    else:
        raise ValueError(f"unknown input kind {kind!r}; choose from {list(KINDS)}")
    k = draw(Hkv, 1).to(dtype)
    q = draw(H, per_q).to(dtype)
    v = randn(B, Hkv, N, E).to(dtype)
    return q, k, v


def exact_fp32(q, k, v, chunk_bytes):
    """softmax(Q K^T / sqrt(E)) V in fp32, chunked over queries so N = 32k fits in memory."""
    B, H, M, E = q.shape
    rep = H // k.shape[1]
    k32 = k.float().repeat_interleave(rep, 1).transpose(-1, -2)
    v32 = v.float().repeat_interleave(rep, 1)
    out = torch.empty(B, H, M, v.shape[-1], device=q.device)
    rows = max(1, chunk_bytes // (B * H * k.shape[2] * 4))
    for s in range(0, M, rows):
        logits = (q[:, :, s:s + rows].float() @ k32) * (1.0 / math.sqrt(E))
        out[:, :, s:s + rows] = torch.softmax(logits, -1) @ v32
    return out


def errors(out, exact):
    diff = out.float() - exact
    return {"rel_fro": (diff.norm() / exact.norm()).item(), "max_abs": diff.abs().max().item()}


def mean_v_baseline(v, exact):
    """Error of the trivial answer: each head's mean value broadcast to every query."""
    mean = v.float().mean(2, keepdim=True).repeat_interleave(exact.shape[1] // v.shape[1], 1)
    return errors(mean.expand_as(exact), exact)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench(fn, device, reps, warmup, budget_s):
    """Returns (first output, median ms, reps used, peak extra bytes or None).

    The first call is a warm-up whose output is kept for the error and whose allocations give peak
    extra memory (max_memory_allocated minus what was allocated before, i.e. the inputs and
    whatever the harness holds). Slow calls get fewer repetitions so a sweep stays inside
    budget_s per method and size; the number used is reported."""
    cuda = device.type == "cuda"
    sync(device)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    first = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() - base if cuda else None
    for _ in range(warmup - 1):
        fn()
    n = max(1, min(reps, int(budget_s / max(first, 1e-9))))
    return out, statistics.median(call_times_ms(fn, n, cuda)), n, peak


def sdpa_methods(device, gqa):
    """(name, context factory) per SDPA variant: every backend pinned on CUDA, default on CPU."""
    call = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)  # noqa: E731
    if device.type != "cuda":
        return [("sdpa", None, call)]
    from torch.nn.attention import SDPBackend, sdpa_kernel
    backends = [("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION),
                ("efficient", SDPBackend.EFFICIENT_ATTENTION)]
    return [(f"sdpa-{name}", (lambda b=b: sdpa_kernel(b)), call) for name, b in backends]


def short_reason(exc, caught):
    msgs = [str(w.message).splitlines()[0] for w in caught if str(w.message).strip()]
    text = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return "; ".join([text] + msgs[:2])[:300]


def run_bench(args, device, dtype, meta):
    rows, skipped = [], {}
    B, H, Hkv, E = args.batch, args.heads, args.kv_heads, args.head_dim
    gqa = Hkv != H
    chunk = 512 * 2**20 if device.type == "cuda" else 128 * 2**20
    for kind in args.inputs:
        for N in args.n:
            q, k, v = make_inputs(kind, B, H, Hkv, N, E, dtype, device, args.seed + N)
            exact = exact_fp32(q, k, v, chunk) if N <= args.error_max_n else None
            flops = 2.0 * B * H * N * N * (E + E)  # = 4 B H M N E: exact attention's two matmuls
            size_rows = []

            def record(method, setting, fn, r=None, bins=None, ctx=None, bytes_moved=None, keep_err=True):
                caught = []
                try:
                    with warnings.catch_warnings(record=True) as caught:
                        warnings.simplefilter("always")
                        if ctx is not None:
                            with ctx():
                                out, ms, n, peak = bench(fn, device, args.reps, args.warmup, args.budget_s)
                        else:
                            out, ms, n, peak = bench(fn, device, args.reps, args.warmup, args.budget_s)
                except Exception as exc:  # a backend that cannot run this dtype/shape: say why
                    reason = skipped[f"{method} {setting}".strip()] = short_reason(exc, caught)
                    print(f"  {kind:9s} N={N:<7d} {method:18s} {setting:14s} skipped: {reason}", flush=True)
                    return
                row = dict(inputs=kind, method=method, setting=setting, r=r, num_bins=bins, N=N,
                           ms=ms, reps=n, tflops=flops / (ms * 1e-3) / 1e12,
                           peak_extra_mib=None if peak is None else peak / 2**20)
                if bytes_moved is not None:
                    # a bandwidth is bytes over the GPU's time: calls queued back to back, so that
                    # the op's host dispatch overlaps earlier calls (benchmarks/timing.py)
                    gpu_ms = statistics.median(queued_call_times_ms(fn, max(n, 10))) if device.type == "cuda" else ms
                    row["attn_gpu_ms"] = gpu_ms
                    row["attn_gbs"] = bytes_moved(out) / (gpu_ms * 1e-3) / 1e9
                    if device.type == "cuda":
                        row["attn_bw_frac"] = row["attn_gbs"] * 1e9 / H100_BW
                if exact is not None and keep_err:
                    row.update(errors(out, exact))
                size_rows.append(row)
                print(f"  {kind:9s} N={N:<7d} {method:18s} {setting:14s} {ms:10.3f} ms  (x{n})", flush=True)

            for name, ctx, call in sdpa_methods(device, gqa):
                if "sdpa" in args.methods:
                    record(name, "", lambda call=call: call(q, k, v), ctx=ctx)
            for r in args.r:
                for bins in args.num_bins:
                    setting = f"r={r} bins={bins}"
                    opts = dict(tau=args.tau, center_values=args.center_values)
                    if "wildcat" in args.methods:
                        record("wildcat", setting, lambda: wildcat.scaled_dot_product_attention(
                            q, k, v, enable_gqa=gqa, r=r, num_bins=bins, seed=args.seed, min_seq_len=0, **opts), r, bins)
                    if args.phases:
                        # The two phases as the function runs them (query norm included in compress),
                        # so the attention phase's bandwidth can be read off on its own.
                        qn = lambda: wildcat.ops.query_norm(q, Hkv)  # noqa: E731
                        compress = lambda: wildcat.compress_kv(  # noqa: E731
                            k, v, r, bins, query_norm=qn(), seed=args.seed, **opts)
                        record("wildcat:compress", setting, compress, r, bins, keep_err=False)
                        kv = compress()
                        core_bytes = sum(t.numel() * t.element_size() for t in
                                         (kv.core_keys, kv.core_values, kv.core_weights, kv.value_min, kv.value_max))
                        moved = lambda out: q.numel() * q.element_size() + out.numel() * out.element_size() + core_bytes  # noqa: E731
                        record("wildcat:attend", setting, lambda: wildcat.coreset_attention(
                            q, kv, center_values=args.center_values), r, bins, bytes_moved=moved)
                        del kv
                    if "reference" in args.methods and N <= args.reference_max_n:
                        record("reference", setting, lambda: reference.wildcat_attention(
                            q, k, v, r, bins, seed=args.seed, **opts), r, bins)
            if exact is not None:
                size_rows.append(dict(inputs=kind, method="mean of V", setting="(trivial)", N=N,
                                      **mean_v_baseline(v, exact)))
            fastest = min((x["ms"] for x in size_rows if x["method"].startswith("sdpa")), default=None)
            for x in size_rows:
                if fastest is not None and x.get("ms"):
                    x["speedup"] = fastest / x["ms"]
            rows += size_rows
            q = k = v = exact = None  # free this size before the next is drawn
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows, skipped


def run_tau(args, device, dtype):
    """Relative Frobenius error of each tau rule, mean and std over seeds (inputs and pivots)."""
    B, H, Hkv, E = args.batch, args.heads, args.kv_heads, args.head_dim
    chunk = 512 * 2**20 if device.type == "cuda" else 128 * 2**20
    rows = []
    for kind in args.inputs:
        for N in args.n:
            errs, base = {}, []
            for s in range(args.tau_seeds):
                q, k, v = make_inputs(kind, B, H, Hkv, N, E, dtype, device, 1000 * s + N)
                exact = exact_fp32(q, k, v, chunk)
                base.append(mean_v_baseline(v, exact)["rel_fro"])
                for r in args.r:
                    for bins in args.num_bins:
                        for center in (False, True):
                            for tau in ("lambert", "constant"):
                                out = wildcat.scaled_dot_product_attention(
                                    q, k, v, enable_gqa=Hkv != H, r=r, num_bins=bins, seed=s, tau=tau,
                                    center_values=center, min_seq_len=0)
                                errs.setdefault((r, bins, center, tau), []).append(errors(out, exact)["rel_fro"])
            for r in args.r:
                for bins in args.num_bins:
                    for center in (False, True):
                        lam, con = errs[(r, bins, center, "lambert")], errs[(r, bins, center, "constant")]
                        rows.append(dict(inputs=kind, N=N, r=r, num_bins=bins, center_values=center,
                                         lambert=statistics.mean(lam), constant=statistics.mean(con),
                                         lambert_std=statistics.pstdev(lam), constant_std=statistics.pstdev(con),
                                         mean_of_v=statistics.mean(base)))
            print(f"  tau: {kind} N={N} done", flush=True)
    return rows


def out_path(stem, suffix):
    return stem.parent / (stem.name + suffix)  # not with_suffix: names may contain dots


def fmt(x, spec=".3g"):
    return "–" if x is None else format(x, spec)


def bench_table(rows, device):
    # on the GPU the bandwidth comes from the phase's queued GPU time, not the ms column (a call alone)
    bw_head = "attn BW GB/s (% of 3.35 TB/s), queued" if device.type == "cuda" else "attn BW GB/s"
    lines = [f"| inputs | method | setting | N | ms | reps | speed-up vs fastest SDPA | exact-equiv TFLOP/s "
             f"| {bw_head} | peak extra MiB | rel Frobenius err | max-abs err |",
             "|" + "---|" * 12]
    for x in rows:
        bw = fmt(x.get("attn_gbs"), ".1f")
        if x.get("attn_bw_frac") is not None:
            bw += f" ({100 * x['attn_bw_frac']:.1f}%)"
        lines.append(f"| {x['inputs']} | {x['method']} | {x['setting']} | {x['N']} | {fmt(x.get('ms'), '.4g')} "
                     f"| {x.get('reps', '–')} | {fmt(x.get('speedup'), '.3g')} | {fmt(x.get('tflops'), '.3g')} "
                     f"| {bw} | {fmt(x.get('peak_extra_mib'), '.1f')} | {fmt(x.get('rel_fro'), '.3g')} "
                     f"| {fmt(x.get('max_abs'), '.3g')} |")
    return "\n".join(lines)


def tau_table(rows):
    lines = ["| inputs | N | r | bins | center_values | lambert (mean ± std) | constant (mean ± std) "
             "| constant / lambert | better | mean of V |", "|" + "---|" * 10]
    for x in rows:
        ratio = x["constant"] / x["lambert"]
        lines.append(f"| {x['inputs']} | {x['N']} | {x['r']} | {x['num_bins']} | {x['center_values']} "
                     f"| {x['lambert']:.4f} ± {x['lambert_std']:.4f} | {x['constant']:.4f} ± {x['constant_std']:.4f} "
                     f"| {ratio:.3f} | {'lambert' if ratio > 1 else 'constant'} | {x['mean_of_v']:.4f} |")
    wins = sum(x["constant"] > x["lambert"] for x in rows)
    gm = math.exp(statistics.mean(math.log(x["constant"] / x["lambert"]) for x in rows)) if rows else float("nan")
    lines.append(f"\nlambert is more accurate in {wins}/{len(rows)} settings; geometric mean of "
                 f"constant/lambert error = {gm:.3f} (> 1 favours lambert).")
    for kind in dict.fromkeys(x["inputs"] for x in rows):
        sub = [x for x in rows if x["inputs"] == kind]
        g = math.exp(statistics.mean(math.log(x["constant"] / x["lambert"]) for x in sub))
        lines.append(f"- {kind}: lambert better in {sum(x['constant'] > x['lambert'] for x in sub)}/{len(sub)}, "
                     f"geometric mean constant/lambert = {g:.3f}")
    return "\n".join(lines)


def plot(rows, path):
    """time vs N (log-log, one line per method/setting, first input kind) and error vs r."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not importable: no plot")
        return False
    fig, (ax_t, ax_e) = plt.subplots(1, 2, figsize=(13, 5))
    kind0 = rows[0]["inputs"]
    lines = {}
    for x in rows:
        if x["inputs"] == kind0 and x.get("ms") is not None:
            lines.setdefault(f"{x['method']} {x['setting']}".strip(), []).append((x["N"], x["ms"]))
    for label, pts in lines.items():
        pts.sort()
        ax_t.plot(*zip(*pts), marker="o", ms=3, label=label,
                  linestyle="--" if label.startswith("sdpa") else "-")
    ax_t.set(xscale="log", yscale="log", xlabel="N (= M)", ylabel="median ms", title=f"time ({kind0} inputs)")
    ax_t.legend(fontsize=6, ncol=2)
    err_rows = [x for x in rows if x.get("rel_fro") is not None]
    for kind in dict.fromkeys(x["inputs"] for x in err_rows):
        n_max = max(x["N"] for x in err_rows if x["inputs"] == kind)
        sel = [x for x in err_rows if x["inputs"] == kind and x["N"] == n_max]
        color = None
        for bins in sorted({x["num_bins"] for x in sel if x["method"] == "wildcat"}):
            pts = sorted((x["r"], x["rel_fro"]) for x in sel if x["method"] == "wildcat" and x["num_bins"] == bins)
            line, = ax_e.plot(*zip(*pts), marker="o", label=f"{kind} N={n_max} bins={bins}")
            color = color or line.get_color()  # the kind's baseline takes its first line's colour
        for x in sel:
            if x["method"] == "mean of V":
                ax_e.axhline(x["rel_fro"], linestyle=":", color=color or "gray", linewidth=1)
    ax_e.set(xscale="log", yscale="log", xlabel="r", ylabel="rel. Frobenius error vs fp32 exact",
             title="wildcat error vs r (dotted: mean of V)")
    ax_e.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def environment(device, args):
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
        try:
            name = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if "model name" in line)
        except (OSError, StopIteration):
            pass
    return {
        "device": f"{device.type}: {name}",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "wildcat": wildcat.__version__,
        "wildcat.cuda_built()": wildcat.cuda_built(),
        "cpu threads": f"{torch.get_num_threads()} (os.cpu_count() = {os.cpu_count()})",
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": shlex.join([os.path.basename(sys.executable)] + sys.argv),
        "shapes": f"B={args.batch} H={args.heads} Hkv={args.kv_heads} E=D={args.head_dim} dtype={args.dtype}, M = N",
        "wildcat options": f"tau={args.tau} center_values={args.center_values} seed={args.seed}",
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="input kinds (--inputs):\n" + "\n".join(f"  {k}: {d}" for k, d in KINDS.items()))
    p.add_argument("--mode", choices=["bench", "tau"], default="bench")
    p.add_argument("--name", default=None, help="output file stem under benchmarks/results/")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="auto: cuda if available and wildcat.cuda_built(), else cpu")
    p.add_argument("--n", nargs="+", default=None,
                   help="sequence lengths N = M, e.g. 1024 4096 or 2^10..2^18 (powers of two); "
                        "default 2^10..2^18 on cuda, 1024 4096 16384 on cpu (tau mode: fewer)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=None, help="query heads H (default 32 cuda, 8 cpu)")
    p.add_argument("--kv-heads", type=int, default=None, help="key/value heads (GQA if < H; default H)")
    p.add_argument("--head-dim", type=int, default=64, help="E = D")
    p.add_argument("--dtype", choices=list(DTYPES), default=None, help="default bf16 on cuda, fp32 on cpu")
    p.add_argument("--inputs", nargs="+", choices=list(KINDS), default=None,
                   help="input kinds (see below); default gaussian (tau mode: all)")
    p.add_argument("--r", nargs="+", type=int, default=None, help="coreset sizes (default 64 128 256 512 cuda, 128 cpu)")
    p.add_argument("--num-bins", nargs="+", type=int, default=None, help="default 1 16 64 cuda, 1 16 cpu")
    p.add_argument("--tau", choices=["lambert", "constant"], default=wildcat.DEFAULT_TAU)
    p.add_argument("--center-values", action="store_true")
    p.add_argument("--seed", type=int, default=0, help="pivot seed (fixed) and base of the input seeds")
    p.add_argument("--methods", nargs="+", choices=["wildcat", "reference", "sdpa"],
                   default=["wildcat", "reference", "sdpa"])
    p.add_argument("--phases", action="store_true", help="also time compress_kv and coreset_attention apart")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions, median reported (10 cuda, 3 cpu)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up calls (3 cuda, 1 cpu)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="cap on timed seconds per method and size: slower calls get fewer reps (30 cuda, 10 cpu)")
    p.add_argument("--reference-max-n", type=int, default=None,
                   help="skip wildcat.reference above this N (it is a Python loop; default 16384 cuda, 1024 cpu)")
    p.add_argument("--error-max-n", type=int, default=32768, help="skip error vs exact above this N")
    p.add_argument("--tau-seeds", type=int, default=3, help="tau mode: seeds averaged over")
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)

    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available() and wildcat.cuda_built())
    device = torch.device("cuda" if cuda else "cpu")
    tau_mode = args.mode == "tau"
    pick = lambda value, gpu, cpu: value if value is not None else (gpu if cuda else cpu)  # noqa: E731
    args.n = parse_ints(args.n) if args.n else (
        [4096, 16384, 32768] if tau_mode else parse_ints(["2^10..2^18"])) if cuda else (
        [1024, 4096] if tau_mode else [1024, 4096, 16384])
    args.heads = pick(args.heads, 32, 4 if tau_mode else 8)
    args.kv_heads = args.kv_heads or args.heads
    args.dtype = pick(args.dtype, "bf16", "fp32")
    args.inputs = args.inputs or (list(KINDS) if tau_mode else ["gaussian"])
    args.r = pick(args.r, [128, 256] if tau_mode else [64, 128, 256, 512], [128])
    args.num_bins = pick(args.num_bins, [1, 16] if tau_mode else [1, 16, 64], [1, 16])
    args.reps = pick(args.reps, 10, 3)
    args.warmup = pick(args.warmup, 3, 1)
    args.budget_s = pick(args.budget_s, 30.0, 10.0)
    args.reference_max_n = pick(args.reference_max_n, 16384, 1024)
    args.name = args.name or f"{device.type}_{datetime.date.today().isoformat()}"
    if args.heads % args.kv_heads:
        p.error("--heads must be a multiple of --kv-heads")
    dtype = DTYPES[args.dtype]
    meta = environment(device, args)
    RESULTS.mkdir(parents=True, exist_ok=True)
    header = "\n".join(f"- {k}: {v}" for k, v in meta.items())
    kinds_doc = "\n".join(f"- {k}: {KINDS[k]}" for k in args.inputs)
    print(header, flush=True)

    if tau_mode:
        rows = run_tau(args, device, dtype)
        table = tau_table(rows)
        stem = RESULTS / f"{args.name}_tau"
        text = (f"# tau: lambert vs constant ({args.name})\n\n{header}\n\nInputs:\n{kinds_doc}\n\n"
                f"Relative Frobenius error vs fp32 exact attention, mean ± std over {args.tau_seeds} seeds "
                f"(seed s draws both the inputs and the pivots).\n\n{table}\n")
        out_path(stem, ".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    else:
        rows, skipped = run_bench(args, device, dtype, meta)
        table = bench_table(rows, device)
        stem = RESULTS / args.name
        notes = "\n".join(f"- skipped {k}: {v}" for k, v in skipped.items()) or "- none skipped"
        text = (f"# wildcat benchmark ({args.name})\n\n{header}\n\nInputs (q, k from the kind; v ~ N(0,1)):\n"
                f"{kinds_doc}\n\nms: median of `reps` timed calls after warm-up ({'CUDA events' if cuda else 'perf_counter'}). "
                "speed-up: fastest SDPA ms / ms. TFLOP/s: 4·B·H·M·N·E / time (exact-equivalent). "
                "attn BW: (Q read + O written + coreset read) bytes / time of coreset_attention"
                + (", the GPU's time per call with the calls queued back to back (the ms column times a call "
                   "alone, its host dispatch included; benchmarks/timing.py). " if cuda else ". ") +
                "peak extra: max_memory_allocated during the first call minus memory allocated before it "
                "(inputs and harness tensors). Errors vs fp32 exact attention (chunked over queries), "
                f"only for N ≤ {args.error_max_n}; 'mean of V' is the trivial answer for scale.\n\n"
                f"{notes}\n\n{table}\n")
        with open(out_path(stem, ".csv"), "w", newline="") as f:
            keys = list(dict.fromkeys(k for x in rows for k in x))
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            writer.writerows(rows)
        out_path(stem, ".json").write_text(json.dumps({"meta": meta, "skipped": skipped, "rows": rows}, indent=1))
        if rows and not args.no_plot and plot(rows, out_path(stem, ".png")):
            text += f"\n![time and error]({out_path(stem, '.png').name})\n"
    out_path(stem, ".md").write_text(text)
    print("\n" + table + f"\n\nwritten: {stem}.*")


if __name__ == "__main__":
    main()
