"""Preservation statistics: values against the model's own forward, padding, the corpus helper and the cache."""

import sys
import types

import pytest
import torch
import transformers

from mote_plugin.mote.model import stats as S
from mote_plugin.mote.model.fingerprint import model_fingerprint
from mote_plugin.mote.model.stats import StatsCache, corpus_texts, layer_statistics
from mote_plugin.testbed.tokenizer import train_tokenizer
from tiny import spread_routing

N_TOKENS, MAX_LENGTH, LAYERS = 150, 16, [1, 2]


@pytest.fixture(scope="module")
def texts():
    return [t for _, t in zip(range(60), corpus_texts(None))]


@pytest.fixture(scope="module")
def tok(texts):
    return train_tokenizer(texts, 300)


@pytest.fixture(scope="module")
def qwen3(tok):
    torch.manual_seed(0)
    config = transformers.Qwen3MoeConfig(
        vocab_size=len(tok), hidden_size=32, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
        num_hidden_layers=3, intermediate_size=48, moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2,
        norm_topk_prob=True, mlp_only_layers=[0], pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    return spread_routing(transformers.Qwen3MoeForCausalLM(config))


def run(qwen3, tok, texts, batch_size, layers=LAYERS):
    model, adapter = qwen3
    return layer_statistics(model, tok, adapter, layers, texts, N_TOKENS, batch_size, MAX_LENGTH, progress=False)


@pytest.fixture(scope="module")
def stats4(qwen3, tok, texts):
    return run(qwen3, tok, texts, 4)


def test_shapes_counts_psd(stats4):
    for st in stats4.values():
        E, h = st.moments.shape[:2]
        assert st.moments.shape == (E, h, h) and st.counts.shape == (E,) and st.cov_out.shape == (32, 32)
        assert st.n_tokens == N_TOKENS and int(st.counts.sum()) == N_TOKENS * 2  # top-2
        assert (st.counts > 0).all()
        for M in (*st.moments, st.cov_out, st.cov_in):
            torch.testing.assert_close(M, M.T)
            assert torch.linalg.eigvalsh(M.double()).min() > -1e-6 * M.abs().max()
        pooled = (st.counts[:, None, None] * st.moments.double()).sum(0) / st.counts.sum()
        torch.testing.assert_close(st.cov_in, pooled.float())


def test_padding_excluded_and_values(qwen3, tok, texts, stats4):
    """batch_size 1 (no padding) and 4 (padding) agree, and both match the experts module's own output/routing."""
    masks = [b["attention_mask"] for b in S._batches(tok, texts, N_TOKENS, 4, MAX_LENGTH)]
    assert sum(int(m.sum()) for m in masks) == N_TOKENS and any(not m.all() for m in masks), "padded batches"
    stats1 = run(qwen3, tok, texts, 1)
    for layer in LAYERS:
        assert torch.equal(stats1[layer].counts, stats4[layer].counts)
        torch.testing.assert_close(stats1[layer].moments, stats4[layer].moments, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(stats1[layer].cov_out, stats4[layer].cov_out, atol=1e-5, rtol=1e-4)

    # reference: the windows one by one, E[y y^T] and counts from the experts module's own inputs/outputs
    model, adapter = qwen3
    ref = {l: {"yy": 0, "counts": torch.zeros(4, dtype=torch.long), "n": 0} for l in LAYERS}
    hooks = []
    for layer in LAYERS:

        def hook(module, args, out, r=ref[layer]):
            y = out.reshape(-1, out.shape[-1]).double()
            r["yy"] = r["yy"] + y.T @ y
            r["counts"] += torch.bincount(args[1].reshape(-1), minlength=4)
            r["n"] += y.shape[0]

        hooks.append(adapter.experts(adapter.moe_block(model, layer)).register_forward_hook(hook))
    try:
        with torch.no_grad():
            for batch in S._batches(tok, texts, N_TOKENS, 1, MAX_LENGTH):
                model(**batch)
    finally:
        for h in hooks:
            h.remove()
    for layer in LAYERS:
        r = ref[layer]
        assert r["n"] == N_TOKENS and torch.equal(stats1[layer].counts, r["counts"])
        torch.testing.assert_close(stats1[layer].cov_out, (r["yy"] / r["n"]).float(), atol=1e-5, rtol=1e-4)


def test_cache(qwen3, tok, texts, tmp_path, stats4):
    model, adapter = qwen3
    calls = []

    def compute(layers):
        calls.append(list(layers))
        return {l: stats4[l] for l in layers}  # stand-in for layer_statistics (same model, same texts)

    cache = StatsCache(tmp_path)
    key = S.stats_key(model, LAYERS, None, N_TOKENS, MAX_LENGTH)
    first = cache.get_or_compute(key, compute)
    assert calls == [LAYERS]
    again = cache.get_or_compute(key, compute)
    assert calls == [LAYERS], "cache hit: no recompute"
    for layer in LAYERS:
        for name in ("moments", "counts", "cov_out"):
            assert torch.equal(getattr(again[layer], name), getattr(first[layer], name))
        assert again[layer].n_tokens == N_TOKENS
    assert list(cache.get_or_compute({**key, "layers": [2]}, compute)) == [2] and len(calls) == 1

    # a different n_tokens is a different key
    cache.get_or_compute({**key, "n_tokens": N_TOKENS + 1}, compute)
    assert calls[-1] == LAYERS and len(calls) == 2

    # a truncated file (in its header or in its data) is recomputed and rewritten, the intact one reused
    path = cache.path(key, 2)
    for cut in (100, path.stat().st_size - 10):
        path.write_bytes(path.read_bytes()[:cut])
        n = len(calls)
        cache.get_or_compute(key, compute)
        assert calls[-1] == [2] and len(calls) == n + 1
    cache.get_or_compute(key, compute)
    assert len(calls) == n + 1

    # a file whose stored key differs (e.g. a hash collision or a hand-copied file) is not reused
    cache.path(key, 1).write_bytes(cache.path({**key, "n_tokens": N_TOKENS + 1}, 1).read_bytes())
    cache.get_or_compute(key, compute)
    assert calls[-1] == [1]
    assert not list(tmp_path.glob("*.tmp")), "no temp files left behind"

    # editing one weight in place changes the model fingerprint, hence the key
    before, before4 = model_fingerprint(model), model_fingerprint(model, sample=4)
    assert model_fingerprint(model) == before
    down = adapter.down_param(adapter.moe_block(model, 1))
    with torch.no_grad():
        down[2, 5, 7] += 0.01
        try:
            assert model_fingerprint(model) != before
            # far from the sampled ends, the edit is still seen through the tensor's sum
            assert model_fingerprint(model, sample=4) != before4
            new_key = S.stats_key(model, LAYERS, None, N_TOKENS, MAX_LENGTH)
            cache.get_or_compute(new_key, compute)
            assert calls[-1] == LAYERS
        finally:
            down[2, 5, 7] -= 0.01


def test_preservation_stats_end_to_end(qwen3, tok, tmp_path):
    model, adapter = qwen3
    kw = dict(corpus=None, n_tokens=40, max_length=MAX_LENGTH, stats_dir=tmp_path, progress=False)
    first = S.preservation_stats(model, tok, adapter, [2], **kw)
    assert len(list(tmp_path.glob("*.safetensors"))) == 1
    second = S.preservation_stats(model, tok, adapter, [2], **kw)
    assert torch.equal(first[2].moments, second[2].moments) and first[2].n_tokens == 40


def test_corpus_texts(tmp_path, monkeypatch):
    shipped = [t for _, t in zip(range(50), corpus_texts(None))]
    assert len(shipped) == 50 and all(t and not t.startswith("=") for t in shipped)
    path = tmp_path / "c.txt"
    path.write_text("first line\n\n = heading = \nlast\n")
    assert list(corpus_texts(str(path))) == ["first line", "= heading =", "last"]
    assert S.corpus_fingerprint(str(path)) != S.corpus_fingerprint(None)

    class Dataset:
        column_names = ["text"]

        def __getitem__(self, column):
            return ["a", "", " ", "b"]

    def load_dataset(name, config=None, split=None):
        if name != "local/wiki":
            raise ConnectionError(f"Couldn't reach {name!r} on the Hub")
        assert config == "raw" and split == "train"
        return Dataset()

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    assert list(corpus_texts("local/wiki:raw")) == ["a", "b"]
    with pytest.raises(RuntimeError, match="Offline, set preservation_corpus"):
        corpus_texts("nosuch/dataset")
    monkeypatch.setitem(sys.modules, "datasets", None)  # not installed: files and the shipped text still work
    with pytest.raises(RuntimeError, match=r"pip install 'mote-plugin\[corpora\]'"):
        corpus_texts("local/wiki:raw")
    assert list(corpus_texts(str(path))) == ["first line", "= heading =", "last"]


def test_layer_stats_dense_layer(qwen3, tok, texts):
    with pytest.raises(ValueError, match="layer 0 has no MoE block"):
        run(qwen3, tok, texts, 4, layers=[0])
