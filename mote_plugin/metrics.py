"""Scoring a target after a prompt: the numbers every knowledge-editing metric is built from.

`target_scores` teacher-forces ` target` after each prompt and returns, per example, the summed
log-probability of the target tokens and whether every target token is the argmax (greedy decoding
reproduces the target). CounterFact's probability metrics (the paper's Appendix A) compare two such
log-probabilities; zsRE's and EasyEdit's token metrics use the argmax.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .mote.model.blocks import input_device
from .mote.model.lookup import pad_id_in_vocab, pad_right, target_token_ids


@dataclass
class TargetScores:
    logprob: torch.Tensor  # [B] sum of log P(target token | prefix)
    mean_logprob: torch.Tensor  # [B] per-token mean
    top1: torch.Tensor  # [B] bool: every target token is the argmax
    token_acc: torch.Tensor  # [B] share of target tokens that are the argmax
    predicted: list[torch.Tensor]  # B x [len(target)] the argmax token at each target position (teacher-forced)


@torch.no_grad()
def target_scores(model, tok, prompts: list[str], targets: list[str], batch_size: int = 64,
                  edit_hook=None) -> TargetScores:
    """Score each target after its prompt. `edit_hook(batch, prompt_lengths)` may install temporary
    hooks for the batch (used by probes that add a vector to a hidden state); it returns a remover."""
    device = input_device(model)
    pad = pad_id_in_vocab(tok, model.get_input_embeddings().num_embeddings)
    out = {k: [] for k in ("logprob", "mean_logprob", "top1", "token_acc")}
    predicted = []
    for i in range(0, len(prompts), batch_size):
        p_ids = tok(prompts[i : i + batch_size])["input_ids"]
        t_ids = [target_token_ids(tok, t) for t in targets[i : i + batch_size]]
        batch = pad_right([p + t for p, t in zip(p_ids, t_ids)], pad)
        ids, mask = batch["input_ids"], batch["attention_mask"]
        remove = edit_hook(ids, [len(p) for p in p_ids]) if edit_hook else None
        try:
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits.float()
        finally:
            if remove:
                remove()
        logp = torch.log_softmax(logits, dim=-1)  # [B, S, V]
        for b, (p, t) in enumerate(zip(p_ids, t_ids)):
            pos = torch.arange(len(p) - 1, len(p) - 1 + len(t), device=logp.device)
            tgt = torch.tensor(t, device=logp.device)
            lp = logp[b, pos, tgt]  # [len(t)]
            argmax = logp[b, pos].argmax(-1)  # [len(t)]
            hit = argmax == tgt
            predicted.append(argmax.cpu())
            out["logprob"].append(lp.sum())
            out["mean_logprob"].append(lp.mean())
            out["top1"].append(hit.all())
            out["token_acc"].append(hit.float().mean())
    return TargetScores(**{k: torch.stack(v).cpu() for k, v in out.items()}, predicted=predicted)


def prefers(model, tok, prompts: list[str], first: list[str], second: list[str], batch_size: int = 64) -> torch.Tensor:
    """[B] bool: P(first | prompt) > P(second | prompt), CounterFact's comparison as ROME/MEMIT compute it
    (mean per-token log-probability of each target, so targets of different lengths compare fairly)."""
    a = target_scores(model, tok, prompts, first, batch_size).mean_logprob
    b = target_scores(model, tok, prompts, second, batch_size).mean_logprob
    return a > b


def _record_prompts(r: dict) -> tuple[list[str], list[tuple[str, str]]]:
    """Paraphrases and (neighbour prompt, its true answer) of a CounterFact record in either flat shape:
    EasyEdit's (rephrase_prompt, locality_prompt/locality_ground_truth) or the fact model's facts.json
    (paraphrase_prompts, neighbours)."""
    paraphrases = list(r.get("paraphrase_prompts") or ([r["rephrase_prompt"]] if r.get("rephrase_prompt") else []))
    if r.get("neighbours"):
        neighbours = [(n["prompt"], n["answer"]) for n in r["neighbours"]]
    elif r.get("locality_prompt"):
        neighbours = [(r["locality_prompt"], r.get("locality_ground_truth") or r["ground_truth"])]
    else:
        neighbours = []
    return paraphrases, neighbours


def counterfact_metrics(model, tok, records: list[dict], batch_size: int = 64) -> dict:
    """The paper's CounterFact metrics (probability based, the paper's Appendix A), as shares in [0, 1]:

    efficacy        P(new | prompt) > P(true | prompt) on the rewrite prompt
    generalization  the same on the paraphrases
    specificity     P(true | neighbour) > P(new | neighbour) on neighbourhood prompts (unedited subjects)
    utility         the mean of the three
    Each also comes per example (`*_items`) so callers can compute intervals.
    """
    rows: dict[str, list[tuple[str, str, str]]] = {"efficacy": [], "generalization": [], "specificity": []}
    for r in records:
        true = r.get("ground_truth") or r["target_true"]
        paraphrases, neighbours = _record_prompts(r)
        rows["efficacy"].append((r["prompt"], r["target_new"], true))
        rows["generalization"] += [(p, r["target_new"], true) for p in paraphrases]
        # specificity: the neighbour keeps its own (true) answer over the new object
        rows["specificity"] += [(p, answer, r["target_new"]) for p, answer in neighbours]
    out = {}
    for key, triples in rows.items():
        prompts, first, second = (list(x) for x in zip(*triples)) if triples else ([], [], [])
        items = prefers(model, tok, prompts, first, second, batch_size) if prompts else torch.zeros(0, dtype=torch.bool)
        out[key] = items.float().mean().item() if len(items) else float("nan")
        out[key + "_items"] = items.tolist()
    out["utility"] = sum(out[k] for k in rows) / 3
    return out


def per_record(metrics: dict, records: list[dict], dataset: str = "counterfact") -> list[dict]:
    """The `*_items` of `counterfact_metrics` / `zsre_metrics` regrouped by record: for each record its efficacy,
    generalization (mean over its paraphrases) and specificity (mean over its neighbours), None where it has none."""
    if dataset == "zsre":
        counts = {key: [1] * len(records) for key in ("efficacy", "generalization", "specificity")}
    else:
        prompts = [_record_prompts(r) for r in records]
        counts = {"efficacy": [1] * len(records), "generalization": [len(p) for p, _ in prompts],
                  "specificity": [len(n) for _, n in prompts]}
    rows = [{} for _ in records]
    for key, sizes in counts.items():
        items, start = [float(x) for x in metrics[key + "_items"]], 0
        if len(items) != sum(sizes):
            raise ValueError(f"{key}: {len(items)} items for {sum(sizes)} prompts of {len(records)} records")
        for row, n in zip(rows, sizes):
            row[key] = sum(items[start : start + n]) / n if n else None
            start += n
    return rows


def zsre_metrics(model, tok, records: list[dict], batch_size: int = 64) -> dict:
    """The zsRE metrics (argmax based, the paper's Appendix A) as MEMIT computes them (`compute_rewrite_quality_zsre`)
    and EasyEdit its zsRE rewrite and rephrase accuracy (`compute_rewrite_or_rephrase_quality`): each answer is
    teacher-forced after its prompt (` answer`, so every answer token is predicted from the gold prefix) and a record
    scores the share of its answer tokens that are the argmax (token-level accuracy); each metric is the mean over
    records, in [0, 1]:

    efficacy        the new answer (`alt`) after the question (`src`)
    generalization  the new answer after the paraphrase (`rephrase`)
    specificity     the locality answer (`loc_ans`) after the locality question (`loc`), against that gold answer as
                    MEMIT scores it. The fact model's zsRE rows (`testbed.data.zsre_rows`): a neighbour's question and
                    the answer the model was taught. MEND's file: an NQ question, whose answer a model may not know
                    before any edit (EasyEdit instead compares the argmax tokens with the unedited model's: the
                    comparison's host locality column)
    utility         the mean of the three
    `*_exact` is the share of records whose every answer token is the argmax (greedy decoding reproduces the answer);
    `*_items` the per-record token accuracies, in record order. Records are MEND/MEMIT zsRE rows (src, rephrase, alt
    or answers, loc, loc_ans).
    """
    new = [r.get("alt") or r["answers"][0] for r in records]
    out = {}
    for key, prompts, answers in (("efficacy", [r["src"] for r in records], new),
                                  ("generalization", [r["rephrase"] for r in records], new),
                                  ("specificity", [r["loc"] for r in records], [r["loc_ans"] for r in records])):
        scores = target_scores(model, tok, prompts, answers, batch_size)
        out[key], out[key + "_items"] = scores.token_acc.mean().item(), scores.token_acc.tolist()
        out[key + "_exact"] = scores.top1.float().mean().item()
    out["utility"] = (out["efficacy"] + out["generalization"] + out["specificity"]) / 3
    return out


def preservation_change(model, tok, layer: int, requests: list[dict], fact_token: str, edit, texts: list[str],
                        max_length: int = 64) -> dict:
    """How much an edit moves one MoE layer's experts on preserved text, relative to the move at the edit keys.

    Runs `edit()` (any callable that edits `model` in place) between two measurements of the routed experts' output
    of MoE layer `layer`: on every real token of `texts` (the layer's inputs taken before the edit, so that edits of
    lower layers do not move them) and at the requests' lookup tokens (`fact_token`, captured before and after).

        ratio = mean_n ||dy_n|| / mean_t ||dy_t||      n: preserved tokens, t: edit keys

    Returns {"ratio", "median", "p90", "p99", "max"} (per-token changes over the mean edit change), "edit_change"
    (the mean ||dy_t||) and "tokens" (preserved tokens measured).
    """
    from .adapters import get_adapter
    from .mote.model.blocks import forward_block_inputs, moe_blocks
    from .mote.model.capture import capture
    from .mote.model.requests import normalise_requests

    adapter = get_adapter(model)
    block = moe_blocks(model, adapter, [layer])[layer]  # ValueError for a layer out of range or without experts
    batch = tok(texts, return_tensors="pt", padding=True, truncation=True, max_length=max_length)
    batch = {k: v.to(input_device(model)) for k, v in batch.items()}
    grabbed = {}
    forward_block_inputs(model, {layer: block}, batch, lambda l, b, x: grabbed.__setitem__("x", x))  # [B, S, d]
    x = grabbed["x"][batch["attention_mask"].bool().to(grabbed["x"].device)]  # [N, d] real tokens only
    reqs = normalise_requests(requests)

    def outputs() -> tuple[torch.Tensor, torch.Tensor]:  # [N, d] on preserved tokens, [T, d] at the edit keys
        with torch.no_grad():
            preserved = adapter.experts_output(block, adapter.route_keys(block, x)).float()
            at_edits = adapter.experts_output(block, capture(model, tok, adapter, reqs, [layer], fact_token)[layer])
        return preserved, at_edits.float()

    preserved0, edit0 = outputs()
    edit()
    preserved1, edit1 = outputs()
    moved = (preserved1 - preserved0).norm(dim=1)  # [N]
    edit_change = (edit1 - edit0).norm(dim=1).mean()
    if not edit_change > 0:
        raise ValueError(f"the edit did not change the experts' output of layer {layer} at the edit keys: no ratio to "
                         "report")
    rel = moved / edit_change
    q = torch.quantile(rel, torch.tensor([0.5, 0.9, 0.99], dtype=rel.dtype, device=rel.device)).tolist()
    return {"ratio": rel.mean().item(), "median": q[0], "p90": q[1], "p99": q[2], "max": rel.max().item(),
            "edit_change": edit_change.item(), "tokens": int(moved.numel())}
