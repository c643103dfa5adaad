"""The fact model: a small MoE language model, trained on CPU, that knows real CounterFact (and zsRE) facts."""

from .build import BuildOptions, build, load, load_zsre
from .model import ARCHS, ModelSize
from .train import TrainConfig

__all__ = ["ARCHS", "BuildOptions", "ModelSize", "TrainConfig", "build", "load", "load_zsre"]
