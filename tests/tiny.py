"""Helpers for tests on tiny random MoE models."""

import torch

from mote_plugin.adapters import get_adapter


def spread_routing(model, router_biases: bool = False):
    """Eval-mode float model with larger expert and router weights (default init, std 0.02, routes near-uniformly
    and never reaches GPT-OSS's clamp), and its adapter; `router_biases` also spreads the routers' biases."""
    model = model.float().eval()
    adapter = get_adapter(model)
    with torch.no_grad():
        for layer in adapter.moe_layers(model):
            block = adapter.moe_block(model, layer)
            for p in adapter.experts(block).parameters():
                p.normal_(0.0, 0.5)
            router = adapter.router(block)
            router.weight.normal_(0.0, 1.0)
            if router_biases and getattr(router, "bias", None) is not None:  # GPT-OSS
                router.bias.normal_(0.0, 1.0)
            if router_biases and hasattr(router, "e_score_correction_bias"):  # DeepSeek-V3
                router.e_score_correction_bias.normal_(0.0, 0.5)
    return model, adapter
