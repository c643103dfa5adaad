"""FAKE: the host's hyper-parameter base class (a dataclass with from_hparams per method)."""

from dataclasses import dataclass


@dataclass
class HyperParams:
    pass
