"""Adapters against tiny random transformers MoE models: routing, expert math and in-place edits must match the
model's own forward pass (eager and grouped_mm experts), in float32 and bfloat16."""

import copy

import pytest
import torch
import transformers
from torch import nn

from mote_plugin.adapters import ADAPTERS, MoEAdapter, get_adapter
from mote_plugin.mote.algebra.routed_keys import RoutedKeys
from tiny import spread_routing

torch.set_num_threads(1)

VOCAB = 64
COMMON = dict(
    vocab_size=VOCAB, hidden_size=32, num_attention_heads=2, num_key_value_heads=1, pad_token_id=0, eos_token_id=1
)


def qwen3_moe():
    config = transformers.Qwen3MoeConfig(
        **COMMON, head_dim=16, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3,
        num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, mlp_only_layers=[0],
    )  # fmt: skip
    return transformers.Qwen3MoeForCausalLM(config)


def qwen2_moe():
    config = transformers.Qwen2MoeConfig(
        **COMMON, intermediate_size=48, moe_intermediate_size=16, shared_expert_intermediate_size=24,
        num_hidden_layers=2, num_experts=8, num_experts_per_tok=2, norm_topk_prob=False,
    )  # fmt: skip
    return transformers.Qwen2MoeForCausalLM(config)


QWEN3_5_TEXT = dict(
    **COMMON, head_dim=16, num_hidden_layers=2, layer_types=["linear_attention", "full_attention"],
    linear_key_head_dim=8, linear_value_head_dim=8, linear_num_key_heads=2, linear_num_value_heads=2,
    moe_intermediate_size=16, shared_expert_intermediate_size=24, num_experts=8, num_experts_per_tok=2,
)  # fmt: skip


def qwen3_5_moe():
    return transformers.Qwen3_5MoeForCausalLM(transformers.Qwen3_5MoeTextConfig(**QWEN3_5_TEXT))


def mixtral():
    config = transformers.MixtralConfig(
        **COMMON, head_dim=16, intermediate_size=16, num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2
    )
    return transformers.MixtralForCausalLM(config)


def olmoe():
    config = transformers.OlmoeConfig(
        **COMMON, intermediate_size=16, num_hidden_layers=2, num_experts=8, num_experts_per_tok=2
    )
    return transformers.OlmoeForCausalLM(config)


def gpt_oss():
    config = transformers.GptOssConfig(
        **COMMON, head_dim=16, intermediate_size=16, num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2,
        sliding_window=4,
    )  # fmt: skip
    return transformers.GptOssForCausalLM(config)


def deepseek_v3():
    config = transformers.DeepseekV3Config(
        **{**COMMON, "num_key_value_heads": 2}, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3,
        n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2, first_k_dense_replace=1,
        n_shared_experts=1, q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
        v_head_dim=16, routed_scaling_factor=2.5, norm_topk_prob=True,
    )  # fmt: skip
    return transformers.DeepseekV3ForCausalLM(config)


FAMILIES = {f.__name__: f for f in [qwen3_moe, qwen2_moe, qwen3_5_moe, mixtral, olmoe, gpt_oss, deepseek_v3]}
IMPLEMENTATIONS = ["eager", "grouped_mm"]


def _build(name):
    torch.manual_seed(0)
    return spread_routing(FAMILIES[name](), router_biases=True)


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    return _build(request.param)


