"""Training the fact model: a language model of WikiText text and CounterFact statements.

Every fact is stated under the templates of its relation (one template per edit fact is held out), now
and then behind a snippet of WikiText as CounterFact's own paraphrases are; WikiText windows keep it a
language model. Deterministic for a given seed and thread count.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..adapters import get_adapter
from ..mote.model.lookup import pad_right, token_span
from .data import Fact


@dataclass
class TrainConfig:
    epochs: int = 50  # passes over the facts
    statements_per_fact: int = 2  # statements of each fact per epoch (random templates)
    text_share: float = 0.2  # share of sequences that are WikiText windows
    prefix_prob: float = 0.5  # chance a statement follows a WikiText snippet (CounterFact paraphrases do)
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.01
    warmup_steps: int = 50
    text_window: int = 32
    router_aux_loss_coef: float = 0.01
    # In fact statements, tokens after the subject may not attend to the subject in decoder layers below this
    # one (training only): what the model knows of the subject must be computed at the subject's own tokens in
    # the early layers and read from there later, the storage locate-and-edit methods assume. 0 = off.
    subject_readout_layer: int = -1  # -1: half the decoder layers
    # ...and from that layer on they may read only the subject's last token (the subject is read where it is
    # stored, not re-assembled from its pieces).
    subject_readout_last_only: bool = True
    # share of fact statements trained under those masks (the rest see full attention, as at inference)
    subject_readout_share: float = 0.5
    # Batches of sequences of similar length (each epoch sorted by length, cut into batches, batch order shuffled),
    # as transformers' group_by_length: on the 56-fact build with 3 profile facts each, 56% of a randomly batched
    # token grid is padding, 3% when grouped. Off: the measured builds were trained with random batches.
    length_grouped: bool = False
    seed: int = 0


def statement(fact: Fact, template: str, prefix: str = "") -> str:
    return f"{prefix}{template.format(fact.subject)} {fact.target_true}."


def subject_chars(fact: Fact, template: str, prefix: str = "") -> tuple[int, int]:
    """Character span of the subject in `statement(fact, template, prefix)`."""
    start = len(prefix) + template.index("{}")
    return start, start + len(fact.subject)


def _snippets(text: str, rng: random.Random, n: int) -> list[str]:
    words = text.split()
    out = []
    for _ in range(n):
        i = rng.randrange(0, max(1, len(words) - 12))
        out.append(" ".join(words[i : i + rng.randint(3, 16)]) + ". ")
    return out


def epoch_sequences(facts: list[Fact], text_ids: list[int], tok, cfg: TrainConfig, rng: random.Random, text: str):
    """One epoch, shuffled: (token ids, subject token span or None) for fact statements and WikiText windows."""
    n_statements = len(facts) * cfg.statements_per_fact
    prefixes = _snippets(text, rng, n_statements)
    texts, chars = [], []
    for i in range(n_statements):
        fact = facts[i % len(facts)]
        prefix = prefixes[i] if rng.random() < cfg.prefix_prob else ""
        template = rng.choice(fact.train_templates)
        texts.append(statement(fact, template, prefix))
        chars.append(subject_chars(fact, template, prefix))
    enc = tok(texts, return_offsets_mapping=True)
    seqs = [(ids + [tok.eos_token_id], token_span(offsets, *span) if rng.random() < cfg.subject_readout_share else None)
            for ids, offsets, span in zip(enc["input_ids"], enc["offset_mapping"], chars)]
    n_text = int(len(seqs) * cfg.text_share / (1 - cfg.text_share))
    for _ in range(n_text):
        i = rng.randrange(0, len(text_ids) - cfg.text_window)
        seqs.append(([tok.bos_token_id] + text_ids[i : i + cfg.text_window], None))
    rng.shuffle(seqs)
    if cfg.length_grouped:
        seqs.sort(key=lambda s: len(s[0]))  # stable: equal lengths keep their shuffled order
        batches = [seqs[i : i + cfg.batch_size] for i in range(0, len(seqs), cfg.batch_size)]
        rng.shuffle(batches)
        seqs = [s for batch in batches for s in batch]
    return seqs


def readout_mask(spans: list[tuple[int, int] | None], width: int, keep_last: bool = False) -> torch.Tensor:
    """[B, 1, S, S] bool, False where a query after the subject would read a subject token
    (every subject token, or all but the last with `keep_last`)."""
    allowed = torch.ones(len(spans), 1, width, width, dtype=torch.bool)
    for b, span in enumerate(spans):
        if span is not None:
            first, last = span
            allowed[b, 0, last + 1 :, first : last + int(not keep_last)] = False
    return allowed


def _restrict(mask, allowed: torch.Tensor):
    """Combine a layer's attention mask (None = causal, bool = keep, float = additive) with `allowed`."""
    if mask is None:
        width = allowed.shape[-1]
        return allowed & torch.ones(width, width, dtype=torch.bool).tril()
    if mask.dtype == torch.bool:
        return mask & allowed[..., : mask.shape[-2], : mask.shape[-1]]
    return mask.masked_fill(~allowed[..., : mask.shape[-2], : mask.shape[-1]], torch.finfo(mask.dtype).min)


