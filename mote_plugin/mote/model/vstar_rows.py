"""The token rows of a v* batch, and the positions its loss reads.

Per request t, one rewrite row per context template (the prompt behind the template, then the target's first tokens,
so that the logits predict every target token) and one KL row, "{subject} is a". The loss reads, in the rewrite rows,
the log-probability of each target token (weighted so that a request's reads sum to the mean over its rows of the
target's NLL per token) and, in the KL row, the next-token distribution at its lookup token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .lookup import encode_with_lookup, target_token_ids


@dataclass
class VStarRows:
    tokens: list[list[int]]  # B rows of token ids: per request, its rewrite rows then its KL row
    lookup: list[int]  # [B] each row's lookup position
    owner: torch.Tensor  # [B] the request of each row
    first: torch.Tensor  # [T] each request's first row (its prompt behind the first template, "{}")
    # target-token reads, M of them: row, pos (the logits there predict tok), tok, owner (long) and weight (float32)
    reads: dict[str, torch.Tensor]
    kl_rows: torch.Tensor  # [T] each request's KL row
    kl_pos: torch.Tensor  # [T] ... and the position read there (its lookup token)


def vstar_rows(tok, requests: list[dict], templates: list[str], fact_token: str,
               max_length: int | None) -> VStarRows:
    """The rows and reads of `requests` (EasyEdit requests: `prompt` containing `subject`, `target_new`)."""
    n = len(templates)
    prompts, subjects = [], []
    for r in requests:
        prompts += [ctx.format(r["prompt"]) for ctx in templates] + [f"{r['subject']} is a"]
        subjects += [r["subject"]] * (n + 1)
    batch, lookup, _ = encode_with_lookup(tok, prompts, subjects, fact_token, max_length)
    lengths = batch["attention_mask"].sum(1).tolist()
    rows, reads = [], {k: [] for k in ("row", "pos", "tok", "owner", "weight")}
    kl_rows, kl_pos = [], []
    for t, r in enumerate(requests):
        target = target_token_ids(tok, r["target_new"])
        for i in range(t * (n + 1), (t + 1) * (n + 1)):
            prompt = batch["input_ids"][i, : lengths[i]].tolist()
            if i < (t + 1) * (n + 1) - 1:  # a rewrite row continues with the target, so each target token is predicted
                rows.append(prompt + target[:-1])
                for j, token in enumerate(target):  # the logits at len - 1 + j predict target token j
                    for key, value in zip(reads, (i, lengths[i] - 1 + j, token, t, 1.0 / (len(target) * n))):
                        reads[key].append(value)
            else:
                rows.append(prompt)
                kl_rows.append(i)
                kl_pos.append(int(lookup[i]))
    owner = torch.arange(len(requests)).repeat_interleave(n + 1)
    reads = {k: torch.tensor(v, dtype=torch.float32 if k == "weight" else torch.long) for k, v in reads.items()}
    return VStarRows(tokens=rows, lookup=lookup.tolist(), owner=owner, first=torch.arange(len(requests)) * (n + 1),
                     reads=reads, kl_rows=torch.tensor(kl_rows), kl_pos=torch.tensor(kl_pos))
