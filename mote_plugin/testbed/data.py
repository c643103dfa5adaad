"""CounterFact facts for the fact model: loading either CounterFact format, relation templates,
held-out phrasings and neighbourhood subjects.

A `Fact` is one (subject, relation, true object) triple the fact model is trained on. Facts taken from a
CounterFact record are *edit facts* (they carry `target_new`, the counterfactual object, and are what
the editors rewrite); the record's neighbourhood subjects become *neighbour facts* (same relation,
same true object, never edited: specificity is measured on them).

Relation templates come from CounterFact itself: every `requested_rewrite.prompt` of the ROME-format
file, grouped by `relation_id` (`relations.json`, shipped with the package). The flat EasyEdit format
has no relation id; a flat record gets its relation from its prompt's template.
"""

from __future__ import annotations

import json
import random
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

PACKAGE_DATA = Path(__file__).resolve().parent.parent / "data"


class DataError(ValueError):
    """Bad or missing fact-model data; the message names the problem and the fix."""


@dataclass
class Fact:
    subject: str
    relation_id: str
    target_true: str
    case_id: int | None = None  # CounterFact case id (edit facts only)
    prompt: str | None = None  # the rewrite prompt, subject filled in (edit facts only)
    target_new: str | None = None  # the counterfactual object (edit facts only)
    paraphrase_prompts: list[str] = field(default_factory=list)  # CounterFact's own paraphrases
    heldout_prompts: list[str] = field(default_factory=list)  # relation templates never trained for this subject
    train_templates: list[str] = field(default_factory=list)  # templates ('{}' = subject) trained on
    neighbours: list[dict] = field(default_factory=list)  # [{"prompt", "subject", "answer"}]
    # a subject whose true object (same relation) is this fact's target_new: trained, so the model knows the
    # new object as an answer of the relation, as a real LM knows every object CounterFact rewrites to
    support: list[dict] = field(default_factory=list)  # [{"subject", "answer"}]

    @property
    def is_edit_fact(self) -> bool:
        return self.target_new is not None


def load_relations(path: Path | None = None) -> dict[str, list[str]]:
    """relation_id -> its CounterFact prompt templates ('{}' stands for the subject)."""
    path = path or PACKAGE_DATA / "relations.json"
    with open(path) as f:
        return json.load(f)


def template_index(relations: dict[str, list[str]]) -> dict[str, str]:
    """template -> relation_id, for templates that belong to exactly one relation."""
    owners: dict[str, set[str]] = {}
    for rel, templates in relations.items():
        for t in templates:
            owners.setdefault(t, set()).add(rel)
    return {t: next(iter(r)) for t, r in owners.items() if len(r) == 1}


def record_relation(rec: dict, by_template: dict[str, str]) -> str | None:
    """The relation of a normalised CounterFact record: its own id (ROME format) or its prompt template's (flat)."""
    return rec["relation_id"] or by_template.get(rec["template"])


def split_subject(prompt: str, templates: list[str]) -> str | None:
    """Recover the subject of `prompt` from a list of templates (longest fixed text first)."""
    for t in sorted(templates, key=len, reverse=True):
        head, _, tail = t.partition("{}")
        if prompt.startswith(head) and prompt.endswith(tail) and len(prompt) > len(head) + len(tail):
            subject = prompt[len(head) : len(prompt) - len(tail)]
            if subject.strip() == subject and subject:
                return subject
    return None


def _stable_rng(*keys) -> random.Random:
    return random.Random(zlib.crc32(repr(keys).encode()))


def read_counterfact_records(data_dir: Path) -> list[dict]:
    """All CounterFact records under `data_dir/counterfact/*.json`, normalised to one schema.

    Accepts the flat EasyEdit format and the original ROME/MEMIT format (told apart per record).
    """
    cf_dir = Path(data_dir) / "counterfact"
    if not Path(data_dir).is_dir():
        raise DataError(f"data directory {data_dir} does not exist; pass --data pointing at a folder with "
                        "counterfact/*.json")
    files = sorted(cf_dir.glob("*.json"))
    if not files:
        raise DataError(f"no CounterFact files in {cf_dir}; expected counterfact/*.json (flat EasyEdit or ROME format)")
    records, seen = [], set()
    for path in files:
        try:
            with open(path) as f:
                raw = json.load(f)
        except json.JSONDecodeError as e:
            raise DataError(f"{path} is not valid JSON ({e}); replace it with a CounterFact JSON list") from e
        for r in raw:
            rec = _normalise_record(r)
            if rec is None or rec["case_id"] in seen:
                continue
            seen.add(rec["case_id"])
            records.append(rec)
    return records


