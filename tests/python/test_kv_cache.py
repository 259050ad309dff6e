"""The weighted KV cache (wildcat.cache) and its transformers integration (issue #6).

Exactness tests compare against exact softmax attention or the uncompressed model: with r at
least the middle length every middle token is kept (weight 1), so the cache must reproduce them.
"""

import math

import pytest
import torch
import torch.nn.functional as F

import wildcat
from wildcat.cache import WeightedKVCache, compress_kv_cache, decode_attention, weighted_attention

from conftest import randn

def exact(query, keys, values, mask=None):
    """Exact attention in float64, GQA by repetition (the oracle may copy)."""
    group = query.shape[1] // keys.shape[1]
    k = keys.double().repeat_interleave(group, dim=1)
    v = values.double().repeat_interleave(group, dim=1)
    return F.scaled_dot_product_attention(query.double(), k, v, attn_mask=mask)


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# ---------------------------------------------------------------- framework-free cache


@pytest.mark.parametrize("n,sink,window", [(97, 8, 8), (40, 32, 32), (5, 32, 32)])
def test_r_covering_middle_is_exact(n, sink, window, device):
    keys, values = randn(2, 2, n, 16, device=device), randn(2, 2, n, 8, device=device)
    cache = compress_kv_cache(keys, values, r=n, sink=sink, window=window, seed=0)
    q = randn(2, 4, 1, 16, device=device)
    torch.testing.assert_close(cache.attention(q).double(), exact(q, keys, values), atol=1e-5, rtol=1e-5)


def test_bf16_gqa_decode_step_is_exact(device):
    # The decode shape in miniature: bf16, E = D = 128, 4 query heads per kv head.
    n = 600
    keys = randn(1, 2, n, 128, dtype=torch.bfloat16, device=device)
    values = randn(1, 2, n, 128, dtype=torch.bfloat16, device=device)
    cache = compress_kv_cache(keys, values, r=n, seed=0)
    q = randn(1, 8, 1, 128, dtype=torch.bfloat16, device=device)
    out = cache.attention(q)
    assert out.dtype == torch.bfloat16
    assert rel_err(out, exact(q, keys, values)) < 1e-2


def test_layout_sink_coreset_window():
    keys, values = randn(1, 2, 300, 16), randn(1, 2, 300, 8)
    cache = compress_kv_cache(keys, values, r=20, sink=4, window=6, seed=3)
    k, v, w = cache.live()
    assert k.shape[2] == 4 + 20 + 6 and cache.seq_length == 300
    torch.testing.assert_close(k[:, :, :4], keys[:, :, :4], rtol=0, atol=0)
    torch.testing.assert_close(v[:, :, -6:], values[:, :, -6:], rtol=0, atol=0)
    assert bool((w[:, :, :4] == 1).all() and (w[:, :, -6:] == 1).all())
    # The middle coreset is compress_kv's, query-agnostic (no query_norm), keys un-centred.
    core = wildcat.compress_kv(keys[:, :, 4:-6], values[:, :, 4:-6], r=20, seed=3)
    torch.testing.assert_close(k[:, :, 4:24], core.core_keys, rtol=0, atol=0)
    torch.testing.assert_close(w[:, :, 4:24], core.core_weights, rtol=0, atol=0)


def test_compression_ratio_and_memory():
    n, e, d = 1000, 32, 16
    keys, values = randn(1, 2, n, e, dtype=torch.bfloat16), randn(1, 2, n, d, dtype=torch.bfloat16)
    cache = compress_kv_cache(keys, values, compression_ratio=8, sink=10, window=30, seed=0)
    r = math.ceil((n - 40) / 8)
    assert cache.length == 10 + r + 30
    per_entry = 2 * (e * 2 + d * 4 + 4)  # 2 kv heads: bf16 key, float32 value and weight
    assert cache.nbytes() == (10 + r + 30) * per_entry + 2 * 2 * d * 4
    full = keys.nbytes + values.nbytes
    assert full / cache.nbytes() > 4


