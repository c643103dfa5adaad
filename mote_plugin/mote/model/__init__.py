"""The steps that run or hook the model: requests, lookup token, activation hooks, key capture, preservation
statistics, v* targets, accelerate offload. They use `mote.algebra` and the family adapters, nothing above."""
