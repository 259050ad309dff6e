"""Error of five forms of the squared key distance m²|k_l − k_p|² against float64, on the CPU.

For the rounds-with-tensor-cores design (benchmarks/NOTES.md, session 15): the resident and block
kernels form m²|k_l − k_p|² from the 16-bit keys' differences in float32 (one FADD and one FFMA per
coordinate). A tensor-core sweep would take the products k_l · k_p instead (bf16 inputs, exact
products, float32 accumulation) and form s_l + s_p − 2 k_l · k_p. This measures, per input kind, the
error each form puts into the exponent m²|k_l − k_p|² / 2 of the kernel value, at the temperature
compress_kv uses (one bin of 4,096 keys, E = 64, β = 1/8, the Lambert τ):
  diff32    Σ (k_l − k_p)² in float32 (today's kernels)
  dot32     |k_l|² + |k_p|² − 2 k_l · k_p, each a float32 sum of exact products (raw keys)
  split32   the same on centred keys x = k − c (c the bf16-rounded mean, x exact in float32) split
            as x = hi + lo (two bf16): the four bf16 products hi·hi, hi·lo, lo·hi, lo·lo
  split3    the same without lo·lo (three products)
  mixed     |x_l|² + |x_p|² − 2 (k_l · x_p − c · x_p) with x = k − c: the raw keys (exact bf16) against
            the pivot's centred key split in two bf16 parts (two products), the norms in float32
            from exact differences (the tensor-core form session 16 measured on the GPU, there with
            c the mean of the CTA's keys; here the bin's)
Kinds: the benchmark's four, "offset" (every coordinate + 4), "outlier" (one channel + 40) and
"scaled" (queries and keys × 40, so that s = m²|x|² reaches the thousands, as in test_cuda's
overflow-shift test): there every form but diff32 leaves exponent errors near 1e-3 where the
distance is 0, because their rounding scales with the norms instead of the distance.
Duplicates: four keys are copies of pivots; the last column is their largest exponent error, 0 where
a form gives them distance 0 exactly (the CPU's sums run in another order than a tensor core's, so
this column says nothing of the GPU's).
Run from the repository root: python benchmarks/distance_forms.py
"""
import math, sys
import torch

sys.path.insert(0, "benchmarks")
from bench_attention import make_inputs  # noqa: E402
from wildcat.reference import key_scale  # noqa: E402

torch.manual_seed(0)
N, E, P = 4096, 64, 64
beta = 1 / math.sqrt(E)


def bf(t):
    return t.to(torch.bfloat16).to(torch.float32)


def gram32(a, b):  # float32 accumulation of exact products of bf16 values
    return a.float() @ b.float().T


rows = []
for kind in ["gaussian", "lowrank", "clustered", "heavytail", "offset", "outlier", "scaled"]:
    base = "gaussian" if kind in ("offset", "outlier", "scaled") else kind
    q, k, _ = make_inputs(base, 1, 1, 1, N, E, torch.float32, "cpu", seed=1)
    q, k = q[0, 0], k[0, 0].clone()
    if kind == "offset":  # every coordinate shifted by 4
        k += 4.0
    if kind == "outlier":  # one channel far from 0, as in the keys of many language models
        k[:, 0] += 40.0
    if kind == "scaled":  # queries and keys 40x: s in the thousands, as in test_cuda's overflow-shift test
        q, k = q * 40, k * 40
    k = bf(k)
    perm = torch.randperm(N)
    piv, dups = perm[:P], perm[P:P + 4]
    k[dups] = k[piv[:4]]  # four other keys equal the first four pivots (bf16 values in float32)
    mean = k.double().mean(0)
    rk = (k.double() - mean).norm(dim=1).max()
    rq = bf(q).double().norm(dim=1).max()
    m = key_scale(beta, rq, rk, torch.tensor(float(N), dtype=torch.float64), "lambert").item()
    kp = k[piv]
    exact = ((k.double()[:, None, :] - kp.double()[None]) ** 2).sum(-1)  # float64
    diff32 = ((k[:, None, :] - kp[None]) ** 2).sum(-1)
    n = (k * k).sum(-1)
    dot32 = n[:, None] + n[piv][None] - 2 * gram32(k, kp)
    c = bf(mean.float())
    x = k - c
    hi = bf(x)
    lo = bf(x - hi)
    g = gram32(hi, hi[piv]) + gram32(hi, lo[piv]) + gram32(lo, hi[piv]) + gram32(lo, lo[piv])
    nx3 = (hi * hi).sum(-1) + 2 * (hi * lo).sum(-1)  # |x|^2 without lo . lo
    nx = nx3 + (lo * lo).sum(-1)
    split32 = nx[:, None] + nx[piv][None] - 2 * g
    g3 = g - gram32(lo, lo[piv])
    split3 = nx3[:, None] + nx3[piv][None] - 2 * g3
    xp = x[piv]  # the pivots' centred keys, exact in float32
    hp = bf(xp)
    lp = bf(xp - hp)
    y = gram32(k, hp) + gram32(k, lp)  # raw keys against the pivot's two parts
    centre_dot = (c[None, :] * xp).sum(-1)  # c · x_p in float32
    t = (x * x).sum(-1)  # |x_l|^2 in float32
    mixed = (t[:, None] + t[piv][None]) - 2 * (y - centre_dot[None])
    s_max = (m * m * (k.double() - mean).pow(2).sum(-1)).max().item()
    for name, d in (("diff32", diff32), ("dot32", dot32), ("split32", split32), ("split3", split3), ("mixed", mixed)):
        err = (m * m / 2 * (d.double() - exact)).abs()
        near = exact * m * m / 2 < 2  # pairs whose kernel value exceeds e^-2
        dup = err[dups, torch.arange(4)]  # exact distance 0
        rows.append((kind, s_max, name, err.max().item(), err[near].max().item() if near.any() else 0.0,
                     dup.max().item()))
print(f"{'kind':10s} {'s_max':>7s} {'form':8s} {'max exp err':>12s} {'near pairs':>12s} {'duplicates':>12s}")
for kind, s_max, name, e_all, e_near, dup in rows:
    print(f"{kind:10s} {s_max:7.2f} {name:8s} {e_all:12.2e} {e_near:12.2e} {dup:12.2e}")
