"""Preservation statistics per edited layer and expert (docs/method.md, "Null space" and "Tucker basis"), streamed
and cached.

Over `n_tokens` non-padding tokens of a text corpus, for each requested layer:

    moments[j] = E[k_j k_j^T]  over the tokens routed to expert j   [E, h, h]   (null-space projectors)
    counts[j]  = number of tokens routed to expert j                 [E]         (sum = n_tokens * K)
    cov_out    = E[y y^T], y = routed experts' output of a token     [d, d]      ("out" whitening)
    cov_in     = sum_j counts_j moments_j / sum_j counts_j           [h, h]      ("in" whitening)

Sums are accumulated in float64 on the model's device, one batch at a time; the finished statistics are float32
on the CPU. `StatsCache` keeps one safetensors file per layer, named by a fingerprint of everything they depend on.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from tqdm.auto import tqdm

from ..._version import __version__
from .blocks import forward_block_inputs, input_device, moe_blocks
from .fingerprint import model_fingerprint
from .lookup import pad_right
from .storage import atomic_save_file

log = logging.getLogger(__name__)

CORPUS_DIR = Path(__file__).resolve().parents[2] / "data" / "corpus"  # mote_plugin/data/corpus
STATS_FORMAT = 1  # bump when the meaning or layout of the stored statistics changes


@dataclass
class LayerStats:
    moments: torch.Tensor  # [E, h, h] float32, E[k k^T] per expert (zero for experts with no tokens)
    counts: torch.Tensor  # [E] int64, tokens routed to each expert
    cov_out: torch.Tensor  # [d, d] float32, E[y y^T] of the routed experts' output
    n_tokens: int  # non-padding tokens seen

    @property
    def cov_in(self) -> torch.Tensor:
        """Key moment pooled over experts, weighted by their counts: [h, h] float32."""
        w = self.counts.to(torch.float64)  # [E]
        pooled = torch.zeros(self.moments.shape[1:], dtype=torch.float64)  # [h, h]
        for w_j, m_j in zip(w.tolist(), self.moments):  # expert by expert: no float64 copy of [E, h, h]
            pooled += w_j * m_j.to(torch.float64)
        return (pooled / w.sum().clamp_min(1)).float()


# ----------------------------------------------------------------------------------------------------------------
# Corpus
# ----------------------------------------------------------------------------------------------------------------


def _lines(path: Path, skip_headings: bool) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line and not (skip_headings and line.startswith("=")):
                yield line


def corpus_texts(spec: str | None) -> Iterable[str]:
    """Texts of a preservation corpus.

    None: the text shipped with the package (`mote_plugin/data/corpus/*.txt`, wikitext paragraphs; heading lines
    "= ... =" and empty lines skipped). An existing file: its non-empty lines. Anything else: a `datasets` name or
    path, `datasets.load_dataset(spec, split="train")["text"]`; "name:config" picks a config
    (e.g. "Salesforce/wikitext:wikitext-103-raw-v1").
    """
    if spec is None:
        files = sorted(CORPUS_DIR.glob("*.txt"))
        if not files:
            raise FileNotFoundError(f"no shipped corpus in {CORPUS_DIR}")
        return (line for path in files for line in _lines(path, skip_headings=True))
    if os.path.isfile(spec):
        return _lines(Path(spec), skip_headings=False)
    name, config = spec.rsplit(":", 1) if ":" in spec else (spec, None)
    try:
        import datasets
    except ImportError as e:
        raise RuntimeError(f"preservation corpus {spec!r} is not a file; a `datasets` name needs the `datasets` "
                           "package: pip install 'mote-plugin[corpora]' (or set preservation_corpus to a local text "
                           "file, or to null for the shipped text)") from e
    try:
        dataset = datasets.load_dataset(name, config, split="train")
    except Exception as e:
        raise RuntimeError(
            f"preservation corpus {spec!r} is neither a file nor a loadable `datasets` dataset ({type(e).__name__}: "
            f"{e}). Offline, set preservation_corpus to a local text file, or to null for the shipped text "
            "(HF_DATASETS_OFFLINE=1 makes `datasets` fail fast instead of retrying)."
        ) from e
    if "text" not in dataset.column_names:
        raise ValueError(f"dataset {spec!r} has no 'text' column (columns: {dataset.column_names})")
    return (t for t in dataset["text"] if t and t.strip())


def corpus_fingerprint(spec: str | None) -> str:
    """Content hash of the corpus for files (shipped or given); the spec itself for a `datasets` name."""
    files = sorted(CORPUS_DIR.glob("*.txt")) if spec is None else [Path(spec)] if os.path.isfile(spec) else None
    if files is None:
        return f"datasets:{spec}"
    h = hashlib.sha256()
    for path in files:
        h.update(path.read_bytes())
    return h.hexdigest()


def _windows(tok, texts: Iterable[str], max_length: int) -> Iterator[list[int]]:
    """Token windows of at most `max_length` tokens (a long text gives several, each with the special tokens)."""
    for text in texts:
        enc = tok(text, truncation=True, max_length=max_length, return_overflowing_tokens=True)
        ids = enc["input_ids"]
        for row in ids if ids and isinstance(ids[0], list) else [ids]:
            if row:
                yield row


def _batches(tok, texts: Iterable[str], n_tokens: int, batch_size: int, max_length: int):
    """Right-padded batches {input_ids, attention_mask} [B, S] holding exactly n_tokens real tokens in all
    (fewer if the corpus runs out); the last window is cut to fit."""
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    rows, left = [], n_tokens
    for row in _windows(tok, texts, max_length):
        rows.append(row[:left])
        left -= len(rows[-1])
        if len(rows) == batch_size or left == 0:
            yield pad_right(rows, pad)
            rows = []
        if left == 0:
            return
    if rows:
        yield pad_right(rows, pad)


# ----------------------------------------------------------------------------------------------------------------
# Statistics
# ----------------------------------------------------------------------------------------------------------------


class _Accumulator:
    """float64 running sums of one layer, on the block's device."""

    def __init__(self, adapter, block: nn.Module, device: torch.device):
        E, h = adapter.num_experts(block), adapter.d_hidden(block)
        d = adapter.down_param(block).shape[2 if adapter.is_transposed else 1]
        f64 = dict(dtype=torch.float64, device=device)
        self.moment_sum = torch.zeros(E, h, h, **f64)  # [E, h, h]
        self.counts = torch.zeros(E, dtype=torch.long, device=device)  # [E]
        self.out_sum = torch.zeros(d, d, **f64)  # [d, d]
        self.n_tokens = 0

    def add(self, adapter, block: nn.Module, x: torch.Tensor) -> None:
        """x [N, d]: block inputs of the batch's real (non-padding) tokens."""
        routed = adapter.route_keys(block, x)  # keys [N, K, h]
        y = adapter.experts_output(block, routed).double()  # [N, d]
        self.out_sum += y.T @ y
        for expert, rows, slots in routed.groups():
            k = routed.keys[rows, slots].double()  # [M, h]
            self.moment_sum[expert] += k.T @ k
            self.counts[expert] += rows.numel()
        self.n_tokens += x.shape[0]

    def finish(self) -> LayerStats:
        counts = self.counts.cpu()
        moments = torch.empty(self.moment_sum.shape, dtype=torch.float32)  # [E, h, h], filled expert by expert
        for j, (s_j, n_j) in enumerate(zip(self.moment_sum, counts.tolist())):  # [h, h] float64
            m_j = s_j / max(n_j, 1)
            moments[j] = (0.5 * (m_j + m_j.T)).float().cpu()  # exact symmetry
        cov_out = self.out_sum / max(self.n_tokens, 1)  # [d, d]
        return LayerStats(moments, counts, cov_out.float().cpu(), self.n_tokens)


