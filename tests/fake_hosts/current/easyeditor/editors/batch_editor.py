"""FAKE: the shape of EasyEdit's batch allow-list (an Enum with a static check)."""

from enum import Enum


class BatchEditor(Enum):
    MEMIT = "MEMIT"
    ALPHAEDIT = "AlphaEdit"

    @staticmethod
    def is_batchable_method(alg_name: str):
        return alg_name in ("MEMIT", "AlphaEdit")
