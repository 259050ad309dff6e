"""Compress a decoder's prompt KV cache with WildCat, then generate against it.

A small Llama with random weights (no download) stands in for a real checkpoint: with a trained
model, load it with AutoModelForCausalLM.from_pretrained(...) instead and keep the rest.

    python examples/kv_cache.py [--prompt 4096] [--r 256] [--device cuda]
"""

import argparse

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from wildcat.integrations.transformers import cache_nbytes, compress_cache, register_cache_attention


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--prompt", type=int, default=4096)
    p.add_argument("--r", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=args.prompt + 64)
    model = LlamaForCausalLM(config).to(args.device).eval()
    # One attention function for both phases: exact SDPA on a plain cache, WildCat's weighted
    # attention on a compressed one.
    model.set_attn_implementation(register_cache_attention())
    ids = torch.randint(0, config.vocab_size, (1, args.prompt), device=args.device)

    # 1. Exact prefill of all prompt tokens but the last.
    cache = DynamicCache(config=config)
    with torch.no_grad():
        model(ids[:, :-1], past_key_values=cache)
    # 2. Compress once: first 32 and last 32 tokens exact, the middle r entries per kv head.
    compressed = compress_cache(cache, r=args.r, sink=32, window=32, seed=0)
    print(f"cache: {cache_nbytes(cache) / 2**20:.2f} MiB -> {compressed.nbytes() / 2**20:.3f} MiB")
    # 3. Generate: the last prompt token is the first step over the compressed cache.
    out = model.generate(ids, past_key_values=compressed, max_new_tokens=args.new_tokens, do_sample=False)
    reference = model.generate(ids, max_new_tokens=args.new_tokens, do_sample=False)
    print("compressed cache:", out[0, args.prompt:].tolist())
    print("full cache:      ", reference[0, args.prompt:].tolist())


if __name__ == "__main__":
    main()
