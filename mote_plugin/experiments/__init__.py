"""Experiment harnesses on top of the library: the editor comparison (`compare`) and the results writer shared with the
benchmarks (`results`). Nothing in `mote_plugin.mote` imports them."""
