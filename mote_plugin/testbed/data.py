"""CounterFact and zsRE facts for the fact model: loading either CounterFact format, relation templates,
held-out phrasings and neighbourhood subjects; zsRE questions (`build_zsre_facts`).

A `Fact` is one (subject, relation, true object) triple the fact model is trained on. Facts taken from a
CounterFact record are *edit facts* (they carry `target_new`, the counterfactual object, and are what
the editors rewrite); the record's neighbourhood subjects become *neighbour facts* (same relation,
same true object, never edited: specificity is measured on them).

Relation templates come from CounterFact itself: every `requested_rewrite.prompt` of the ROME-format
file, grouped by `relation_id` (`relations.json`, shipped with the package). The flat EasyEdit format
has no relation id; a flat record gets its relation from its prompt's template.

A zsRE fact is a question (`src`, the subject in it) taught with its answer; its relation is `ZSRE`, and its
neighbour and support carry their own question templates (`templates`).
"""

from __future__ import annotations

import json
import random
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

PACKAGE_DATA = Path(__file__).resolve().parent.parent / "data"
ZSRE = "zsre"  # the relation_id of zsRE facts (a question is its own template)
ZSRE_KEYS = ("subject", "src", "rephrase", "alt", "answers", "loc", "loc_ans")  # of a MEND/MEMIT zsRE record


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
    # [{"prompt", "subject", "answer"}, and for zsRE "templates": the neighbour's trained questions]
    neighbours: list[dict] = field(default_factory=list)
    # a subject whose true object (same relation) is this fact's target_new: trained, so the model knows the
    # new object as an answer of the relation, as a real LM knows every object CounterFact rewrites to
    support: list[dict] = field(default_factory=list)  # [{"subject", "answer"}, and for zsRE "templates"]

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


def _read_json(path: Path, what: str):
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is not valid JSON ({e}); replace it with a {what} JSON list") from e


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
        for r in _read_json(path, "CounterFact"):
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
                            train_templates=list(n.get("templates") or relations[fact.relation_id])))
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


# zsRE is not shipped with the package (its licence is unknown): builds read it from a file the user gives
ZSRE_FORMAT = ("a MEND/MEMIT-format zsRE JSON list (e.g. MEMIT's zsre_mem_eval.json, EasyEdit's zsre_mem.json) whose "
               "records have subject, src, rephrase, alt, answers, loc and loc_ans")


def zsre_path(path: str | Path | None) -> Path:
    """The zsRE file a build reads (`BuildOptions.zsre_data`, `--zsre-data`); a DataError if none is given or found."""
    if not path or not Path(path).is_file():
        given = f"{path} is not a file" if path else "no zsRE file given"
        raise DataError(f"zsRE facts need --zsre-data PATH (BuildOptions.zsre_data): {ZSRE_FORMAT} ({given}; zsRE is "
                        "not shipped with the package, its licence is unknown; docs/testbed.md says where to get it)")
    return Path(path)


def read_zsre_records(path: str | Path | None, max_words: int = 3) -> list[dict]:
    """The records of a zsRE file (`ZSRE_FORMAT`) a fact can be made of, in file order: of each subject, the first
    record whose answer (`answers[0]`) has at most `max_words` words, whose `alt` is not empty and whose subject occurs
    in both questions (`src`, `rephrase`, neither with a brace). Of the 737 records of the project's test file
    (../shared/data/zsre/zsre-eval.json) these are 525, 524 once a build on the shipped data leaves out its CounterFact
    subjects (`build_zsre_facts`)."""
    path = zsre_path(path)
    raw = _read_json(path, "MEND/MEMIT-format zsRE")
    for i, r in enumerate(raw if isinstance(raw, list) and raw else [None]):
        missing = [k for k in ZSRE_KEYS if k not in r] if isinstance(r, dict) else list(ZSRE_KEYS)
        if missing or not r["answers"]:
            raise DataError(f"{path} is not {ZSRE_FORMAT}: record {i} lacks {', '.join(missing) or 'an answer'}; "
                            "pass such a file as --zsre-data")
    records, seen = [], set()
    for r in raw:
        s = r["subject"]
        if s in seen or not r["alt"] or s not in r["src"] or s not in r["rephrase"]:
            continue
        if any(c in r["src"] + r["rephrase"] for c in "{}") or len(r["answers"][0].split()) > max_words:
            continue
        seen.add(s)
        records.append(r)
    return records


