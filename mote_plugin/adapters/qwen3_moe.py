"""Qwen3-MoE: the reference layout, everything comes from `MoEAdapter`.

Router: softmax (float32) over all experts -> top-k -> renormalise if `config.norm_topk_prob` -> cast to the logits'
dtype. Experts: gate_up_proj [E, 2 * d_hidden, d_model] (gate rows first), down_proj [E, d_model, d_hidden].
Layers listed in `config.mlp_only_layers` (or not on the `decoder_sparse_step` grid) have a dense MLP.
"""

from torch import nn

from .base import MoEAdapter


class Qwen3MoeAdapter(MoEAdapter):
    family = "Qwen3-MoE"
    model_types = ("qwen3_moe",)

    @classmethod
    def block_class(cls) -> type[nn.Module]:
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

        return Qwen3MoeSparseMoeBlock
