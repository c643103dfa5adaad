"""The lookup token: where in a prompt an edit reads its key and writes its value.

EasyEdit's `fact_token` names it: `subject_last` (the subject's last token, ROME/MEMIT's choice for real
models), `subject_first`, or `last` (the prompt's last token). Positions come from the fast tokenizer's
character offsets, so multi-token subjects and BPE merges across the subject boundary are handled, and
batches are padded on the right (the positions are the same as for the unpadded prompt).
"""

from __future__ import annotations

import torch

FACT_TOKENS = ("subject_last", "subject_first", "last")


def check_fact_token(fact_token: str) -> None:
    if fact_token not in FACT_TOKENS:
        raise ValueError(f"unknown fact_token {fact_token!r}; choose one of {', '.join(FACT_TOKENS)}")


def subject_span(prompt: str, subject: str) -> tuple[int, int]:
    """Character span of the subject's last occurrence in the prompt (MEMIT uses the last one)."""
    start = prompt.rfind(subject)
    if not subject or start < 0:
        raise ValueError(f"subject {subject!r} not found in prompt {prompt!r}")
    return start, start + len(subject)


def token_span(offsets: list[tuple[int, int]], start: int, end: int) -> tuple[int, int]:
    """First and last token index whose characters overlap [start, end)."""
    hit = [i for i, (a, b) in enumerate(offsets) if b > a and a < end and b > start]
    if not hit:
        raise ValueError(f"no token covers characters {start}..{end}")
    return hit[0], hit[-1]


def target_token_ids(tok, target: str) -> list[int]:
    """Token ids of a target as it follows a prompt (with a leading space, as MEMIT/EasyEdit do)."""
    ids = tok(" " + target.strip(), add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"target {target!r} tokenises to nothing")
    return ids


def pad_id_in_vocab(tok, vocab_size: int) -> int:
    """An id to pad with that the model can embed (padded positions are masked, so which one does not matter): the
    tokenizer's pad id when it lies inside the vocabulary, else its EOS id, else 0. EasyEdit sets Qwen tokenizers' pad
    token to "<|endoftext|>", which a tokenizer without it appends as a new id past the embeddings."""
    for candidate in (tok.pad_token_id, tok.eos_token_id):
        if isinstance(candidate, int) and 0 <= candidate < vocab_size:
            return candidate
    return 0


def pad_right(rows: list[list[int]], pad_id: int | None) -> dict[str, torch.Tensor]:
    """Token-id rows -> {"input_ids" [B, S], "attention_mask" [B, S]}, padded on the right."""
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id if pad_id is not None else 0, dtype=torch.long)  # [B, S]
    mask = torch.zeros((len(rows), width), dtype=torch.long)  # [B, S]
    for b, row in enumerate(rows):
        input_ids[b, : len(row)] = torch.tensor(row)
        mask[b, : len(row)] = 1
    return {"input_ids": input_ids, "attention_mask": mask}


def encode_with_lookup(tok, prompts: list[str], subjects: list[str], fact_token: str, max_length: int | None = None):
    """Tokenise `prompts` (right padding) and find each one's lookup token and subject tokens.

    Returns (batch, lookup [B] long, subject_tokens [B, 2] long: first and last subject token).
    Prompts longer than `max_length` are cut from the left, keeping the subject: a subject cut off raises.
    """
    check_fact_token(fact_token)
    enc = tok(prompts, return_offsets_mapping=True, add_special_tokens=True)
    ids, lookups, spans = [], [], []
    for b, (prompt, subject) in enumerate(zip(prompts, subjects)):
        offsets = enc["offset_mapping"][b]
        first, last = token_span(offsets, *subject_span(prompt, subject))
        row = enc["input_ids"][b]
        shift = 0
        if max_length is not None and len(row) > max_length:
            shift = len(row) - max_length
            if first - shift < 1:
                raise ValueError(f"prompt {prompt[:60]!r}... is longer than max_length={max_length} and the cut would "
                                 "drop the subject")
            row = row[:1] + row[shift + 1 :]  # keep <s>
        pos = {"subject_last": last, "subject_first": first, "last": len(enc["input_ids"][b]) - 1}[fact_token]
        ids.append(row)
        lookups.append(pos - shift)
        spans.append((first - shift, last - shift))
    return pad_right(ids, tok.pad_token_id), torch.tensor(lookups), torch.tensor(spans)
