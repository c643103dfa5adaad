"""Build (or reuse) a fact model: data -> tokenizer -> MoE LM trained on facts -> probes -> cache.

The cache directory holds
  model/            save_pretrained model + tokenizer (AutoModelForCausalLM / AutoTokenizer load it)
  facts.json        the edit facts in EasyEdit's flat CounterFact fields, each marked `known`, with held-out
                    phrasings and neighbourhood prompts
  zsre.json         with `zsre_facts`: the zsRE edit facts as MEND/MEMIT eval records (`data.zsre_rows`), each
                    marked `known`
  report.json       knowledge table, causal-tracing profile, chosen lookup token and edit layers,
                    editability probe, build time, model size; with `zsre_facts`, the zsRE knowledge and the
                    unedited model's zsRE metrics on its known zsRE facts
  manifest.json     the options and the weights' hash; a second build with the same options reuses the
                    cache, a mismatched or corrupt cache is rebuilt (never silently used)
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import transformers

from .._version import __version__
from ..loading import load_model, load_tokenizer
from . import probes
from .data import (
    PACKAGE_DATA,
    build_facts,
    build_zsre_facts,
    facts_to_json,
    load_relations,
    profile_facts,
    read_corpus,
    read_counterfact_records,
    read_zsre_records,
    relation_objects,
    unedited_facts,
    zsre_path,
    zsre_rows,
)
from .model import ModelSize, make_config, make_model
from .tokenizer import special_ids, train_tokenizer
from .train import TrainConfig, statement, train

MANIFEST = "manifest.json"


# options added after the first release, with the behaviour builds had before them
OPTIONS_ADDED_LATER = {"profile_facts": 0, "subject_tokens": True, "train.length_grouped": False, "skip_facts": 0,
                       "zsre_facts": 0}


@dataclass
class BuildOptions:
    arch: str = "qwen3_moe"
    facts: int = 200
    # edit facts skip+1 .. skip+facts of the data's selection: a build whose facts are none of a smaller build's (e.g.
    # the demo's and the tests', none of the quality protocol's 200 dev/test facts); zsRE facts likewise
    skip_facts: int = 0
    # zsRE questions taught beside the CounterFact facts, each with a neighbour question and a support statement
    # (data.build_zsre_facts; docs/testbed.md says what an edit is on them); 0 = none
    zsre_facts: int = 0
    # the zsRE file they are read from (data.ZSRE_FORMAT), required with zsre_facts: zsRE is not shipped with the
    # package (its licence is unknown). Its content, not its path, is part of the cache key
    zsre_data: str | None = None
    data: str = str(PACKAGE_DATA)
    seed: int = 0
    vocab_size: int = 4096
    corpus_chars: int = 200_000
    threads: int = 2
    size: ModelSize = field(default_factory=ModelSize)
    train: TrainConfig = field(default_factory=TrainConfig)
    # extra (fictional) facts per subject, so a subject is more than one fact (data.profile_facts; docs/testbed.md
    # says what they change), at several times the training time
    profile_facts: int = 0
    # False: the tokenizer learns from the text, the relation wording and the objects but not from the subjects'
    # names, so a name is split into pieces shared with other words, as real LLM tokenizers split most CounterFact
    # subjects. True: every name gets tokens of its own, whose embeddings alone can store the subject's one fact, and
    # an edit then moves every subject with the same object. The shipped builds (demo, tests, quality protocol) set
    # False.
    subject_tokens: bool = True
    probe_facts: int = 20  # facts used for causal tracing and the v* probe
    trace_threshold: float = 0.5  # recovery share that makes a layer part of the edit band
    edit_band_width: int = 3

    @classmethod
    def from_dict(cls, options: dict) -> BuildOptions:
        """Options from a mapping, e.g. a YAML's `build:` (its `train:` mapping a `TrainConfig`)."""
        options = dict(options)
        train = TrainConfig(**options.pop("train", {}))
        return cls(**options, train=train)

    def fingerprint(self) -> dict:
        d = asdict(self)
        d["data"] = _data_fingerprint(Path(self.data))
        del d["zsre_data"]
        if self.zsre_facts > 0:  # only a build with zsRE facts depends on the zsRE file (older caches stay valid)
            d["zsre_data"] = _file_hash(zsre_path(self.zsre_data))[:16]
        d["version"] = __version__
        # the model code is transformers': a build trained under one version may compute differently under another
        d["transformers"] = transformers.__version__
        for name, first_release in OPTIONS_ADDED_LATER.items():  # at that value, caches built before it stay valid
            *outer, key = name.split(".")  # "train.length_grouped": a field of a nested options dataclass
            holder = d[outer[0]] if outer else d
            if holder[key] == first_release:
                del holder[key]
        return d


