"""DeepSeek-V3: Qwen3-MoE expert layout, sigmoid router with group-limited selection, shared experts.

Router (computed in float32 whatever the model dtype, and the weights stay float32):
    scores  = sigmoid(x W^T)                                           [N, E]
    choice  = scores + e_score_correction_bias                         (used for selection only)
    groups  = sum of the top-2 `choice` values in each of the n_group groups; keep the best topk_group groups
    index   = top-k of `choice` over the experts of the kept groups (unsorted)
    weights = scores[index] (un-biased), / (sum + 1e-20) if norm_topk_prob, * routed_scaling_factor
The first `first_k_dense_replace` layers have a dense MLP. `shared_experts` (a dense MLP) is added unscaled.
"""

import torch
import torch.nn.functional as F
from torch import nn

from .base import MoEAdapter


class DeepseekV3Adapter(MoEAdapter):
    family = "DeepSeek-V3"
    model_types = ("deepseek_v3",)
    shared_expert_attr = "shared_experts"

    @classmethod
    def block_class(cls) -> type[nn.Module]:
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

        return DeepseekV3MoE

    def route(self, block: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        router = self.router(block)
        num_experts, num_group = router.num_experts, router.num_group
        x = x.reshape(-1, x.shape[-1])
        router_logits = F.linear(x.float(), router.weight.float())  # [N, E]
        scores = router_logits.sigmoid()  # [N, E]
        scores_for_choice = scores + router.e_score_correction_bias  # [N, E]
        group_scores = (
            scores_for_choice.view(-1, num_group, num_experts // num_group).topk(2, dim=-1)[0].sum(dim=-1)
        )  # [N, n_group]
        group_idx = torch.topk(group_scores, k=router.topk_group, dim=-1, sorted=False)[1]  # [N, topk_group]
        group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)  # [N, n_group]
        score_mask = group_mask.bool().repeat_interleave(num_experts // num_group, dim=-1)  # [N, E]
        scores_for_choice = scores_for_choice.masked_fill(~score_mask, float("-inf"))
        top_k_index = torch.topk(scores_for_choice, k=router.top_k, dim=-1, sorted=False)[1]  # [N, K]
        top_k_weights = scores.gather(1, top_k_index)  # [N, K]
        if router.norm_topk_prob:
            top_k_weights = top_k_weights / (top_k_weights.sum(dim=-1, keepdim=True) + 1e-20)
        return top_k_index, top_k_weights * router.routed_scaling_factor
