"""One adapter per MoE family of transformers 5.x models; `get_adapter(model)` picks the right one."""

from torch import nn

from .base import MoEAdapter
from .deepseek_v3 import DeepseekV3Adapter
from .gpt_oss import GptOssAdapter
from .mixtral import MixtralAdapter
from .olmoe import OlmoeAdapter
from .qwen2_moe import Qwen2MoeAdapter
from .qwen3_5_moe import Qwen3_5MoeAdapter
from .qwen3_moe import Qwen3MoeAdapter

ADAPTERS: list[type[MoEAdapter]] = [
    Qwen3MoeAdapter,
    Qwen2MoeAdapter,
    Qwen3_5MoeAdapter,
    MixtralAdapter,
    OlmoeAdapter,
    GptOssAdapter,
    DeepseekV3Adapter,
]


def get_adapter(model: nn.Module) -> MoEAdapter:
    """The adapter of the first family in `ADAPTERS` that recognises `model`; ValueError if none does."""
    for adapter_class in ADAPTERS:
        if adapter_class.matches(model):
            return adapter_class()
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    supported = ", ".join(a.family for a in ADAPTERS)
    raise ValueError(
        f"{type(model).__name__} (model_type={model_type!r}) is not a supported MoE model; "
        f"supported families: {supported}"
    )


__all__ = [
    "ADAPTERS",
    "DeepseekV3Adapter",
    "GptOssAdapter",
    "MixtralAdapter",
    "MoEAdapter",
    "OlmoeAdapter",
    "Qwen2MoeAdapter",
    "Qwen3MoeAdapter",
    "Qwen3_5MoeAdapter",
    "get_adapter",
]
