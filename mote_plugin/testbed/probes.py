"""What the fact model knows and where it keeps it.

- `knowledge_report`: greedy top-1 of the true object and CounterFact's P(true) > P(new) on rewrite
  prompts, held-out templates, CounterFact paraphrases and neighbourhood prompts, each next to the
  majority-object baseline of its relation (a model that always answers its relation's most common
  object scores that much without knowing anything).
- `causal_trace`: ROME's causal tracing. Noise on the subject tokens' embeddings; restore the clean
  hidden state of one token at one layer; the share of the clean-corrupt gap in P(true object) that
  comes back, per layer, for the subject's last token and the prompt's last token.
- `editability`: a v* delta at the lookup token of one layer flips how many known facts to target_new
  (P(new) > P(true)), and carries to a held-out phrasing with the same delta.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

import torch
from tqdm.auto import tqdm

from ..adapters import get_adapter
from ..metrics import target_scores
from ..mote.hparams import MoTEHyperParams
from ..mote.model.hooks import hidden_states, recorded
from ..mote.model.lookup import encode_with_lookup, target_token_ids
from ..mote.model.vstar_objective import VStarConfig, compute_z
from .data import Fact


def _majority(answers: list[str], relations: list[str]) -> float:
    """Share of examples whose answer is their relation's most common answer in this set."""
    by_rel: dict[str, Counter] = {}
    for a, r in zip(answers, relations):
        by_rel.setdefault(r, Counter())[a] += 1
    return sum(c.most_common(1)[0][1] for c in by_rel.values()) / max(1, len(answers))


def _row(model, tok, prompts, trues, news, relations) -> dict:
    if not prompts:
        return {"n": 0}
    true = target_scores(model, tok, prompts, trues)
    row = {"n": len(prompts), "top1": true.top1.float().mean().item(), "majority": _majority(trues, relations)}
    if news is not None:
        new = target_scores(model, tok, prompts, news)
        row["p_true_gt_new"] = (true.mean_logprob > new.mean_logprob).float().mean().item()
    return row


@torch.no_grad()
def knowledge_report(model, tok, facts: list[Fact]) -> dict:
    edit = [f for f in facts if f.is_edit_fact]
    rows = {}
    rows["rewrite"] = _row(model, tok, [f.prompt for f in edit], [f.target_true for f in edit],
                           [f.target_new for f in edit], [f.relation_id for f in edit])
    for key, attr in (("heldout_template", "heldout_prompts"), ("paraphrase", "paraphrase_prompts")):
        items = [(p, f) for f in edit for p in getattr(f, attr)]
        rows[key] = _row(model, tok, [p for p, _ in items], [f.target_true for _, f in items],
                         [f.target_new for _, f in items], [f.relation_id for _, f in items])
    items = [(n, f) for f in edit for n in f.neighbours]
    rows["neighbourhood"] = _row(model, tok, [n["prompt"] for n, _ in items], [n["answer"] for n, _ in items],
                                 [f.target_new for _, f in items], [f.relation_id for _, f in items])
    return rows


def profile_knowledge(model, tok, facts: list[Fact]) -> dict:
    """Top-1 accuracy on the (trained) profile facts, one trained template each."""
    return _row(model, tok, [f.train_templates[0].format(f.subject) for f in facts], [f.target_true for f in facts],
                None,
                [f.relation_id for f in facts])


def known_facts(model, tok, facts: list[Fact]) -> list[bool]:
    """Per edit fact: the model answers its rewrite prompt with the true object (top-1) and prefers it to target_new."""
    edit = [f for f in facts if f.is_edit_fact]
    prompts = [f.prompt for f in edit]
    true = target_scores(model, tok, prompts, [f.target_true for f in edit])
    new = target_scores(model, tok, prompts, [f.target_new for f in edit])
    return (true.top1 & (true.mean_logprob > new.mean_logprob)).tolist()


