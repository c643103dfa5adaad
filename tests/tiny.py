"""Helpers for tests on tiny random MoE models."""

import torch

from mote_plugin.adapters import get_adapter


def spread_routing(model):
    """Eval-mode float model with larger expert and router weights (default init routes near-uniformly),
    and its adapter."""
    model = model.float().eval()
    adapter = get_adapter(model)
    with torch.no_grad():
        for layer in adapter.moe_layers(model):
            block = adapter.moe_block(model, layer)
            for p in adapter.experts(block).parameters():
                p.normal_(0.0, 0.5)
            adapter.router(block).weight.normal_(0.0, 1.0)
    return model, adapter
