"""Mixtral: Qwen3-MoE expert layout, slightly different router.

Router: softmax over `router_logits.float()` -> top-k -> always renormalised, and the weights are NOT cast back to
the logits' dtype (they stay float32 in a bf16 model). `router_jitter_noise` only acts in training mode.
"""

import torch
import torch.nn.functional as F
from torch import nn

from .base import MoEAdapter


class MixtralAdapter(MoEAdapter):
    family = "Mixtral"
    model_types = ("mixtral",)

    @classmethod
    def block_class(cls) -> type[nn.Module]:
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

        return MixtralSparseMoeBlock

    def route(self, block: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        router = self.router(block)
        x = x.reshape(-1, x.shape[-1])
        router_logits = F.linear(x.to(router.weight.dtype), router.weight)  # [N, E]
        router_probs = F.softmax(router_logits.float(), dim=-1)  # [N, E]
        top_k_weights, top_k_index = torch.topk(router_probs, router.top_k, dim=-1)  # [N, K]
        top_k_weights = top_k_weights / top_k_weights.sum(dim=-1, keepdim=True)
        return top_k_index, top_k_weights