@pytest.fixture(scope="module")
def input_ids():
    return torch.randint(1, VOCAB, (2, 5), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def capture(model, adapter, input_ids):
    """Run the model and record, for every MoE layer: the block input/output and the experts' inputs/output."""
    records, handles = {}, []
    for layer in adapter.moe_layers(model):
        block = adapter.moe_block(model, layer)
        rec = records[layer] = {}

        # The blocks are called as block(hidden_states) and the experts as experts(hidden_states, top_k_index,
        # top_k_weights), positionally in every family; `(*args, *kwargs.values())` also covers keyword calls.
        def block_hook(module, args, kwargs, output, rec=rec):
            (x,) = (*args, *kwargs.values())
            rec["x"] = x.reshape(-1, x.shape[-1])
            output = output[0] if isinstance(output, tuple) else output  # GPT-OSS returns (hidden, router_scores)
            rec["block_out"] = output.reshape(-1, output.shape[-1])

        def experts_hook(module, args, kwargs, output, rec=rec):
            rec["hidden"], rec["index"], rec["weights"] = (*args, *kwargs.values())
            rec["experts_out"] = output

        handles.append(block.register_forward_hook(block_hook, with_kwargs=True))
        handles.append(adapter.experts(block).register_forward_hook(experts_hook, with_kwargs=True))
    try:
        model(input_ids)
    finally:
        for handle in handles:
            handle.remove()
    return records


def sort_by_expert(index, weights):
    index, order = index.sort(dim=-1)
    return index, weights.float().gather(1, order)


def assert_close(actual, expected, tol):
    torch.testing.assert_close(actual.float(), expected.float(), atol=tol, rtol=tol)


def expected_change(adapter, block, rec, delta):
    """sum_j g_j delta[e_j] k_j for the recorded tokens: the change of the experts' output under W += delta."""
    keys = adapter.keys(block, rec["hidden"], rec["index"])  # [N, K, d_hidden]
    delta_k = torch.einsum("nkdh,nkh->nkd", delta[rec["index"]], keys)  # [N, K, d_model]
    return (rec["weights"].float()[..., None] * delta_k).sum(dim=1)  # [N, d_model]


# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_route_and_experts_output_match_model(family, input_ids, implementation):
    model, adapter = family
    model.set_experts_implementation(implementation)
    records = capture(model, adapter, input_ids)
    assert records, "no MoE layer found"
    for layer, rec in records.items():
        block = adapter.moe_block(model, layer)
        # 1. routing: same experts (as sets) and weights as the model used
        index, weights = adapter.route(block, rec["x"])
        assert index.dtype == torch.long and weights.dtype == torch.float32
        assert index.shape == rec["index"].shape == (input_ids.numel(), adapter.router(block).top_k)
        ours, theirs = sort_by_expert(index, weights), sort_by_expert(rec["index"], rec["weights"])
        assert torch.equal(ours[0], theirs[0]), f"layer {layer}: different experts selected"
        assert_close(ours[1], theirs[1], 1e-5)
        # 2. expert math: sum_j g_j (W_j k_j + b_j) equals the experts module's output
        keys = adapter.keys(block, rec["hidden"], rec["index"])  # [N, K, d_hidden]
        out = adapter.experts_output(block, RoutedKeys(rec["index"], rec["weights"], keys, adapter.num_experts(block)))
        assert_close(out, rec["experts_out"], 1e-5)
        # ... and with the shared expert (if any) it is the whole block output
        shared = adapter.shared_output(block, rec["x"])
        assert (shared is not None) == (adapter.shared_expert(block) is not None)
        assert_close(out + (0 if shared is None else shared), rec["block_out"], 1e-5)


def test_structure(family):
    model, adapter = family
    layers = adapter.decoder_layers(model)
    assert isinstance(layers, nn.ModuleList) and adapter.num_layers(model) == len(layers)
    block = adapter.moe_block(model, adapter.moe_layers(model)[0])
    E = adapter.num_experts(block)
    d_model, d_hidden = model.config.hidden_size, adapter.d_hidden(block)
    assert adapter.down_weight(block).shape == (E, d_model, d_hidden)
    assert adapter.down_weight(block).dtype == torch.float32
    bias = adapter.down_bias(block)
    assert bias is None or bias.shape == (E, d_model)
    assert isinstance(adapter.down_param(block), nn.Parameter)
    x = torch.randn(3, d_model)
    assert adapter.keys(block, x, torch.zeros(3, 2, dtype=torch.long)).shape == (3, 2, d_hidden)


def test_dense_layers_have_no_moe_block():
    model, adapter = _build("qwen3_moe")  # mlp_only_layers=[0]
    assert adapter.moe_block(model, 0) is None and adapter.moe_layers(model) == [1, 2]
    model, adapter = _build("deepseek_v3")  # first_k_dense_replace=1
    assert adapter.moe_block(model, 0) is None and adapter.moe_layers(model) == [1, 2]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_full_listed_and_lowrank_writes_change_the_forward_pass(family, input_ids, dtype):
    model, adapter = family
    model = copy.deepcopy(model).to(dtype)
    model.set_experts_implementation("grouped_mm")
    layer = adapter.moe_layers(model)[-1]  # the last MoE layer: its input does not change with the edit
    block = adapter.moe_block(model, layer)
    E, d_model, d_hidden = adapter.num_experts(block), model.config.hidden_size, adapter.d_hidden(block)
    gen = torch.Generator().manual_seed(2)
    before = capture(model, adapter, input_ids)[layer]
    # bf16: every output carries a rounding error of ~2^-8 of its magnitude, so compare on the outputs' scale
    tol = 1e-5 if dtype == torch.float32 else 2e-2 * before["experts_out"].abs().max().item()
    if dtype == torch.bfloat16:  # routing reproduced bit for bit in bf16 too
        index, weights = adapter.route(block, before["x"])
        ours, theirs = sort_by_expert(index, weights), sort_by_expert(before["index"], before["weights"])
        assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[1], theirs[1])

    # full delta on all experts
    delta = torch.randn(E, d_model, d_hidden, generator=gen) * 0.1
    adapter.add_lowrank(block, torch.eye(d_model), delta)  # I @ delta[e]: the full delta
    assert adapter.down_param(block).dtype == dtype
    after = capture(model, adapter, input_ids)[layer]
    assert torch.equal(after["index"], before["index"])
    change = expected_change(adapter, block, before, delta)
    assert_close(after["experts_out"].float() - before["experts_out"].float(), change, tol)

    # delta on a subset of experts: delta[i] goes to experts[i]
    experts = torch.tensor([E - 1, 0])
    sub_delta = torch.randn(2, d_model, d_hidden, generator=gen) * 0.1
    adapter.add_lowrank(block, torch.eye(d_model), sub_delta, experts)
    full = torch.zeros(E, d_model, d_hidden)
    full[experts] = sub_delta
    again = capture(model, adapter, input_ids)[layer]
    change = expected_change(adapter, block, before, full)
    assert_close(again["experts_out"].float() - after["experts_out"].float(), change, tol)

    # low rank: left @ right[e] for every expert
    left, right = torch.randn(d_model, 3, generator=gen) * 0.3, torch.randn(E, 3, d_hidden, generator=gen) * 0.3
    adapter.add_lowrank(block, left, right)
    assert adapter.down_param(block).dtype == dtype
    last = capture(model, adapter, input_ids)[layer]
    change = expected_change(adapter, block, before, torch.einsum("dr,erh->edh", left, right))
    assert_close(last["experts_out"].float() - again["experts_out"].float(), change, tol)


