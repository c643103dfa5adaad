"""zsRE on the fact model: the facts a build teaches (questions, neighbours, support statements), the zsRE metrics
(checked against a hand computation on a model whose logits are fixed), the rows a build writes and the edit requests
made of them. Seconds: data selection, a stub model and hand-made rows; the build itself is tested at a tiny size in
test_testbed_build.py. The zsRE records come from ../shared/data/zsre (the package does not ship zsRE, its licence
being unknown): the tests that need them skip where it is absent."""

import json
from types import SimpleNamespace

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from mote_plugin.experiments.compare import CompareConfig, load_records, request_of, zsre_requests
from mote_plugin.metrics import per_record, zsre_metrics
from mote_plugin.mote.model.requests import normalise_requests
from mote_plugin.testbed.data import (
    PACKAGE_DATA,
    ZSRE,
    DataError,
    build_zsre_facts,
    read_counterfact_records,
    read_zsre_records,
    unedited_facts,
    zsre_rows,
)
from mote_plugin.testbed.train import statement

# ---------------------------------------------------------------------------------------------------------------------
# the metrics, by hand
# ---------------------------------------------------------------------------------------------------------------------

WORDS = ["<pad>", "q1", "q2", "p1", "p2", "l1", "l2", "A", "B", "C", "D"]


class BigramStub(torch.nn.Module):
    """A language model whose prediction after a token depends on that token only: the argmax after token `a` is
    `next_of[a]` (<pad> for a token without an entry)."""

    def __init__(self, tok, next_of: dict[str, str]):
        super().__init__()
        self.embed = torch.nn.Embedding(len(WORDS), 1)
        self.table = torch.zeros(len(WORDS), len(WORDS))
        for a, b in next_of.items():
            self.table[tok.convert_tokens_to_ids(a), tok.convert_tokens_to_ids(b)] = 10.0

    def get_input_embeddings(self):
        return self.embed

    def forward(self, input_ids, attention_mask=None, use_cache=None):
        return SimpleNamespace(logits=self.table[input_ids])  # [B, S, V]


@pytest.fixture(scope="module")
def word_tok():
    inner = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<pad>"))
    inner.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=inner, pad_token="<pad>")


def test_zsre_metrics_match_a_hand_computation(word_tok):
    """Two records; the stub predicts A after q1, p1; C after A, l1, l2; D after q2; B after p2 and C.

    record 1: efficacy   q1 -> "A B": A right, then C for B: 1/2        generalization p1 -> "A B": 1/2
              specificity l1 -> "C": 1
    record 2: efficacy   q2 -> "D": 1                                   generalization p2 -> "D" (B): 0
              specificity l2 -> "C D": C right, then B for D: 1/2
    Token accuracy per record, averaged: efficacy (1/2 + 1) / 2 = 0.75, generalization 0.25, specificity 0.75,
    utility 7/12; all tokens right: efficacy 1/2, generalization 0, specificity 1/2."""
    model = BigramStub(word_tok, {"q1": "A", "p1": "A", "A": "C", "l1": "C", "l2": "C", "q2": "D", "p2": "B",
                                  "C": "B"})
    records = [{"src": "q1", "rephrase": "p1", "alt": "A B", "answers": ["D"], "loc": "l1", "loc_ans": "C"},
               {"src": "q2", "rephrase": "p2", "alt": "D", "answers": ["A"], "loc": "l2", "loc_ans": "C D"}]
    m = zsre_metrics(model, word_tok, records)
    assert m["efficacy_items"] == [0.5, 1.0] and m["generalization_items"] == [0.5, 0.0]
    assert m["specificity_items"] == [1.0, 0.5]
    assert (m["efficacy"], m["generalization"], m["specificity"]) == (0.75, 0.25, 0.75)
    assert m["utility"] == pytest.approx(7 / 12)
    assert (m["efficacy_exact"], m["generalization_exact"], m["specificity_exact"]) == (0.5, 0.0, 0.5)
    assert per_record(m, records, "zsre") == [{"efficacy": 0.5, "generalization": 0.5, "specificity": 1.0},
                                              {"efficacy": 1.0, "generalization": 0.0, "specificity": 0.5}]


# ---------------------------------------------------------------------------------------------------------------------
# the facts a build teaches
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def records(zsre_data):
    return read_zsre_records(zsre_data)