def _normalise_record(r: dict) -> dict | None:
    if "requested_rewrite" in r:  # ROME / MEMIT format
        rw = r["requested_rewrite"]
        return {
            "case_id": int(r["case_id"]),
            "subject": rw["subject"],
            "prompt": rw["prompt"].format(rw["subject"]),
            "template": rw["prompt"],
            "relation_id": rw.get("relation_id"),
            "target_true": rw["target_true"]["str"],
            "target_new": rw["target_new"]["str"],
            "paraphrases": list(r.get("paraphrase_prompts", [])),
            "neighbour_prompts": list(r.get("neighborhood_prompts", [])),
        }
    if {"prompt", "subject", "target_new", "ground_truth"} <= r.keys():  # flat EasyEdit format
        if r["subject"] not in r["prompt"]:
            return None
        return {
            "case_id": int(r["case_id"]),
            "subject": r["subject"],
            "prompt": r["prompt"],
            "template": r["prompt"].replace(r["subject"], "{}", 1),
            "relation_id": None,
            "target_true": r["ground_truth"],
            "target_new": r["target_new"],
            "paraphrases": [r["rephrase_prompt"]] if r.get("rephrase_prompt") else [],
            "neighbour_prompts": [r["locality_prompt"]] if r.get("locality_prompt") else [],
        }
    return None


def build_facts(
    data_dir: Path,
    n_facts: int,
    relations: dict[str, list[str]] | None = None,
    neighbours_per_fact: int = 1,
    seed: int = 0,
    skip: int = 0,
) -> list[Fact]:
    """Select `n_facts` edit facts (plus their neighbour facts) from the CounterFact records; with `skip`, facts
    skip+1 .. skip+n_facts of the selection a (skip + n_facts)-fact build would make (so none of them is among the facts
    of a build of `skip` facts or fewer with the same data and seed).

    A record qualifies when its relation is known, the relation has at least 3 templates (so one can be
    held out), its subject occurs in no other selected fact, and its objects are short (<= 3 words).
    For each edit fact one relation template other than the rewrite template is held out of training:
    the model must answer it from the knowledge it has of the subject, not from memorised text.
    """
    relations = relations or load_relations()
    by_template = template_index(relations)
    records = read_counterfact_records(data_dir)
    rng = random.Random(seed)
    rng.shuffle(records)
    # (relation, true object) -> subjects that have it, for the support facts
    holders: dict[tuple[str, str], list[str]] = {}
    for rec in records:
        rel = record_relation(rec, by_template)
        holders.setdefault((rel, rec["target_true"]), []).append(rec["subject"])

    facts: list[Fact] = []
    used_subjects: set[str] = set()
    for rec in records:
        if len(facts) == skip + n_facts:
            break
        rel = record_relation(rec, by_template)
        if rel not in relations or len(relations[rel]) < 3 or rec["template"] not in relations[rel]:
            continue
        if rec["subject"] in used_subjects or any(len(o.split()) > 3 for o in (rec["target_true"], rec["target_new"])):
            continue
        if rec["target_true"] == rec["target_new"]:
            continue
        support = [s for s in holders.get((rel, rec["target_new"]), [])
                   if s not in used_subjects and s != rec["subject"]]
        if not support:  # nobody in the data holds the new object: the model could not know it as an answer
            continue
        neighbours = []
        for p in rec["neighbour_prompts"]:
            s = split_subject(p, relations[rel])
            if s and s != rec["subject"] and s not in used_subjects:
                neighbours.append({"prompt": p, "subject": s, "answer": rec["target_true"]})
            if len(neighbours) == neighbours_per_fact:
                break
        others = [t for t in relations[rel] if t != rec["template"]]
        heldout = _stable_rng(rec["case_id"], seed).choice(others)
        facts.append(
            Fact(
                subject=rec["subject"],
                relation_id=rel,
                target_true=rec["target_true"],
                case_id=rec["case_id"],
                prompt=rec["prompt"],
                target_new=rec["target_new"],
                paraphrase_prompts=rec["paraphrases"],
                heldout_prompts=[heldout.format(rec["subject"])],
                train_templates=[t for t in relations[rel] if t != heldout],
                neighbours=neighbours,
                support=[{"subject": support[0], "answer": rec["target_new"]}],
            )
        )
        used_subjects.add(rec["subject"])
        used_subjects.update(n["subject"] for n in neighbours)
        used_subjects.add(support[0])
    if len(facts) < skip + n_facts:
        asked = f"--facts {n_facts}" + (f" after --skip-facts {skip}" if skip else "")
        raise DataError(
            f"only {len(facts)} usable CounterFact records in {data_dir} (asked for {asked}); "
            "pass a larger --data directory or a smaller --facts"
        )
    return facts[skip:]