def _editable(r: dict, max_words: int = 3) -> bool:
    """A zsRE record can be an edit fact: its `alt` is a short answer other than its own."""
    return r["alt"] != r["answers"][0] and len(r["alt"].split()) <= max_words


def build_zsre_facts(records: list[dict], n_facts: int, seed: int = 0, skip: int = 0,
                     exclude: set[str] = frozenset()) -> list[Fact]:
    """Select `n_facts` zsRE edit facts (facts skip+1 .. skip+n_facts of the selection, as `build_facts`) from the
    records of a zsRE file (`read_zsre_records`).

    The records whose subject is not in `exclude` (a build's CounterFact subjects), shuffled by the seed, are taken in
    pairs. One record of a pair whose `alt` is a short answer other than its own is the edit
    fact: its question (`src`) is trained with its answer, its paraphrase (`rephrase`) never is, and the edit rewrites
    the answer to `alt`. The other is its neighbour: its question is trained in both wordings and never edited, and
    specificity is scored on it (`src` -> its answer). The support statement asks the edit's question of the
    neighbour's subject and answers it with the edit's `alt`, a fictional fact (as profile facts are) that makes `alt`
    an answer the model gives to that question, as CounterFact's support subjects make `target_new` one.
    """
    records = [r for r in records if r["subject"] not in exclude]
    _stable_rng("zsre", seed).shuffle(records)
    facts = []
    for a, b in zip(records[0::2], records[1::2]):
        if len(facts) == skip + n_facts:
            break
        if not _editable(a):
            a, b = b, a
        if not _editable(a):
            continue
        template = a["src"].replace(a["subject"], "{}", 1)
        neighbour_templates = [q.replace(b["subject"], "{}", 1) for q in (b["src"], b["rephrase"])]
        facts.append(Fact(subject=a["subject"], relation_id=ZSRE, target_true=a["answers"][0], prompt=a["src"],
                          target_new=a["alt"], paraphrase_prompts=[a["rephrase"]], train_templates=[template],
                          neighbours=[{"prompt": b["src"], "subject": b["subject"], "answer": b["answers"][0],
                                       "templates": neighbour_templates}],
                          support=[{"subject": b["subject"], "answer": a["alt"], "templates": [template]}]))
    if len(facts) < skip + n_facts:
        raise DataError(f"only {len(facts)} usable zsRE facts in the --zsre-data file (asked for {skip + n_facts}: "
                        f"--zsre-facts {n_facts} after --skip-facts {skip}); pass a larger zsRE file or fewer "
                        "--zsre-facts")
    return facts[skip:]


def zsre_rows(facts: list[Fact], known: list[bool]) -> list[dict]:
    """zsRE edit facts as MEND/MEMIT eval records (what `dataset: zsre` reads), each marked `known`: the locality
    question (`loc`) is the neighbour's, its answer (`loc_ans`) the one the model was taught; `support` is the support
    statement's question (answered with `alt`)."""
    return [{"subject": f.subject, "src": f.prompt, "rephrase": f.paraphrase_prompts[0], "alt": f.target_new,
             "answers": [f.target_true], "loc": f.neighbours[0]["prompt"], "loc_ans": f.neighbours[0]["answer"],
             "support": f.support[0]["templates"][0].format(f.support[0]["subject"]), "known": k}
            for f, k in zip(facts, known)]


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
