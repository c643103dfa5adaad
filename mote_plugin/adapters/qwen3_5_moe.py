"""Qwen3.5-MoE (the text model, or the language model inside the vision-language model).

Qwen3-MoE layout; the router always renormalises the top-k probabilities (there is no `norm_topk_prob` switch).
Like Qwen2-MoE, each block has a shared expert scaled by sigmoid(shared_expert_gate(x)), left alone by the editor.
Every decoder layer is sparse (linear-attention and full-attention layers alike).
"""

from torch import nn

from .base import MoEAdapter


class Qwen3_5MoeAdapter(MoEAdapter):
    family = "Qwen3.5-MoE"
    model_types = ("qwen3_5_moe", "qwen3_5_moe_text")
    shared_expert_attr = "shared_expert"
    shared_expert_gate_attr = "shared_expert_gate"

    @classmethod
    def block_class(cls) -> type[nn.Module]:
        from transformers.models.qwen3_5_moe.modeling_qwen3_5_moe import Qwen3_5MoeSparseMoeBlock

        return Qwen3_5MoeSparseMoeBlock

    def renormalize(self, router: nn.Module) -> bool:
        return True
