"""Key capture at the lookup token against the model's own forward pass (tiny random MoE models)."""

import pytest
import torch
import transformers

from mote_plugin.mote.model.capture import capture
from mote_plugin.mote.model.lookup import encode_with_lookup
from mote_plugin.testbed.tokenizer import train_tokenizer
from tiny import spread_routing

REQUESTS = [
    {"prompt": "The mother tongue of Danielle Darrieux is", "subject": "Danielle Darrieux", "target_new": " English"},
    {"prompt": "Paris is the capital of", "subject": "Paris", "target_new": " Italy"},
    {"prompt": "{} plays the guitar in", "subject": "Jimi Hendrix", "target_new": " Rome", "case_id": 7},
    {"prompt": "In 1990 the Eiffel Tower was painted", "subject": "Eiffel Tower", "target_new": " red"},
    {"prompt": "Rome", "subject": "Rome", "target_new": " city"},
]


@pytest.fixture(scope="module")
def tok():
    texts = [r["prompt"].replace("{}", r["subject"]) + r["target_new"] for r in REQUESTS]
    return train_tokenizer(texts * 5, 300)


def common(tok):
    return dict(
        vocab_size=len(tok), hidden_size=32, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
        num_hidden_layers=3, num_experts_per_tok=2, pad_token_id=tok.pad_token_id,
    )  # fmt: skip


def build(model):
    torch.manual_seed(0)
    return spread_routing(model)


@pytest.fixture(scope="module")
def qwen3(tok):
    torch.manual_seed(0)
    config = transformers.Qwen3MoeConfig(
        **common(tok), intermediate_size=48, moe_intermediate_size=16, num_experts=4, norm_topk_prob=True,
        mlp_only_layers=[0],
    )  # fmt: skip
    return build(transformers.Qwen3MoeForCausalLM(config))


@pytest.fixture(scope="module")
def gpt_oss(tok):
    torch.manual_seed(0)
    config = transformers.GptOssConfig(**common(tok), intermediate_size=16, num_local_experts=4, sliding_window=4)
    return build(transformers.GptOssForCausalLM(config))


@torch.no_grad()
def reference(model, adapter, tok, request, layer, fact_token):
    """Run one prompt alone (no padding); the block input and the experts' output at its lookup token."""
    prompt = request["prompt"].replace("{}", request["subject"])
    batch, lookup, _ = encode_with_lookup(tok, [prompt], [request["subject"]], fact_token)
    block = adapter.moe_block(model, layer)
    rec = {}
    h1 = block.register_forward_pre_hook(lambda m, a: rec.update(x=a[0].reshape(-1, a[0].shape[-1])))
    h2 = adapter.experts(block).register_forward_hook(
        lambda m, a, out: rec.update(out=out.reshape(-1, out.shape[-1]), index=a[1], weights=a[2])
    )
    try:
        model(**batch)
    finally:
        h1.remove(), h2.remove()
    pos = int(lookup[0])
    return rec["x"][pos], rec["out"][pos], rec["index"][pos], rec["weights"][pos]


@pytest.mark.parametrize("fact_token", ["subject_last", "last"])
@pytest.mark.parametrize("family", ["qwen3", "gpt_oss"])
def test_capture_matches_model(request, tok, family, fact_token):
    model, adapter = request.getfixturevalue(family)
    layers = adapter.moe_layers(model)[-2:]
    caps = capture(model, tok, adapter, REQUESTS, layers, fact_token, batch_size=2)  # 3 chunks
    assert sorted(caps) == sorted(layers)
    for layer, cap in caps.items():
        T, K = len(REQUESTS), 2
        block = adapter.moe_block(model, layer)
        E, h = adapter.num_experts(block), cap.keys.shape[-1]
        routed_out = adapter.experts_output(block, cap)  # [T, d]
        assert cap.keys.shape == (T, K, h) and routed_out.shape == (T, 32) and cap.num_experts == E
        assert cap.expert_idx.dtype == torch.long and cap.gates.dtype == cap.keys.dtype == torch.float32
        for t, req in enumerate(REQUESTS):
            x, out, index, weights = reference(model, adapter, tok, req, layer, fact_token)
            keys = adapter.keys(block, x[None], cap.expert_idx[t : t + 1])[0]  # [K, h] at the reference's input
            torch.testing.assert_close(cap.keys[t], keys, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(routed_out[t], out, atol=1e-5, rtol=1e-5)
            ours, order = cap.expert_idx[t].sort()
            theirs, order2 = index.sort()
            assert torch.equal(ours, theirs)
            torch.testing.assert_close(cap.gates[t][order], weights.float()[order2], atol=1e-5, rtol=1e-5)
        dense = cap.dense_gates(cap.gates.dtype)  # [T, E]
        assert dense.shape == (T, E) and torch.equal(dense.gather(1, cap.expert_idx), cap.gates)
        assert int((dense != 0).sum()) == T * K


def test_chunking_padding_side_and_mode(qwen3, tok):
    model, adapter = qwen3
    full = capture(model, tok, adapter, REQUESTS, [1, 2], "subject_last", batch_size=16)
    tok.padding_side = "left"
    model.train()
    try:
        chunked = capture(model, tok, adapter, REQUESTS, [1, 2], "subject_last", batch_size=2)
        assert model.training, "the model's mode is restored"
    finally:
        tok.padding_side = "right"
        model.eval()
    for layer in (1, 2):
        for name in ("gates", "keys"):
            torch.testing.assert_close(getattr(chunked[layer], name), getattr(full[layer], name), atol=1e-5, rtol=1e-5)
        assert torch.equal(chunked[layer].expert_idx, full[layer].expert_idx)


def test_errors(qwen3, tok):
    model, adapter = qwen3
    with pytest.raises(ValueError, match="layer 0 has no MoE block"):
        capture(model, tok, adapter, REQUESTS, [0, 2], "last")
    with pytest.raises(ValueError, match="out of range"):
        capture(model, tok, adapter, REQUESTS, [3], "last")
    bad = [REQUESTS[0], {"prompt": "Paris is", "subject": "London", "target_new": " x", "case_id": 3}]
    with pytest.raises(ValueError, match=r"request 1 \(case_id=3\).*London"):
        capture(model, tok, adapter, bad, [1], "last")
    with pytest.raises(ValueError, match="request 0 has no subject"):
        capture(model, tok, adapter, [{"prompt": "Paris is", "target_new": " x"}], [1], "last")