def test_zsre_facts_teach_questions_and_hold_out_paraphrases(records):
    """Each edit fact: its question trained with its answer, its paraphrase never trained; the new answer is a short
    answer other than the taught one, and the model is taught it as the answer of the same question asked of the
    neighbour's subject (the support statement); the neighbour (trained in both wordings) is another subject."""
    facts = build_zsre_facts(records, 40)
    trained = facts + unedited_facts(facts, relations={})
    texts = [statement(f, t) for f in trained for t in f.train_templates]
    subjects = [f.subject for f in facts] + [f.neighbours[0]["subject"] for f in facts]
    assert len(set(subjects)) == len(subjects) == 80  # no subject in two pairs
    for f in facts:
        (neighbour,), (support,) = f.neighbours, f.support
        assert f.relation_id == ZSRE and f.train_templates == [f.prompt.replace(f.subject, "{}")]
        assert f"{f.prompt} {f.target_true}." in texts  # the question, taught with its answer
        assert not [t for t in texts if f.paraphrase_prompts[0] in t]  # the paraphrase held out
        assert f.target_new != f.target_true and len(f.target_new.split()) <= 3
        assert support == {"subject": neighbour["subject"], "answer": f.target_new, "templates": f.train_templates}
        assert f"{f.train_templates[0].format(neighbour['subject'])} {f.target_new}." in texts
        assert f"{neighbour['prompt']} {neighbour['answer']}." in texts and len(neighbour["templates"]) == 2
    assert build_zsre_facts(records, 40) == facts  # deterministic
    assert build_zsre_facts(records, 10, skip=30) == facts[30:]  # skip: the selection's later facts
    assert build_zsre_facts(records, 40, seed=1) != facts


def test_zsre_selection(zsre_data, records):
    """The records a fact can be made of, in file order: one per subject, with an answer of at most three words, a
    non-empty `alt` and the subject in both questions. A build on the shipped data leaves out its CounterFact subjects
    (one of the 525), which leaves 524 records, 260 facts; `exclude` keeps a subject out of every pair."""
    raw = json.loads(zsre_data.read_text())

    def usable(r):
        s = r["subject"]
        return len(r["answers"][0].split()) <= 3 and r["alt"] and s in r["src"] and s in r["rephrase"]

    assert records == [r for i, r in enumerate(raw) if usable(r)
                       and not any(usable(q) and q["subject"] == r["subject"] for q in raw[:i])]
    assert len(raw) == 737 and len(records) == 525
    counterfact = {r["subject"] for r in read_counterfact_records(PACKAGE_DATA)}
    assert len([r for r in records if r["subject"] not in counterfact]) == 524
    with pytest.raises(DataError, match="only 260 usable zsRE facts"):
        build_zsre_facts(records, 300, exclude=counterfact)
    taken = build_zsre_facts(records, 5, exclude=counterfact)
    excluded = build_zsre_facts(records, 5, exclude=counterfact | {taken[0].subject})
    assert taken[0].subject not in {x for f in excluded for x in (f.subject, f.neighbours[0]["subject"])}


def test_zsre_file_required_and_checked(tmp_path):
    """zsRE facts need a zsRE file the user gives (none is shipped): none, a missing one, one that is not JSON or not
    MEND/MEMIT records each fail with what to pass."""
    for path in (None, tmp_path / "absent.json"):
        with pytest.raises(DataError, match=r"--zsre-data PATH .*MEND/MEMIT-format zsRE JSON"):
            read_zsre_records(path)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        read_zsre_records(tmp_path / "bad.json")
    (tmp_path / "cf.json").write_text(json.dumps([{"subject": "A", "src": "A?", "rephrase": "A?", "alt": "x",
                                                   "answers": ["y"]}]))
    with pytest.raises(DataError, match="record 0 lacks loc, loc_ans; pass such a file as --zsre-data"):
        read_zsre_records(tmp_path / "cf.json")


# ---------------------------------------------------------------------------------------------------------------------
# rows and requests
# ---------------------------------------------------------------------------------------------------------------------


def test_rows_make_requests_for_the_editors(records):
    """A build's zsRE rows are MEND/MEMIT records (the neighbour's question as `loc`); the known ones become EasyEdit
    requests that MoTE's request check accepts, and the comparison reads them as its records (`data: null`)."""
    facts = build_zsre_facts(records, 3)
    rows = zsre_rows(facts, [True, False, True])
    f = facts[0]
    assert rows[0] == {"subject": f.subject, "src": f.prompt, "rephrase": f.paraphrase_prompts[0], "alt": f.target_new,
                       "answers": [f.target_true], "loc": f.neighbours[0]["prompt"],
                       "loc_ans": f.neighbours[0]["answer"],
                       "support": f.train_templates[0].format(f.neighbours[0]["subject"]), "known": True}
    requests = zsre_requests(rows)
    assert [r["prompt"] for r in requests] == [rows[0]["src"], rows[2]["src"]]
    assert zsre_requests(rows, 1) == requests[:1]
    assert requests[0] == request_of(rows[0], "zsre") == {
        "prompt": f.prompt, "subject": f.subject, "target_new": f.target_new, "ground_truth": f.target_true,
        "rephrase_prompt": f.paraphrase_prompts[0], "portability": {},
        "locality": {"neighborhood": {"prompt": f.neighbours[0]["prompt"], "ground_truth": f.neighbours[0]["answer"]}}}
    assert len(normalise_requests(requests)) == 2
    cfg = CompareConfig(model="fact-model", methods={"MoTE": "m.yaml"}, dataset="zsre", n=2)
    assert load_records(cfg, rows) == [rows[0], rows[2]]
    with pytest.raises(ValueError, match="has no zsre facts"):
        load_records(cfg, [])