def test_writes_respect_parameter_layout(family):
    model, adapter = family
    block = adapter.moe_block(model, adapter.moe_layers(model)[0])
    param = adapter.down_param(block)
    backup = param.detach().clone()
    try:
        delta = torch.zeros(adapter.num_experts(block), model.config.hidden_size, adapter.d_hidden(block))
        delta[1, 2, 3] = 1.0  # expert 1, output row 2, hidden column 3
        adapter.add_lowrank(block, torch.eye(model.config.hidden_size), delta)
        changed = (param.detach() - backup).nonzero().tolist()
        assert changed == ([[1, 3, 2]] if adapter.is_transposed else [[1, 2, 3]])
        expected = backup[1, 3, 2] if adapter.is_transposed else backup[1, 2, 3]
        assert adapter.down_weight(block)[1, 2, 3].item() == pytest.approx(expected.item() + 1.0)
        # low rank on one listed expert only: right[i] goes to experts[i]
        left, right = torch.randn(model.config.hidden_size, 2), torch.randn(1, 2, adapter.d_hidden(block))
        before = adapter.down_weight(block).clone()
        adapter.add_lowrank(block, left, right, experts=torch.tensor([2]))
        change = adapter.down_weight(block) - before  # [E, d_model, d_hidden]
        assert_close(change[2], left @ right[0], 1e-5)
        assert torch.equal(change[[0, 1, 3]], torch.zeros_like(change[[0, 1, 3]]))
    finally:
        with torch.no_grad():
            param.copy_(backup)