def unedited_facts(facts: list[Fact], relations: dict[str, list[str]]) -> list[Fact]:
    """The never-edited facts trained beside the edit facts, with every template of their relation: the
    neighbourhood subjects (specificity is measured on them) and the support subjects (holders of each
    edit fact's new object)."""
    out = []
    for fact in facts:
        for n in fact.neighbours + fact.support:
            out.append(Fact(subject=n["subject"], relation_id=fact.relation_id, target_true=n["answer"],
                            train_templates=list(relations[fact.relation_id])))
    return out


def relation_objects(data_dir: Path, relations: dict[str, list[str]], max_words: int = 3) -> dict[str, list[str]]:
    """relation_id -> the true objects CounterFact gives for it (short ones, sorted, deduplicated)."""
    by_template = template_index(relations)
    pools: dict[str, set[str]] = {}
    for rec in read_counterfact_records(data_dir):
        rel = record_relation(rec, by_template)
        if rel in relations and len(rec["target_true"].split()) <= max_words:
            pools.setdefault(rel, set()).add(rec["target_true"])
    return {rel: sorted(objs) for rel, objs in pools.items()}


def profile_facts(facts: list[Fact], pools: dict[str, list[str]], relations: dict[str, list[str]], n: int,
                  seed: int = 0) -> list[Fact]:
    """`n` more facts for every subject of `facts`, each of another relation, its object drawn from that
    relation's CounterFact objects (deterministic per subject and seed).

    A real LM knows many things about an entity, so its representation of the subject is specific to that
    entity. A subject the fact model knows one fact of is stored as little more than that fact's object:
    two subjects sharing the object get nearly the same key, and no editor can then rewrite one without
    the other (specificity measures exactly that). These facts are fictional (a random object of a real
    relation); they are trained, never edited nor scored, except in the knowledge report.
    """
    if n <= 0:
        return []
    out = []
    for fact in facts:
        rng = _stable_rng("profile", fact.subject, seed)
        others = sorted(r for r in pools if r != fact.relation_id and pools[r])
        for rel in rng.sample(others, min(n, len(others))):
            out.append(Fact(subject=fact.subject, relation_id=rel, target_true=rng.choice(pools[rel]),
                            train_templates=list(relations[rel])))
    return out


def read_corpus(data_dir: Path, max_chars: int | None = None) -> str:
    """Concatenated text of `data_dir/corpus/*.txt` (WikiText-style: headings and blank lines dropped)."""
    files = sorted((Path(data_dir) / "corpus").glob("*.txt"))
    if not files:
        raise DataError(f"no text in {Path(data_dir) / 'corpus'}; expected corpus/*.txt (e.g. WikiText)")
    lines = []
    for path in files:
        for line in path.read_text(encoding="utf-8").splitlines():
            line = line.strip()
            if line and not line.startswith("="):
                lines.append(line)
    text = "\n".join(lines)
    return text[:max_chars] if max_chars else text


def facts_to_json(facts: list[Fact]) -> list[dict]:
    return [asdict(f) for f in facts]


def facts_from_json(rows: list[dict]) -> list[Fact]:
    return [Fact(**r) for r in rows]


def edit_records(facts: list[dict], n: int, first: int | None = None, counterfact: str | Path | None = None,
                 one_per_subject: bool = True) -> list[dict]:
    """n records to edit: the build's first `first` known facts (all of them when None), then CounterFact records (flat
    EasyEdit format) on subjects the build does not hold, whose prompt contains the subject, from `counterfact` (a JSON
    file; default: the subset shipped with the package), one per subject unless `one_per_subject` is False.
    ValueError when there are fewer than n."""
    records = [f for f in facts if f["known"]][:first]
    seen = {f["subject"] for f in facts}
    path = Path(counterfact) if counterfact is not None else PACKAGE_DATA / "counterfact" / "counterfact-subset.json"
    for r in json.loads(path.read_text()):
        if len(records) >= n:
            break
        if r["subject"] not in seen and r["subject"] in r["prompt"]:
            if one_per_subject:
                seen.add(r["subject"])
            records.append(r)
    if len(records) < n:
        raise ValueError(f"{n} edits asked; the build's known facts and {path} give {len(records)}")
    return records[:n]
