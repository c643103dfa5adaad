"""FAKE: the shape of the current EasyEdit registry (a module-level dict), with placeholder entries."""

ALG_DICT = {"ROME": object(), "MEMIT": object(), "AlphaEdit": object()}