def layer_statistics(
    model: nn.Module,
    tok,
    adapter,
    layers: Sequence[int],
    texts: Iterable[str],
    n_tokens: int,
    batch_size: int = 8,
    max_length: int = 128,
    progress: bool = True,
) -> dict[int, LayerStats]:
    """Stream `texts` through the model (windows of `max_length` tokens, `batch_size` windows per forward) until
    `n_tokens` non-padding tokens have been seen, and accumulate each layer's `LayerStats`. Padding is excluded; only
    one batch of block inputs is held at a time. Eval mode during the pass (the previous mode is restored)."""
    blocks = moe_blocks(model, adapter, layers)
    acc = {l: _Accumulator(adapter, b, adapter.down_param(b).device) for l, b in blocks.items()}
    device = input_device(model)
    was_training = model.training
    model.eval()
    bar = tqdm(total=n_tokens, unit="tok", desc="MoTE preservation stats",
               disable=None if progress else True)  # None: a bar on a terminal only
    try:
        for batch in _batches(tok, texts, n_tokens, batch_size, max_length):
            mask = batch["attention_mask"].bool()  # [B, S]

            def add(layer, block, x):  # x [B, S, d]
                acc[layer].add(adapter, block, x[mask.to(x.device)])  # [N, d]

            forward_block_inputs(model, blocks, {k: v.to(device) for k, v in batch.items()}, add)
            bar.update(int(mask.sum()))
    finally:
        bar.close()
        model.train(was_training)
    stats = {l: a.finish() for l, a in acc.items()}
    seen = next(iter(stats.values())).n_tokens
    if seen < n_tokens:
        log.warning("preservation corpus ran out: %d of %d tokens", seen, n_tokens)
    return stats


