"""OLMoE: Qwen3-MoE layout and routing.

Router: softmax (float32) -> top-k -> renormalise only if `config.norm_topk_prob` (False by default, and False in the
released OLMoE checkpoints) -> cast to the logits' dtype. Every decoder layer is sparse.
"""

from torch import nn

from .base import MoEAdapter


class OlmoeAdapter(MoEAdapter):
    family = "OLMoE"
    model_types = ("olmoe",)

    @classmethod
    def block_class(cls) -> type[nn.Module]:
        from transformers.models.olmoe.modeling_olmoe import OlmoeSparseMoeBlock

        return OlmoeSparseMoeBlock
