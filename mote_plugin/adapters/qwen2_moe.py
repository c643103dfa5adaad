"""Qwen2-MoE: Qwen3-MoE layout and routing, plus a gated shared expert.

Block output = routed experts + sigmoid(shared_expert_gate(x)) * shared_expert(x). The shared expert is a dense MLP
the editor leaves alone; `shared_output` reproduces its gated contribution.
"""

from torch import nn

from .base import MoEAdapter


class Qwen2MoeAdapter(MoEAdapter):
    family = "Qwen2-MoE"
    model_types = ("qwen2_moe",)
    shared_expert_attr = "shared_expert"
    shared_expert_gate_attr = "shared_expert_gate"

    @classmethod
    def block_class(cls) -> type[nn.Module]:
        from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

        return Qwen2MoeSparseMoeBlock