# ----------------------------------------------------------------------------------------------------------------
# Cache
# ----------------------------------------------------------------------------------------------------------------


def stats_key(model: nn.Module, layers: Sequence[int], corpus: str | None, n_tokens: int, max_length: int) -> dict:
    """The `key_parts` of `StatsCache.get_or_compute` for these statistics."""
    return {
        "model": model_fingerprint(model),
        "layers": [int(l) for l in layers],
        "corpus": corpus,
        "corpus_hash": corpus_fingerprint(corpus),
        "n_tokens": int(n_tokens),
        "max_length": int(max_length),
        "version": __version__,
        "format": STATS_FORMAT,
    }


class StatsCache:
    """One safetensors file per layer in `stats_dir`, named `<sha256 of the key>.safetensors`, the key (as JSON) in
    the file's metadata. Writes are atomic; a file that cannot be read, or whose key differs, is recomputed."""

    TENSORS = ("moments", "counts", "cov_out")

    def __init__(self, stats_dir: str | os.PathLike):
        self.dir = Path(stats_dir)

    @staticmethod
    def layer_key(key_parts: dict, layer: int) -> str:
        key = {k: v for k, v in key_parts.items() if k != "layers"} | {"layer": int(layer)}
        return json.dumps(key, sort_keys=True)

    def path(self, key_parts: dict, layer: int) -> Path:
        digest = hashlib.sha256(self.layer_key(key_parts, layer).encode()).hexdigest()
        return self.dir / f"layer{layer}-{digest[:32]}.safetensors"

    def get_or_compute(
        self, key_parts: dict, compute_fn: Callable[[list[int]], dict[int, LayerStats]]
    ) -> dict[int, LayerStats]:
        """Statistics of every layer in `key_parts["layers"]`; `compute_fn(missing_layers)` computes the ones not
        cached (one call for all of them, none if all are cached) and they are stored."""
        layers = [int(l) for l in key_parts["layers"]]
        stats = {l: s for l in layers if (s := self.load(key_parts, l)) is not None}
        missing = [l for l in layers if l not in stats]
        if missing:
            computed = compute_fn(missing)
            for l in missing:
                self.save(key_parts, l, computed[l])
                stats[l] = computed[l]
        return {l: stats[l] for l in layers}

    def load(self, key_parts: dict, layer: int) -> LayerStats | None:
        path = self.path(key_parts, layer)
        if not path.exists():
            return None
        expected = self.layer_key(key_parts, layer)
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("key") != expected:
                    log.warning("recomputing statistics: %s was written for another key", path)
                    return None
                t = {name: f.get_tensor(name) for name in self.TENSORS}
            n_tokens = int(meta["n_tokens"])
        except Exception as e:
            log.warning("recomputing statistics: %s is unreadable (%s: %s)", path, type(e).__name__, e)
            return None
        E, h, h2 = t["moments"].shape if t["moments"].ndim == 3 else (0, 0, -1)
        if h != h2 or t["counts"].shape != (E,) or t["cov_out"].ndim != 2 or int(t["counts"].sum()) <= 0:
            log.warning("recomputing statistics: %s holds malformed tensors", path)
            return None
        return LayerStats(t["moments"], t["counts"], t["cov_out"], n_tokens)

    def save(self, key_parts: dict, layer: int, stats: LayerStats) -> Path:
        path = self.path(key_parts, layer)
        tensors = {name: getattr(stats, name).contiguous().cpu() for name in self.TENSORS}
        meta = {"key": self.layer_key(key_parts, layer), "n_tokens": str(stats.n_tokens)}
        return atomic_save_file(tensors, path, meta)


def preservation_stats(
    model: nn.Module,
    tok,
    adapter,
    layers: Sequence[int],
    corpus: str | None = None,
    n_tokens: int = 20000,
    max_length: int = 128,
    stats_dir: str | os.PathLike = "./.cache/mote-stats",
    batch_size: int = 8,
    progress: bool = True,
) -> dict[int, LayerStats]:
    """`layer_statistics` over `corpus_texts(corpus)`, through a `StatsCache` in `stats_dir`."""
    key = stats_key(model, layers, corpus, n_tokens, max_length)

    def compute(missing: list[int]) -> dict[int, LayerStats]:
        texts = corpus_texts(corpus)
        return layer_statistics(model, tok, adapter, missing, texts, n_tokens, batch_size, max_length, progress)

    return StatsCache(stats_dir).get_or_compute(key, compute)
