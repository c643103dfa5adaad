"""The fact model: a small MoE language model, trained on CPU, that knows real CounterFact facts."""

from .build import BuildOptions, build, load
from .model import ARCHS, ModelSize
from .train import TrainConfig

__all__ = ["ARCHS", "BuildOptions", "ModelSize", "TrainConfig", "build", "load"]
