"""The EasyEdit host's own v* (MEMIT's `compute_z`), for `v_objective: memit_host`.

The plugin never needs a host: its default v* is the same objective, batched (vstar_objective.py). With
`memit_host`, each request's target comes from the host's code, one at a time. The context templates are the
plugin's, generated the same way per model (the host's `get_context_templates` keeps one list per process, from
whichever model asked first). Detection is lazy and cached; a host that fails to import counts as absent (the reason
is kept in `host_status()`).
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
from functools import lru_cache


@lru_cache(maxsize=1)
def _compute_z_module():
    if importlib.util.find_spec("easyeditor") is None:
        return None, "easyeditor is not installed"
    try:
        module = importlib.import_module("easyeditor.models.memit.compute_z")
    except Exception as e:  # a stale or broken host (docs/easyedit.md, "Getting a host"): treat as absent
        return None, f"easyeditor is installed but its MEMIT compute_z does not import ({type(e).__name__}: {e})"
    return module, "easyeditor MEMIT compute_z"


def host_status() -> str:
    return _compute_z_module()[1]


def compute_z_fn():
    """The host's `compute_z(model, tok, request, hparams, layer, context_templates)`, or None."""
    module = _compute_z_module()[0]
    if module is None:
        return None

    def host_compute_z(model, tok, request, hparams, layer, templates):
        req = dict(request)
        req["prompt"] = req["prompt"].replace(req["subject"], "{}", 1)  # the host's MEMIT works on "{}" templates
        if not req["target_new"].startswith(" "):
            req["target_new"] = " " + req["target_new"]  # the host's MEMIT prepends the space itself
        hparams = copy.copy(hparams)
        if hparams.v_loss_layer < 0:  # the host reads `max(v_loss_layer, layer)`: give it the real last layer
            hparams.v_loss_layer = model.config.get_text_config().num_hidden_layers + hparams.v_loss_layer
        names = {id(p): n for n, p in model.named_parameters()}
        if f"{hparams.lm_head_module}.weight" not in names.values():  # a tied head is listed under the embeddings
            head = model.get_output_embeddings()
            if head is not None and id(head.weight) in names:
                hparams.lm_head_module = names[id(head.weight)].removesuffix(".weight")
        # the host's forward passes would build a KV cache (config.use_cache); v* needs none, and transformers'
        # Qwen3.5-MoE cache fails on a model with full attention only (the fact model variant)
        use_cache = getattr(model.config, "use_cache", None)
        model.config.use_cache = False
        try:
            return module.compute_z(model, tok, req, hparams, layer, templates)
        finally:
            model.config.use_cache = use_cache

    return host_compute_z

