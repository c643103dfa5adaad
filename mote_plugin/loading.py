"""Loading a model and its tokenizer from a folder or a hub name: the one loader behind BaseEditor for MoTE
(`easyedit.load_model`), `mote edit`, the comparison and the fact-model builds."""

from __future__ import annotations

import torch


def load_model(source, dtype: torch.dtype | str | None = None, device_map=None, offload_folder: str | None = None,
               local_files_only: bool = False):
    """AutoModelForCausalLM of `source` in eval mode, in `dtype` (None: the dtype it was saved in); dispatched by
    accelerate over `device_map` when given (a strategy name or {module: device}), offloading to `offload_folder`."""
    from transformers import AutoModelForCausalLM

    kwargs = {} if device_map is None else {"device_map": device_map, "offload_folder": offload_folder}
    return AutoModelForCausalLM.from_pretrained(source, dtype=dtype or "auto", local_files_only=local_files_only,
                                                **kwargs).eval()


def load_tokenizer(source, local_files_only: bool = False, **kwargs):
    """AutoTokenizer of `source` (`kwargs`: passed on, e.g. extra special tokens)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(source, local_files_only=local_files_only, **kwargs)
