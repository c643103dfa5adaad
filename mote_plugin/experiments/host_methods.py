"""EasyEdit's own editors (ROME, MEMIT, AlphaEdit) beside MoTE in the comparison (`compare.py`): the host with MoTE
registered, what a dense method needs of the model, the key covariance the host would download, and the host's token
metrics.

Dense baselines need the key covariance of their rewrite module (MEMIT, AlphaEdit; ROME with mom2_adjustment). The
host computes it from Wikipedia through `datasets`, which fails offline; `prime_host_covariance` writes it from the
plugin's corpus into the host's own cache format and place instead, under the run's directory. The host's AlphaEdit
saves its projector into the working directory: host methods run inside `working_directory(run directory)`.
"""

from __future__ import annotations

import contextlib
import importlib
import os
from pathlib import Path

import torch

from ..mote.hparams import MoTEHyperParams
from ..mote.model.blocks import input_device
from ..mote.model.hooks import recorded
from ..mote.model.stats import corpus_texts


def import_host():
    """The EasyEdit package with MoTE registered, or None (with the reason)."""
    from ..easyedit import register

    status = register()
    return (importlib.import_module("easyeditor") if status else None), status.reason


@contextlib.contextmanager
def working_directory(path: Path):
    previous = os.getcwd()
    path.mkdir(parents=True, exist_ok=True)
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


def prime_host_covariance(model, tok, hp, n_texts: int) -> None:
    """Write the uncentred second moment of the inputs of `rewrite_module_tmp` at each layer, over the first `n_texts`
    lines of the plugin's corpus, where the host's `layer_stats` looks for it (its own npz format, via its own running
    statistics). A file already there is kept (the covariance of the unedited model, as the host's own cache). The
    module's inputs must come as [B, T, d_in] (`host_edit.token_shaped` sees to it where a block flattens them)."""
    runningstats = importlib.import_module("easyeditor.util.runningstats")
    name = model.config._name_or_path.rsplit("/")[-1]
    texts = [t for _, t in zip(range(n_texts), corpus_texts(None))]
    device = input_device(model)
    for layer in hp.layers:
        module_name = hp.rewrite_module_tmp.format(layer)
        file = f"{module_name}_{hp.mom2_dtype}_mom2_{hp.mom2_n_samples}.npz"
        path = Path(hp.stats_dir) / name / f"{hp.mom2_dataset}_stats" / file
        if path.exists():
            continue
        stat = runningstats.CombinedStat(mom2=runningstats.SecondMoment())
        with recorded(model.get_submodule(module_name), what="input") as seen:
            for i in range(0, len(texts), 16):
                batch = tok(texts[i : i + 16], return_tensors="pt", padding=True, truncation=True, max_length=128)
                batch = batch.to(device)
                with torch.no_grad():
                    model(**batch, use_cache=False)
                stat.add(seen[0][batch["attention_mask"].bool()].to(getattr(torch, hp.mom2_dtype)))
        runningstats.save_cached_state(str(path), stat, {"sample_size": hp.mom2_n_samples})


def override(hp, name: str, overrides: dict):
    """A host hyper-parameter object with `overrides` set; keys it does not have raise, naming them."""
    unknown = sorted(k for k in overrides if not hasattr(hp, k))
    if unknown:
        raise ValueError(f"methods: {name}: unknown {type(hp).__name__} key(s) {', '.join(unknown)}")
    for k, v in overrides.items():
        setattr(hp, k, v)
    return hp


def dense_module_problem(model, hp) -> str | None:
    """Why a dense method (which rewrites `{rewrite_module_tmp}.weight`, 2-D) cannot edit this model, or None."""
    params = dict(model.named_parameters())
    for layer in hp.layers:
        name = hp.rewrite_module_tmp.format(layer)
        weight = params.get(f"{name}.weight")
        if weight is None:
            packed = [n for n, p in params.items() if n.startswith(name + ".") and p.ndim == 3]
            if packed:
                return f"{name} holds packed experts ({', '.join(packed)}): a dense method edits a 2-D `weight`"
            return f"{name}.weight does not exist in this model"
        if weight.ndim != 2:
            return f"{name}.weight is {weight.ndim}-D {tuple(weight.shape)}: a dense method edits a 2-D weight"
    return None


def host_quality(model, tok, request: dict, hp) -> dict:
    evaluate = importlib.import_module("easyeditor.evaluate.evaluate")
    device = input_device(model)
    hp = hp or MoTEHyperParams(alg_name="MoTE", model_name="model", layers=[0], device=str(device))
    return evaluate.compute_edit_quality(model, "model", hp, tok, request, device)


def host_token_metrics(model, tok, requests: list[dict], hp, before: dict) -> tuple[dict, list[dict]]:
    """The host's token accuracies after the edits: rewrite, rephrase, and locality (share of the unrelated prompt's
    argmax tokens unchanged, as BaseEditor computes it from pre/post outputs). Returns (means, one row per request)."""
    rows = []
    for request, pre in zip(requests, before["host_locality"]):
        post = host_quality(model, tok, request, hp)
        row = {"rewrite_acc": float(torch.tensor(post["rewrite_acc"], dtype=torch.float).mean())}
        if "rephrase_acc" in post:
            row["rephrase_acc"] = float(torch.tensor(post["rephrase_acc"], dtype=torch.float).mean())
        locality = [float((torch.tensor(tokens) == torch.tensor(pre[key])).float().mean())
                    for key, tokens in post["locality"].items()]
        if locality:
            row["locality_acc"] = sum(locality) / len(locality)
        rows.append(row)
    keys = ("rewrite_acc", "rephrase_acc", "locality_acc")
    means = {k: sum(v) / len(v) for k in keys if (v := [row[k] for row in rows if k in row])}
    return means, rows