def test_signed_torch_path_matches_op(device):
    # The masked plain-PyTorch form (multi-token steps) and the compiled op agree on a real,
    # signed-weight coreset when the mask hides nothing.
    keys, values = randn(2, 2, 400, 16, device=device), randn(2, 2, 400, 8, device=device)
    cache = compress_kv_cache(keys, values, r=24, sink=4, window=4, num_bins=2, seed=1)
    assert bool((cache.live()[2] < 0).any()), "expected some negative weights"
    q = randn(2, 6, 3, 16, device=device)
    k, v, w = cache.live()
    visible = torch.ones(1, 1, 3, 5, dtype=torch.bool, device=device)
    torch.testing.assert_close(weighted_attention(q, k, v, w, 0.25, cache.value_min, cache.value_max, visible),
                               decode_attention(q, k, v, w, 0.25, cache.value_min, cache.value_max),
                               atol=1e-5, rtol=1e-4)


def test_append_multi_token_causal_is_exact(device):
    n, m = 120, 5
    keys, values = randn(2, 2, n + m, 16, device=device), randn(2, 2, n + m, 8, device=device)
    cache = compress_kv_cache(keys[:, :, :n], values[:, :, :n], r=n, sink=8, window=8, seed=0)
    cache.append(keys[:, :, n:], values[:, :, n:])
    q = randn(2, 4, m, 16, device=device)
    causal = torch.ones(m, n + m, dtype=torch.bool, device=device).tril(diagonal=n)
    tail = causal[None, None, :, n:]
    out = cache.attention(q, tail_mask=tail)
    torch.testing.assert_close(out.double(), exact(q, keys, values, causal), atol=1e-5, rtol=1e-5)


def test_append_grows_and_updates_bounds():
    keys, values = randn(1, 1, 50, 8), randn(1, 1, 50, 4)
    cache = compress_kv_cache(keys, values, r=50, sink=2, window=2, seed=0)
    capacity = cache.keys.shape[2]
    steps = capacity - cache.length + 3  # forces one growth
    new_k, new_v = randn(1, 1, steps, 8), randn(1, 1, steps, 4)
    for i in range(steps):
        cache.append(new_k[:, :, i:i + 1], new_v[:, :, i:i + 1])
    assert cache.keys.shape[2] > capacity and cache.length == 50 + steps
    q = randn(1, 1, 1, 8)
    all_k, all_v = torch.cat([keys, new_k], 2), torch.cat([values, new_v], 2)
    torch.testing.assert_close(cache.attention(q).double(), exact(q, all_k, all_v), atol=1e-5, rtol=1e-5)
    # A value far outside the prompt's range, under a key that takes all the attention: the
    # output follows it, so the clamp bounds must have been widened.
    big_k = 50 * q[:, :1]
    cache.append(big_k, torch.full((1, 1, 1, 4), 100.0))
    assert bool((cache.attention(q) > 99).all())


def test_errors_name_the_argument():
    keys, values = randn(1, 1, 50, 8), randn(1, 1, 50, 4)
    with pytest.raises(ValueError, match="r or compression_ratio"):
        compress_kv_cache(keys, values, r=4, compression_ratio=2.0)
    with pytest.raises(ValueError, match="compression_ratio must be >= 1"):
        compress_kv_cache(keys, values, compression_ratio=0.5)
    with pytest.raises(ValueError, match="keys must have shape"):
        compress_kv_cache(keys[0], values[0])
    with pytest.raises(ValueError, match="sink must be >= 0"):
        compress_kv_cache(keys, values, sink=-1)
    with pytest.raises(ValueError, match="left padding"):
        compress_kv_cache(keys, values, key_mask=torch.tensor([[True] * 49 + [False]]))
    cache = compress_kv_cache(keys, values, r=4)
    with pytest.raises(ValueError, match="keys to append"):
        cache.append(randn(1, 2, 1, 8), randn(1, 2, 1, 4))


def test_left_padding_is_exact_per_row():
    n, pad = 90, 30
    keys, values = randn(2, 2, n, 16), randn(2, 2, n, 8)
    mask = torch.ones(2, n, dtype=torch.bool)
    mask[1, :pad] = False
    cache = compress_kv_cache(keys, values, r=n, sink=8, window=8, key_mask=mask, seed=0)
    q = randn(2, 4, 1, 16)
    out = cache.attention(q)
    torch.testing.assert_close(out[:1].double(), exact(q[:1], keys[:1], values[:1]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1:].double(), exact(q[1:], keys[1:, :, pad:], values[1:, :, pad:]),
                               atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- transformers


try:
    import transformers

    from wildcat.integrations import _hf_cache as hf
except ImportError:
    transformers = hf = None
needs_transformers = pytest.mark.skipif(transformers is None, reason="transformers is not installed")

ARCHS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 16}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": None}),
}
PROMPT, NEW = 160, 6


