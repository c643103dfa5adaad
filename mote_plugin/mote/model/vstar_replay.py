"""The decoder layers above the edited one, replayed on a v* batch's rows from what clean forwards recorded.

v* adds delta at the output of layer `layer`; the layers up to it do not depend on delta. So clean forwards record the
output of `layer` and the other arguments of each layer above it (attention masks, position embeddings, the key/value
cache), and each optimisation step runs only the layers above `layer` on (recorded output + delta).

Only the positions from a row's lookup token on depend on delta. So by default the rows are aligned at their lookup
tokens (prefixes padded on the left, suffixes on the right): one forward computes the prefixes' key/value cache, a
second the suffixes on top of it, and each step replays the layers above `layer` on the suffixes alone, attending to
the cached prefixes. Where that does not apply (layers with recurrent state, such as linear attention, or a model whose
forward returns no cache) the whole rows are replayed, padded on the right. The cache handling follows transformers'
`Cache` objects (their attribute name and the `layers` they hold differ by version).
"""

from __future__ import annotations

import copy
import inspect

import torch

from .hooks import hidden_states, recorded
from .lookup import pad_right


def suffix_replay_applies(model) -> bool:
    """Whether every decoder layer is (full or sliding-window) attention, whose key/value cache the suffix replay
    uses."""
    kinds = getattr(model.config.get_text_config(), "layer_types", None) or []
    return all(k in ("full_attention", "sliding_attention") for k in kinds)


def _find_cache(output):
    """The key/value cache object in a model output (its attribute is `cache` or `past_key_values` by version)."""
    from transformers.cache_utils import Cache

    return next((v for v in output.values() if isinstance(v, Cache)), None)


def _fresh(cache):
    """A copy of `cache` that later updates leave the original unchanged in: its layer objects are copied (updates
    rebind their key/value tensors by concatenation, never write into them)."""
    if not hasattr(cache, "layers"):
        return copy.deepcopy(cache)
    out = copy.copy(cache)
    out.layers = [copy.copy(layer) for layer in cache.layers]
    return out


def _prefix_cache(model, rows: list[list[int]], lookup: list[int], pad: int, device):
    """The key/value cache of the rows' prefixes (the tokens before each lookup token, padded on the left) and their
    attention mask [B, P]; the cache is None where the model's forward returns none."""
    P = max(lookup)
    prefix = torch.tensor([[pad] * (P - l) + r[:l] for r, l in zip(rows, lookup)])  # [B, P]
    mask = torch.tensor([[0] * (P - l) + [1] * l for l in lookup])  # [B, P]
    positions = torch.tensor([[0] * (P - l) + list(range(l)) for l in lookup])  # [B, P]
    with torch.no_grad():
        out = model(input_ids=prefix.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                    use_cache=True)
    return _find_cache(out), mask


class Replay:
    """The decoder layers above `layer` (up to `last`) on the batch's rows.

    `h` [B, S', d]: the output of `layer` at the replayed positions; `shift` [B]: position in a row minus its replayed
    position; `run(hidden, start, stop)` runs layers start..stop on `hidden` (the output of layer start - 1) and returns
    layer stop's output. `suffix=False` replays the whole rows (the same outputs; see the module docstring).
    """

    def __init__(self, model, layer_module_tmp: str, layer: int, last: int, rows: list[list[int]], lookup: list[int],
                 pad_id: int | None, device, suffix: bool = True):
        self.first = layer + 1
        self.layers = [model.get_submodule(layer_module_tmp.format(l)) for l in range(self.first, last + 1)]
        self.inputs: list = [None] * len(self.layers)  # (other positional args, kwargs, hidden passed positionally)
        self.cache, self._step_cache = None, None
        pad = pad_id if pad_id is not None else 0
        if suffix and max(lookup) > 0:
            self.cache, prefix_mask = _prefix_cache(model, rows, lookup, pad, device)
        if self.cache is not None:
            ids, kwargs = self._suffixes(model, rows, lookup, pad, prefix_mask)
            self.shift = torch.tensor(lookup)
        else:
            padded = pad_right(rows, pad_id)
            ids, kwargs = padded["input_ids"], dict(attention_mask=padded["attention_mask"], use_cache=False)
            self.shift = torch.zeros(len(rows), dtype=torch.long)
        self.h = self._record(model, layer_module_tmp.format(layer), ids, kwargs, device)  # [B, S', d]

    def _suffixes(self, model, rows, lookup, pad, prefix_mask):
        """The forward inputs of the suffixes (each row from its lookup token on, padded on the right) on top of the
        prefixes' cache: (ids [B, width], keyword arguments)."""
        width = max(len(r) - l for r, l in zip(rows, lookup))  # the longest suffix
        ids = torch.tensor([r[l:] + [pad] * (width - len(r) + l) for r, l in zip(rows, lookup)])  # [B, width]
        mask = torch.tensor([[1] * (len(r) - l) + [0] * (width - len(r) + l) for r, l in zip(rows, lookup)])
        kwargs = dict(attention_mask=torch.cat([prefix_mask, mask], dim=1), use_cache=True,
                      position_ids=torch.tensor([list(range(l, l + width)) for l in lookup]))
        name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        kwargs[name] = _fresh(self.cache)
        return ids, kwargs

    def _record(self, model, name: str, ids: torch.Tensor, kwargs: dict, device) -> torch.Tensor:
        """One clean forward: the other arguments of each layer above (replayed as they were) and the output of the
        edited layer `name`."""

        def record(i):
            def hook(module, args, kwargs):
                self.inputs[i] = (args[1:], {k: v for k, v in kwargs.items() if k != "hidden_states"}, bool(args))

            return hook

        handles = [m.register_forward_pre_hook(record(i), with_kwargs=True) for i, m in enumerate(self.layers)]
        try:
            with recorded(model.get_submodule(name)) as seen, torch.no_grad():
                model(input_ids=ids.to(device),
                      **{k: v.to(device) if torch.is_tensor(v) else v for k, v in kwargs.items()})
        finally:
            for h in handles:
                h.remove()
        return seen[0]

    def run(self, hidden: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        if self.cache is not None and start == self.first:  # a new step: the suffixes' keys/values of the last one go
            self._step_cache = _fresh(self.cache)
        for i in range(start - self.first, stop - self.first + 1):
            args, kwargs, positional = self.inputs[i]
            if self.cache is not None:
                kwargs = {k: self._step_cache if v is not None and type(v) is type(self.cache) else v
                          for k, v in kwargs.items()}
            module = self.layers[i]
            output = module(hidden, *args, **kwargs) if positional else module(*args, hidden_states=hidden, **kwargs)
            hidden = hidden_states(output)
        return hidden