def subject_readout_hooks(model, cfg: TrainConfig, current: dict):
    """Pre-hooks on the attention of the decoder layers applying `current[key]` as an extra mask: key
    "early" below cfg.subject_readout_layer, "late" from there on when cfg.subject_readout_last_only."""
    handles = []
    layers = get_adapter(model).decoder_layers(model)
    readout = len(layers) // 2 if cfg.subject_readout_layer < 0 else cfg.subject_readout_layer
    if readout == 0:
        return handles
    for i, layer in enumerate(layers):
        key = "early" if i < readout else "late"
        if key == "late" and not cfg.subject_readout_last_only:
            continue

        def hook(module, args, kwargs, key=key):
            if current.get(key) is not None:
                kwargs["attention_mask"] = _restrict(kwargs.get("attention_mask"), current[key])
            return args, kwargs

        handles.append(layer.self_attn.register_forward_pre_hook(hook, with_kwargs=True))
    return handles


def _batches(seqs, batch_size: int, pad_id: int):
    for i in range(0, len(seqs), batch_size):
        chunk = [s for s, _ in seqs[i : i + batch_size]]
        spans = [span for _, span in seqs[i : i + batch_size]]
        batch = pad_right(chunk, pad_id)
        ids, mask = batch["input_ids"], batch["attention_mask"]
        labels = ids.masked_fill(mask == 0, -100)
        yield ids, mask, labels, spans


def train(model, tok, facts: list[Fact], text: str, cfg: TrainConfig, log=print, on_epoch=None) -> dict:
    """Train `model` in place; returns a small log (loss curve, tokens/s). `on_epoch(epoch, model)`, when given, is
    called after each epoch (1-based) with the model in eval mode (e.g. to save checkpoints); training goes on
    unchanged."""
    rng = random.Random(cfg.seed)
    torch.manual_seed(cfg.seed)
    text_ids = tok(text, add_special_tokens=False)["input_ids"]
    per_epoch = len(facts) * cfg.statements_per_fact / (1 - cfg.text_share)
    total_steps = cfg.epochs * math.ceil(per_epoch / cfg.batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))

    def lr_at(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        frac = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    model.config.router_aux_loss_coef = cfg.router_aux_loss_coef
    current: dict = {}
    handles = subject_readout_hooks(model, cfg, current)
    model.train()
    step, tokens, losses, t0 = 0, 0, [], time.time()
    bar = tqdm(total=total_steps, desc="training fact model", unit="step", leave=False)
    for epoch in range(cfg.epochs):
        seqs = epoch_sequences(facts, text_ids, tok, cfg, rng, text)
        epoch_loss = []
        for ids, mask, labels, spans in _batches(seqs, cfg.batch_size, tok.pad_token_id):
            if handles:
                current["early"] = readout_mask(spans, ids.shape[1])
                current["late"] = readout_mask(spans, ids.shape[1], keep_last=True)
            out = model(input_ids=ids, attention_mask=mask, labels=labels, output_router_logits=True, use_cache=False)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            epoch_loss.append(out.loss.item())
            tokens += int(mask.sum())
            step += 1
            bar.update(1)
        losses.append(sum(epoch_loss) / len(epoch_loss))
        bar.set_postfix(epoch=epoch + 1, loss=f"{losses[-1]:.3f}")
        if on_epoch is not None:
            model.eval()
            with torch.no_grad():
                on_epoch(epoch + 1, model)
            model.train()
    bar.close()
    for h in handles:
        h.remove()
    model.eval()
    seconds = time.time() - t0
    log(f"trained {step} steps, {tokens} tokens in {seconds:.0f} s ({tokens / seconds:.0f} tokens/s), final loss "
        f"{losses[-1]:.3f}")
    return {"steps": step, "tokens": tokens, "seconds": seconds, "epoch_loss": losses}
