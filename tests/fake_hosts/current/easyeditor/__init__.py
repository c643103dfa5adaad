"""A FAKE easyeditor for tests of mote_plugin.register (see tests/test_register.py); not EasyEdit."""

from dataclasses import dataclass

from .editors.editor import BaseEditor  # noqa: F401
from .util.hparams import HyperParams


@dataclass
class MEMITHyperParams(HyperParams):
    layers: list


@dataclass
class R_ROMEHyperParams(HyperParams):
    layers: list


@dataclass
class KETrainingHparams(HyperParams):
    layers: list