def tiny_model(arch, device="cpu"):
    config_name, model_name, extra = ARCHS[arch]
    config = getattr(transformers, config_name)(
        vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, **extra)
    model = getattr(transformers, model_name)(config).to(device).eval()
    model.set_attn_implementation(hf.register_cache_attention())
    model.generation_config.pad_token_id = 0
    return model


def generate(model, ids, mask=None, compress=None):
    kwargs = dict(max_new_tokens=NEW, do_sample=False, output_logits=True, return_dict_in_generate=True)
    if compress is None:
        return model.generate(ids, attention_mask=mask, **kwargs)
    return hf.generate_with_compressed_cache(model, ids, mask, compress=compress, **kwargs)


@needs_transformers
@pytest.mark.parametrize("arch", list(ARCHS))
def test_generate_r_covering_prompt_reproduces_full_cache(arch):
    model = tiny_model(arch)
    ids = torch.randint(1, 97, (2, PROMPT))
    full = generate(model, ids)
    ours = generate(model, ids, compress=dict(r=PROMPT, sink=16, window=16, seed=0))
    assert torch.equal(full.sequences, ours.sequences)
    for a, b in zip(full.logits, ours.logits):
        torch.testing.assert_close(b, a, atol=2e-5, rtol=1e-4)


@needs_transformers
def test_generate_compressed_runs_and_memory_falls(device):
    model = tiny_model("llama", device)
    ids = torch.randint(1, 97, (2, PROMPT), device=device)
    cache = transformers.DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids[:, :-1], past_key_values=cache)
    compressed = hf.compress_cache(cache, r=8, sink=4, window=4, seed=0)
    assert isinstance(compressed, transformers.Cache)
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    per_entry = 2 * 2 * (head_dim * 4 + head_dim * 4 + 4)  # batch 2, 2 kv heads, float32 model
    bounds = 2 * 2 * 2 * head_dim * 4
    assert compressed.nbytes() == model.config.num_hidden_layers * ((4 + 8 + 4) * per_entry + bounds)
    assert hf.cache_nbytes(cache) / compressed.nbytes() > 5
    out = model.generate(ids, past_key_values=compressed, max_new_tokens=NEW, do_sample=False,
                         output_logits=True, return_dict_in_generate=True)
    assert out.sequences.shape == (2, PROMPT + NEW)
    assert all(bool(torch.isfinite(x).all()) for x in out.logits)
    assert compressed.get_seq_length() == PROMPT + NEW - 1
    assert compressed.layers[0].weighted.length == 16 + NEW


@needs_transformers
def test_multi_token_step_after_compression_is_exact():
    # A continuation of several tokens in one forward needs causal masking among them.
    model = tiny_model("qwen2")
    ids = torch.randint(1, 97, (1, PROMPT + 5))
    full_cache, cache = transformers.DynamicCache(config=model.config), transformers.DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids[:, :PROMPT], past_key_values=full_cache)
        model(ids[:, :PROMPT], past_key_values=cache)
        compressed = hf.compress_cache(cache, r=PROMPT, sink=8, window=8, seed=0)
        want = model(ids[:, PROMPT:PROMPT + 3], past_key_values=full_cache).logits
        got = model(ids[:, PROMPT:PROMPT + 3], past_key_values=compressed).logits
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
        want = model(ids[:, PROMPT + 3:], past_key_values=full_cache).logits
        got = model(ids[:, PROMPT + 3:], past_key_values=compressed).logits
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


@needs_transformers
def test_generate_left_padded_batch():
    model = tiny_model("llama")
    ids = torch.randint(1, 97, (2, PROMPT))
    mask = torch.ones(2, PROMPT, dtype=torch.long)
    mask[1, :40] = 0
    ids[1, :40] = 0
    full = generate(model, ids, mask)
    ours = generate(model, ids, mask, compress=dict(r=PROMPT, sink=16, window=16, seed=0))
    assert torch.equal(full.sequences, ours.sequences)
    for a, b in zip(full.logits, ours.logits):
        torch.testing.assert_close(b, a, atol=2e-5, rtol=1e-4)