@torch.no_grad()
def causal_trace(model, tok, facts: list[Fact], n_noise: int = 5, noise_scale: float = 3.0, seed: int = 0) -> dict:
    """Recovery (share of the clean-corrupt gap in P(true)) per layer, for two tokens.

    Returns {"subject_last": [L floats], "last": [L floats], "clean": p, "corrupt": p, "n": facts}.
    Layer l means the output of decoder layer l. Noise: N(0, (noise_scale * sigma)^2) with sigma the
    std of the embedding matrix, as ROME sets it from the embeddings of subjects.
    """
    layers = get_adapter(model).decoder_layers(model)
    n_layers = len(layers)
    embed = model.get_input_embeddings()
    sigma = embed.weight.float().std().item()
    gen = torch.Generator().manual_seed(seed)
    first_ids = [target_token_ids(tok, f.target_true)[0] for f in facts]
    sums = {"subject_last": torch.zeros(n_layers), "last": torch.zeros(n_layers)}
    clean_sum = corrupt_sum = 0.0
    for fact, answer in zip(tqdm(facts, desc="causal tracing", leave=False), first_ids):
        batch, _, span = encode_with_lookup(tok, [fact.prompt], [fact.subject], "last")
        ids = batch["input_ids"]  # [1, S]
        first, last = span[0].tolist()
        positions = {"subject_last": last, "last": ids.shape[1] - 1}
        with recorded(layers) as clean_states:  # each layer's output on the clean prompt
            p_clean = torch.softmax(model(input_ids=ids, use_cache=False).logits[0, -1].float(), -1)[answer].item()
        # one batch: row 0..n_noise-1 corrupted only; then for each (token, layer) n_noise restored rows
        plan = [(None, None)] + [(tkn, l) for tkn in positions for l in range(n_layers)]
        rows = len(plan) * n_noise
        noise = torch.randn(n_noise, last - first + 1, embed.weight.shape[1], generator=gen) * noise_scale * sigma
        noise = noise.repeat(len(plan), 1, 1)  # same noise for every plan entry

        def corrupt(m, a, o):
            o = o.clone()
            o[:, first : last + 1] += noise.to(o.dtype)
            return o

        def restore(l):
            def hook(m, a, o):
                h = hidden_states(o).clone()
                for k, (tkn, layer_idx) in enumerate(plan):
                    if layer_idx == l:
                        h[k * n_noise : (k + 1) * n_noise, positions[tkn]] = clean_states[l][0, positions[tkn]]
                return (h, *o[1:]) if isinstance(o, tuple) else h
            return hook

        hooks = [embed.register_forward_hook(corrupt)]
        hooks += [layer.register_forward_hook(restore(l)) for l, layer in enumerate(layers)]
        try:
            logits = model(input_ids=ids.repeat(rows, 1), use_cache=False).logits[:, -1].float()
            probs = torch.softmax(logits, -1)[:, answer]
        finally:
            for h in hooks:
                h.remove()
        probs = probs.view(len(plan), n_noise).mean(1)
        p_corrupt = probs[0].item()
        clean_sum += p_clean
        corrupt_sum += p_corrupt
        for k, (tkn, l) in enumerate(plan[1:], start=1):
            sums[tkn][l] += probs[k].item() - p_corrupt
    gap = max(clean_sum - corrupt_sum, 1e-9)
    n = len(facts)
    return {
        "subject_last": (sums["subject_last"] / gap).tolist(),
        "last": (sums["last"] / gap).tolist(),
        "clean": clean_sum / n,
        "corrupt": corrupt_sum / n,
        "n": n,
    }


def edit_band(recovery: list[float], threshold: float = 0.5, width: int = 3) -> list[int]:
    """The edit layers: the first `width` layers of the earliest run of at least two consecutive layers whose
    recovery is >= threshold (MEMIT edits a band of layers where the lookup token carries the fact; a lone
    layer, typically layer 0 where restoring a token just undoes the noise on it, is no band)."""
    run: list[int] = []
    for l, r in enumerate(recovery + [float("-inf")]):
        if r >= threshold:
            run.append(l)
            continue
        if len(run) >= 2:
            return run[:width]
        run = []
    return []


def add_vector_hook(model, layer_module_tmp: str, layer: int, positions: torch.Tensor, vector: torch.Tensor):
    """Install a forward hook adding `vector` [d] to a layer's output at `positions` [B] (one per row); returns the
    remover."""

    def hook(module, args, output):
        hidden = hidden_states(output).clone()  # [B, S, d]
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        hidden[rows, positions.to(hidden.device)] += vector.to(hidden.dtype)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    handle = model.get_submodule(layer_module_tmp.format(layer)).register_forward_hook(hook)
    return handle.remove


def editability(model, tok, facts: list[Fact], layer: int, fact_token: str, cfg: VStarConfig | None = None) -> dict:
    """v* at `layer` for each fact; share flipped to target_new on the rewrite prompt, and on the held-out phrasing."""
    cfg = replace(cfg or MoTEHyperParams.default_vstar_config(max_length=None), fact_token=fact_token)
    flipped, carried, norms = [], [], []
    for fact in tqdm(facts, desc=f"v* probe ({fact_token}, layer {layer})", leave=False):
        v = compute_z(model, tok, {"prompt": fact.prompt, "subject": fact.subject, "target_new": fact.target_new},
                      layer, cfg)
        norms.append((v.delta.norm() / (v.z - v.delta).norm()).item())
        for prompt, out in ((fact.prompt, flipped), (fact.heldout_prompts[0], carried)):
            _, lookup, _ = encode_with_lookup(tok, [prompt], [fact.subject], fact_token)

            def hook(ids, prompt_lens, lookup=lookup):
                return add_vector_hook(model, cfg.layer_module_tmp, layer, lookup.expand(ids.shape[0]), v.delta)

            new = target_scores(model, tok, [prompt], [fact.target_new], edit_hook=hook)
            true = target_scores(model, tok, [prompt], [fact.target_true], edit_hook=hook)
            out.append(bool(new.mean_logprob[0] > true.mean_logprob[0]))
    return {
        "layer": layer,
        "fact_token": fact_token,
        "n": len(facts),
        "flipped": sum(flipped) / len(facts),
        "heldout_carried": sum(carried) / len(facts),
        "delta_norm_ratio": sum(norms) / len(norms),
    }
