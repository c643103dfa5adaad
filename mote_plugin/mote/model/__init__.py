"""The steps that run or hook the model: requests, lookup token, MoE blocks, activation hooks, key capture,
preservation statistics, v* targets, accelerate offload, and the fingerprints and atomic writes of their caches.
They use `mote.algebra` and the family adapters, nothing above."""
