"""GPT-OSS: transposed, interleaved, biased experts and a biased top-k-then-softmax router.

Experts (`is_transposed=True`, `is_concatenated=False`, `has_bias=True` in transformers):
    gate_up_proj       [E, d_model, 2 * d_hidden]   columns interleaved: gate = [..., ::2], up = [..., 1::2]
    gate_up_proj_bias  [E, 2 * d_hidden]
    down_proj          [E, d_hidden, d_model]       (canonical [E, d_model, d_hidden] is its transpose)
    down_proj_bias     [E, d_model]
    k = (clamp(up, -limit, limit) + 1) * g * sigmoid(alpha * g),  g = clamp(gate, max=limit)   (gate has no lower clamp)
Router: logits = x W^T + b; top-k on the raw logits; softmax over the k selected logits, in the logits' dtype.
The MoE block (`GptOssMLP`, at `layer.mlp`) returns a tuple (hidden_states, router_scores).

An MXFP4 checkpoint loaded where transformers' MXFP4 kernels run keeps its experts quantized: the block is then
`Mxfp4GptOssMLP` with `Mxfp4GptOssExperts` (packed FP4 bytes, swizzled for triton), which MoTE refuses, naming the
flags that load the experts de-quantized.
"""

import torch
import torch.nn.functional as F
from torch import nn

from .base import MoEAdapter


class GptOssAdapter(MoEAdapter):
    family = "GPT-OSS"
    model_types = ("gpt_oss",)
    router_attr = "router"
    is_transposed = True

    @classmethod
    def block_class(cls) -> type[nn.Module]:
        from transformers.models.gpt_oss.modeling_gpt_oss import GptOssMLP

        return GptOssMLP

    def unsupported(self, mlp: nn.Module) -> str | None:
        from transformers.integrations.mxfp4 import Mxfp4GptOssExperts, Mxfp4GptOssMLP

        if not isinstance(mlp, Mxfp4GptOssMLP) and not isinstance(getattr(mlp, "experts", None), Mxfp4GptOssExperts):
            return None
        return (f"its experts are MXFP4-quantized ({type(mlp).__name__} with "
                f"{type(getattr(mlp, 'experts', None)).__name__}: transformers keeps them quantized where its MXFP4 "
                "kernels run), and MoTE edits de-quantized experts only: load the model de-quantized, with "
                "`dequantize: true` in the YAML (EasyEdit's BaseEditor), `mote edit|apply|revert --dequantize`, or "
                "from_pretrained(..., quantization_config=Mxfp4Config(dequantize=True)) and pass (model, tok)")

    def route(self, block: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        router = self.router(block)
        x = x.reshape(-1, x.shape[-1])
        router_logits = F.linear(x.to(router.weight.dtype), router.weight, router.bias)  # [N, E]
        top_k_logits, top_k_index = torch.topk(router_logits, router.top_k, dim=-1)  # [N, K]
        top_k_weights = F.softmax(top_k_logits, dim=1, dtype=top_k_logits.dtype)  # [N, K]
        return top_k_index, top_k_weights.float()

    def expert_keys(self, block: nn.Module, x: torch.Tensor, expert: int) -> torch.Tensor:
        experts = self.experts(block)
        # [M, 2*d_hidden]
        gate_up = x @ experts.gate_up_proj[expert].float() + experts.gate_up_proj_bias[expert].float()
        gate, up = gate_up[..., ::2], gate_up[..., 1::2]  # [M, d_hidden] each
        gate = gate.clamp(min=None, max=experts.limit)
        up = up.clamp(min=-experts.limit, max=experts.limit)
        return (up + 1) * gate * torch.sigmoid(gate * experts.alpha)

    def down_bias(self, block: nn.Module) -> torch.Tensor:
        return self.experts(block).down_proj_bias.detach().float()  # [E, d_model]