def tokenizer_texts(text: str, edit_facts: list, trained_facts: list, subject_tokens: bool) -> list[str]:
    """What the tokenizer learns from: the corpus, every trained statement, the edit facts' other prompts and new
    objects; with `subject_tokens=False` every subject's name is cut out of all of it."""
    texts = [text] + [statement(f, t) for f in trained_facts for t in f.train_templates]
    texts += [p for f in edit_facts for p in f.heldout_prompts + f.paraphrase_prompts]
    texts += [" " + f.target_new for f in edit_facts]
    if subject_tokens:
        return texts
    # in the facts' order (the measured builds were made so)
    for name in dict.fromkeys(f.subject for f in trained_facts):
        texts = [t.replace(name, "") for t in texts]
    return texts


def _data_fingerprint(data_dir: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(data_dir.glob("counterfact/*.json")) + sorted(data_dir.glob("corpus/*.txt")):
        h.update(path.name.encode())
        h.update(hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()[:16]


def _file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def cached(out: Path, opts: BuildOptions) -> tuple[bool, str]:
    """(usable, reason): the cache at `out` was built with these options and its files are intact."""
    manifest = out / MANIFEST
    if not manifest.exists():
        return False, "no cache yet"
    try:
        m = json.loads(manifest.read_text())
        if m["options"] != json.loads(json.dumps(opts.fingerprint())):
            return False, "cache built with other options"
        for rel, digest in m["files"].items():
            if _file_hash(out / rel) != digest:
                return False, f"cache file {rel} does not match its recorded hash (corrupt)"
    except (OSError, KeyError, ValueError) as e:
        return False, f"cache manifest unreadable ({e})"
    return True, "cache reused"


def build(out: str | Path, opts: BuildOptions, log=print, on_epoch=None) -> dict:
    """Build the fact model into `out` (or reuse a valid cache there). Returns the report. `on_epoch(epoch, model)` is
    called after each training epoch (`train`), when the model is trained here."""
    out = Path(out)
    # a missing or malformed zsRE file (--zsre-data) fails here, before any work
    zsre_records = read_zsre_records(opts.zsre_data) if opts.zsre_facts else []
    ok, reason = cached(out, opts)
    if ok:
        log(f"{reason}: {out}")
        return json.loads((out / "report.json").read_text())
    if out.exists() and any(out.iterdir()):
        log(f"rebuilding {out}: {reason}")
    torch.set_num_threads(opts.threads)
    t0 = time.time()
    relations = load_relations()
    facts = build_facts(Path(opts.data), opts.facts, relations, seed=opts.seed, skip=opts.skip_facts)
    all_facts = facts + unedited_facts(facts, relations)
    zsre = []
    if opts.zsre_facts:  # no zsRE subject is a CounterFact subject of the data or one the build trains
        cf_subjects = {r["subject"] for r in read_counterfact_records(Path(opts.data))} | {f.subject for f in all_facts}
        zsre = build_zsre_facts(zsre_records, opts.zsre_facts, seed=opts.seed, skip=opts.skip_facts,
                                exclude=cf_subjects)
    zsre_all = zsre + unedited_facts(zsre, relations)
    profiles = []
    if opts.profile_facts:  # the object pools need a second pass over the CounterFact files
        # once per subject (a zsRE neighbour's subject is also its fact's support subject)
        subjects = all_facts + list({f.subject: f for f in zsre_all}.values())
        profiles = profile_facts(subjects, relation_objects(Path(opts.data), relations), relations, opts.profile_facts,
                                 opts.seed)
    text = read_corpus(Path(opts.data), opts.corpus_chars)
    log(f"{len(facts)} edit facts + {len(all_facts) - len(facts)} unedited (neighbour and support) facts + "
        + (f"{len(zsre)} zsRE edit facts + {len(zsre_all) - len(zsre)} unedited zsRE facts + " if zsre else "")
        + f"{len(profiles)} profile facts, {len(text):,} characters of text")

    trained = all_facts + zsre_all + profiles
    tok = train_tokenizer(tokenizer_texts(text, facts + zsre, trained, opts.subject_tokens), opts.vocab_size)
    torch.manual_seed(opts.seed)
    model = make_model(make_config(opts.arch, len(tok), opts.size, special_ids(tok)))
    train_log = train(model, tok, trained, text, opts.train, log=log, on_epoch=on_epoch)
    train_seconds = time.time() - t0

    report = {"arch": opts.arch, "n_facts": len(facts), "n_unedited_facts": len(all_facts) - len(facts),
              "n_profile_facts": len(profiles)}
    report["params"] = sum(p.numel() for p in model.parameters())
    report["knowledge"] = probes.knowledge_report(model, tok, all_facts)
    if profiles:
        report["knowledge"]["profile"] = probes.profile_knowledge(model, tok, profiles)
    known = probes.known_facts(model, tok, all_facts)
    probe = [f for f, k in zip(facts, known) if k][: opts.probe_facts]
    report["known_share"] = sum(known) / len(known)
    report["tracing"], report["editability"], choice = None, {}, None
    if probe:  # a tiny or undertrained build may know no fact: then nothing can be traced or edited
        report["tracing"] = probes.causal_trace(model, tok, probe, seed=opts.seed)
        for token in ("subject_last", "last"):
            band = probes.edit_band(report["tracing"][token], opts.trace_threshold, opts.edit_band_width)
            recovery = report["tracing"][token]
            res = probes.editability(model, tok, probe, band[-1] if band else recovery.index(max(recovery[:-1])), token)
            res["band"] = band
            report["editability"][token] = res
            if choice is None and band and res["flipped"] >= 0.9:
                choice = token
    report["lookup_token"] = choice
    report["edit_layers"] = report["editability"][choice]["band"] if choice else []
    report["train"] = {k: train_log[k] for k in ("steps", "tokens", "seconds")}
    report["train"]["final_loss"] = train_log["epoch_loss"][-1]
    rows = []
    if zsre:
        report["zsre"], rows = zsre_report(model, tok, zsre_all)
    report["build_seconds"] = time.time() - t0
    report["train_seconds"] = train_seconds

    _write_cache(out, opts, model, tok, facts, known, report, rows)
    log(f"built {opts.arch} fact model in {report['build_seconds']:.0f} s -> {out}")
    return report


def zsre_report(model, tok, facts: list) -> tuple[dict, list[dict]]:
    """(the report's zsRE part, the zsRE rows) for the zsRE facts and their unedited facts: the knowledge table
    (top-1 of the taught answer on the questions, on the held-out paraphrases and on the neighbours' questions), which
    edit facts are known (as `probes.known_facts`), and the unedited model's zsRE metrics (`metrics.zsre_metrics`) on
    the known ones."""
    from ..metrics import zsre_metrics

    edit = [f for f in facts if f.is_edit_fact]
    known = probes.known_facts(model, tok, facts)
    rows = zsre_rows(edit, known)
    report = {"n_facts": len(edit), "n_unedited_facts": len(facts) - len(edit),
              "knowledge": probes.knowledge_report(model, tok, facts), "known_share": sum(known) / len(known)}
    # the support statements: does the model give each edit's new answer to its question asked of another subject?
    supports = unedited_facts([replace(f, neighbours=[]) for f in edit], relations={})
    report["knowledge"]["support"] = probes.profile_knowledge(model, tok, supports)
    known_rows = [r for r in rows if r["known"]]
    if known_rows:
        metrics = zsre_metrics(model, tok, known_rows)
        report["unedited"] = {k: v for k, v in metrics.items() if not k.endswith("_items")}
    return report, rows


def _write_cache(out: Path, opts: BuildOptions, model, tok, facts, known, report, zsre: list[dict]) -> None:
    """Write everything into a temporary sibling directory, then swap it in (no half-written cache)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp-", dir=out.parent))
    try:
        model.save_pretrained(tmp / "model")
        tok.save_pretrained(tmp / "model")
        rows = facts_to_json(facts)
        for row, fact, k in zip(rows, facts, known):
            row.update(
                known=k,
                ground_truth=fact.target_true,
                rephrase_prompt=(fact.paraphrase_prompts or fact.heldout_prompts)[0],
                locality_prompt=fact.neighbours[0]["prompt"] if fact.neighbours else None,
                locality_ground_truth=fact.neighbours[0]["answer"] if fact.neighbours else None,
            )
        (tmp / "facts.json").write_text(json.dumps(rows, indent=1, ensure_ascii=False))
        if zsre:
            (tmp / "zsre.json").write_text(json.dumps(zsre, indent=1, ensure_ascii=False))
        (tmp / "report.json").write_text(json.dumps(report, indent=1))
        files = {str(p.relative_to(tmp)): _file_hash(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
        (tmp / MANIFEST).write_text(json.dumps({"options": opts.fingerprint(), "files": files}, indent=1))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load(out: str | Path, device: str = "cpu"):
    """(model, tokenizer, facts rows, report) from a built cache (its zsRE rows: `load_zsre`)."""
    out = Path(out)
    model = load_model(out / "model", torch.float32).to(device)
    tok = load_tokenizer(out / "model")
    facts = json.loads((out / "facts.json").read_text())
    report = json.loads((out / "report.json").read_text())
    return model, tok, facts, report


def load_zsre(out: str | Path) -> list[dict]:
    """The zsRE rows of a built cache (`data.zsre_rows`: MEND/MEMIT eval records marked `known`); [] for a build without
    zsRE facts."""
    path = Path(out) / "zsre.json"
    return json.loads(path.read_text()) if path.exists() else []
