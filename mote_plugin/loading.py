"""Loading a model and its tokenizer from a folder or a hub name: the one loader behind BaseEditor for MoTE
(`easyedit.load_model`), `mote edit`, the comparison and the fact-model builds."""

from __future__ import annotations

import torch

from ._hooks import LOADED_WITH


def load_model(source, dtype: torch.dtype | str | None = None, device_map=None, offload_folder: str | None = None,
               local_files_only: bool = False, dequantize: bool = False):
    """AutoModelForCausalLM of `source` in eval mode, in `dtype` (None: the dtype it was saved in); dispatched by
    accelerate over `device_map` when given (a strategy name or {module: device}), offloading to `offload_folder`;
    with `dequantize`, a quantized checkpoint (its config's `quantization_config`, e.g. GPT-OSS's MXFP4 experts) is
    de-quantized on load (transformers keeps MXFP4 experts quantized where its kernels run, e.g. on a GPU with triton
    and `kernels`)."""
    from transformers import AutoModelForCausalLM

    kwargs = {} if device_map is None else {"device_map": device_map, "offload_folder": offload_folder}
    if dequantize and (quantization := dequantized_config(source, local_files_only)) is not None:
        kwargs["quantization_config"] = quantization
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype or "auto", local_files_only=local_files_only,
                                                 **kwargs).eval()
    setattr(model, LOADED_WITH, {"dtype": dtype, "device_map": device_map})
    return model


def dequantized_config(source, local_files_only: bool = False):
    """The quantization config of `source`'s checkpoint set to de-quantize on load (None: not quantized); ValueError
    for a quantization method transformers cannot de-quantize on load."""
    from transformers import AutoConfig
    from transformers.quantizers.auto import AutoQuantizationConfig

    stored = getattr(AutoConfig.from_pretrained(source, local_files_only=local_files_only), "quantization_config", None)
    if stored is None:
        return None
    config = AutoQuantizationConfig.from_dict(stored if isinstance(stored, dict) else stored.to_dict())
    if not hasattr(config, "dequantize"):
        method = getattr(config, "quant_method", "?")
        raise ValueError(f"{source}: its {method} quantization cannot be de-quantized on load; MoTE edits "
                         "de-quantized experts: load the model de-quantized yourself and pass (model, tok)")
    config.dequantize = True
    return config


def load_tokenizer(source, local_files_only: bool = False, **kwargs):
    """AutoTokenizer of `source` (`kwargs`: passed on, e.g. extra special tokens)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(source, local_files_only=local_files_only, **kwargs)