def test_qwen3_5_moe_vision_language_model():
    vision = dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=32, patch_size=2,
                  spatial_merge_size=1, temporal_patch_size=1)  # fmt: skip
    config = transformers.Qwen3_5MoeConfig(text_config=QWEN3_5_TEXT, vision_config=vision)
    model = transformers.Qwen3_5MoeForConditionalGeneration(config)
    adapter = get_adapter(model)
    assert adapter.family == "Qwen3.5-MoE"
    assert adapter.decoder_layers(model) is model.model.language_model.layers
    assert adapter.moe_layers(model) == [0, 1]


def test_get_adapter_rejects_dense_models():
    tiny = dict(COMMON, intermediate_size=16, num_hidden_layers=1)
    for model in [transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**tiny, head_dim=16)),
                  transformers.LlamaForCausalLM(transformers.LlamaConfig(**tiny))]:  # fmt: skip
        with pytest.raises(ValueError, match="not a supported MoE model"):
            get_adapter(model)
    with pytest.raises(ValueError, match="not a supported MoE model"):
        get_adapter(nn.Linear(2, 2))


def test_registry():
    assert all(issubclass(a, MoEAdapter) for a in ADAPTERS)
    assert len({a.family for a in ADAPTERS}) == len(ADAPTERS) == 7
    with pytest.raises(TypeError):
        MoEAdapter()  # abstract


def test_lowrank_writeback_in_chunks_equals_one_pass(family, monkeypatch):
    """add_lowrank bounds its float32 delta by WRITE_CHUNK_BYTES; chunking must not change the result."""
    model, adapter = family
    block = adapter.moe_block(model, adapter.moe_layers(model)[0])
    param = adapter.down_param(block)
    backup = param.detach().clone()
    E, d, h = adapter.num_experts(block), model.config.hidden_size, adapter.d_hidden(block)
    gen = torch.Generator().manual_seed(3)
    try:
        for left, right, experts in [(torch.randn(d, 2, generator=gen), torch.randn(E, 2, h, generator=gen), None),
                                     (torch.randn(2, d, 3, generator=gen), torch.randn(2, 3, h, generator=gen),
                                      torch.tensor([3, 0]))]:
            adapter.add_lowrank(block, left, right, experts)
            whole = param.detach().clone()
            with torch.no_grad():
                param.copy_(backup)
            monkeypatch.setattr(type(adapter), "WRITE_CHUNK_BYTES", 4 * d * h)  # one expert per chunk
            adapter.add_lowrank(block, left, right, experts)
            monkeypatch.undo()
            torch.testing.assert_close(param.detach(), whole, rtol=0, atol=1e-6)
            with torch.no_grad():
                param.copy_(backup)
    finally:
        with torch.no_grad():
            param.copy_(backup)


@pytest.mark.parametrize("adapter_cls", ["Qwen3MoeAdapter", "GptOssAdapter"])
def test_listed_experts_add_like_index_add(adapter_cls):
    """Listed experts are added run by run (slice adds); the result is bitwise `index_add_`'s."""
    from mote_plugin import adapters

    adapter = getattr(adapters, adapter_cls)()
    gen = torch.Generator().manual_seed(0)
    E, d_model, d_hidden = 9, 6, 5
    shape = (E, d_hidden, d_model) if adapter.is_transposed else (E, d_model, d_hidden)
    block = nn.Module()
    block.experts = nn.Module()
    block.experts.down_proj = nn.Parameter(torch.randn(shape, generator=gen).bfloat16(), requires_grad=False)
    for ids in ([0, 1, 2, 5, 6, 8], [7, 3, 4, 5, 0], [8], []):
        experts = torch.tensor(ids, dtype=torch.long)
        delta = torch.randn(len(ids), *shape[1:], generator=gen) * 1e-2  # the parameter's layout, float32
        expected = block.experts.down_proj.detach().clone().index_add_(0, experts, delta.bfloat16())
        adapter._add_to_down_param(block, delta, experts)
        assert torch.equal(block.experts.down_proj, expected), ids
    with pytest.raises(ValueError, match="distinct"):
        adapter._add_to_down_param(block, torch.zeros(2, *shape[1:]), torch.tensor([3, 3]))
