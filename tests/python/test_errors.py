"""Bad input: a clear exception naming the argument, never a crash or a silent wrong answer."""

import pytest
import torch

import wildcat

from conftest import randn

sdpa = wildcat.scaled_dot_product_attention


def qkv(m=8, n=40, e=16, d=8, lead=(2, 3), dtype=torch.float32):
    return randn(*lead, m, e, dtype=dtype), randn(*lead, n, e, dtype=dtype), randn(*lead, n, d, dtype=dtype)


@pytest.mark.parametrize(
    "make,error,match",
    [
        (lambda q, k, v: sdpa(q[0, 0, 0], k, v), ValueError, "rank"),                       # wrong rank
        (lambda q, k, v: sdpa(q, k[:1], v[:1]), ValueError, "batch dims"),                 # batch mismatch
        (lambda q, k, v: sdpa(q, k[:, :2], v[:, :2]), ValueError, "enable_gqa"),           # head mismatch
        (lambda q, k, v: sdpa(q, k[:, :2], v[:, :2], enable_gqa=True), ValueError, "multiple"),
        (lambda q, k, v: sdpa(q[..., :8], k, v), ValueError, "E"),                         # E mismatch
        (lambda q, k, v: sdpa(q, k, v[..., :30, :]), ValueError, "value"),                  # N mismatch
        (lambda q, k, v: sdpa(q, k.double(), v), TypeError, "dtype"),                       # mixed dtypes
        (lambda q, k, v: sdpa(q.long(), k.long(), v.long()), TypeError, "floating"),        # integers
        (lambda q, k, v: sdpa(q > 0, k > 0, v > 0), TypeError, "floating"),                 # bools
        (lambda q, k, v: sdpa(q, k, v, r=0), ValueError, "r must be >= 1"),
        (lambda q, k, v: sdpa(q, k, v, num_bins=0), ValueError, "num_bins must be >= 1"),
        (lambda q, k, v: sdpa(q, k, v, num_bins=41), ValueError, "num_bins must be <= N"),
        (lambda q, k, v: sdpa(q, k, v, r=4, num_bins=5), ValueError, "num_bins"),
        (lambda q, k, v: sdpa(q, k, v, scale=0.0), ValueError, "scale"),
        (lambda q, k, v: sdpa(q, k, v, scale=-1.0), ValueError, "scale"),
        (lambda q, k, v: sdpa(q, k, v, scale=float("inf")), ValueError, "scale"),
        (lambda q, k, v: sdpa(q, k, v, scale=float("nan")), ValueError, "scale"),
        (lambda q, k, v: sdpa(q, k, v, tau="bogus"), ValueError, "tau"),
        (lambda q, k, v: sdpa(q, k, v, tol=2.0), ValueError, "tol"),
        (lambda q, k, v: sdpa(q, k, v, r=2.0), TypeError, "r must be an int"),
        (lambda q, k, v: sdpa(q, k, v, seed="1"), TypeError, "seed"),
        (lambda q, k, v: sdpa(q.numpy(), k, v), TypeError, "query"),
    ],
)
def test_sdpa_rejects(make, error, match):
    q, k, v = qkv()
    with pytest.raises(error, match=match):
        make(q, k, v)


def test_mixed_devices_are_rejected():
    q, k, v = qkv()
    with pytest.raises(RuntimeError, match="one device"):
        sdpa(q, k.to("meta"), v)
    with pytest.raises(RuntimeError, match="device"):
        wildcat.ops.compress_kv(k, v.to("meta"), 8)


@pytest.mark.parametrize(
    "make,error,match",
    [
        (lambda k, v: wildcat.ops.compress_kv(k[0, 0, 0], v[0, 0, 0], 8), ValueError, "keys must have shape"),
        (lambda k, v: wildcat.ops.compress_kv(k, v[..., :30, :], 8), ValueError, "N ="),
        (lambda k, v: wildcat.ops.compress_kv(k, v[:1], 8), ValueError, "leading dims"),
        (lambda k, v: wildcat.ops.compress_kv(k, v.double(), 8), TypeError, "one dtype"),
        (lambda k, v: wildcat.ops.compress_kv(k.int(), v.int(), 8), TypeError, "floating-point"),
        (lambda k, v: wildcat.ops.compress_kv(k, v, 0), ValueError, "rank"),
        (lambda k, v: wildcat.ops.compress_kv(k, v, 8, 0), ValueError, "num_bins"),
        (lambda k, v: wildcat.ops.compress_kv(k, v, 8, query_norm=torch.ones(3)), ValueError, "query_norm"),
        (lambda k, v: wildcat.ops.compress_kv(k, v, 8, seed=torch.ones(2, dtype=torch.int64)), ValueError, "seed"),
        (lambda k, v: wildcat.ops.compress_kv(k, v, 8, seed=torch.ones(())), TypeError, "seed"),
        (lambda k, v: wildcat.ops.rp_nystrom(k, 0), ValueError, "rank"),
        (lambda k, v: wildcat.ops.rp_nystrom(k[0, 0, 0], 4), ValueError, "points"),
    ],
)
def test_ops_reject(make, error, match):
    _, k, v = qkv()
    with pytest.raises(error, match=match):
        make(k, v)


@pytest.mark.parametrize(
    "change,error,match",
    [
        (lambda a: {**a, "query": a["query"][..., :8]}, ValueError, "E ="),
        (lambda a: {**a, "core_keys": a["core_keys"].double()}, TypeError, "one dtype"),
        (lambda a: {**a, "core_values": a["core_values"][..., :3, :]}, ValueError, "core_values"),
        (lambda a: {**a, "core_weights": a["core_weights"][..., :3]}, ValueError, "core_weights"),
        (lambda a: {**a, "query": a["query"][:1]}, ValueError, "leading dims"),
        (lambda a: {**a, "value_min": a["value_min"][..., :2]}, ValueError, "value_min"),
        (lambda a: {**a, "value_max": None, "center_values": True}, ValueError, "center_values"),
    ],
)
def test_coreset_attention_rejects(change, error, match):
    q, k, v = qkv()
    kv = wildcat.ops.compress_kv(k, v, 8)
    args = dict(query=q, core_keys=kv.core_keys, core_values=kv.core_values, core_weights=kv.core_weights,
                value_min=kv.value_min, value_max=kv.value_max, center_values=False)
    with pytest.raises(error, match=match):
        wildcat.ops.coreset_attention(**change(args))
