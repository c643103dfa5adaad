"""The fact model's architectures: small configs of transformers' own MoE classes.

Each variant keeps what makes its family different for an editor: Qwen3-MoE (softmax, top-k,
renormalised: norm_topk_prob), GPT-OSS (router bias, top-k-then-softmax, interleaved clamped SwiGLU,
[E, h, d] down_proj with biases) and Qwen3.5-MoE (a shared expert beside the routed ones, 3:1 linear/full
attention in the real checkpoints; here every layer uses full attention, because the linear-attention layers have no
CPU kernel and train 2.5x slower, and attention is not what an MoE editor edits).
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import (
    GptOssConfig,
    GptOssForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    Qwen3_5MoeForCausalLM,
    Qwen3_5MoeTextConfig,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

ARCHS = ("qwen3_moe", "gpt_oss", "qwen3_5_moe")


@dataclass
class ModelSize:
    d_model: int = 128
    layers: int = 6
    heads: int = 4
    experts: int = 8
    top_k: int = 2
    expert_hidden: int = 128
    max_positions: int = 256


def make_config(arch: str, vocab_size: int, size: ModelSize, special_ids: dict[str, int]) -> PretrainedConfig:
    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHS)}")
    common = dict(
        vocab_size=vocab_size,
        hidden_size=size.d_model,
        num_hidden_layers=size.layers,
        num_attention_heads=size.heads,
        num_key_value_heads=size.heads,
        head_dim=size.d_model // size.heads,
        num_experts_per_tok=size.top_k,
        max_position_embeddings=size.max_positions,
        tie_word_embeddings=True,
        **special_ids,
    )
    if arch == "qwen3_moe":
        cfg = Qwen3MoeConfig(
            intermediate_size=4 * size.d_model, moe_intermediate_size=size.expert_hidden,
            num_experts=size.experts, norm_topk_prob=True, **common,
        )
    elif arch == "gpt_oss":
        cfg = GptOssConfig(
            intermediate_size=size.expert_hidden, num_local_experts=size.experts,
            sliding_window=size.max_positions, rope_parameters={"rope_type": "default", "rope_theta": 150000.0},
            **common,
        )
    else:
        cfg = Qwen3_5MoeTextConfig(
            moe_intermediate_size=size.expert_hidden, shared_expert_intermediate_size=size.expert_hidden,
            num_experts=size.experts, linear_num_key_heads=size.heads, linear_num_value_heads=size.heads,
            linear_key_head_dim=size.d_model // size.heads, linear_value_head_dim=size.d_model // size.heads,
            layer_types=["full_attention"] * size.layers,
            **common,
        )
    cfg._experts_implementation = "grouped_mm"
    return cfg


def make_model(config: PretrainedConfig) -> PreTrainedModel:
    cls = {
        "qwen3_moe": Qwen3MoeForCausalLM,
        "gpt_oss": GptOssForCausalLM,
        "qwen3_5_moe_text": Qwen3_5MoeForCausalLM,
    }[config.model_type]
    return cls(config)
