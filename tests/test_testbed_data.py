"""CounterFact loading for the fact model: both formats, relations, held-out phrasings, bad input."""

import json

import pytest

from mote_plugin.testbed.data import (
    PACKAGE_DATA,
    DataError,
    build_facts,
    load_relations,
    profile_facts,
    read_corpus,
    read_counterfact_records,
    relation_objects,
    split_subject,
    template_index,
    unedited_facts,
)


def test_shipped_data_is_a_data_directory():
    facts = build_facts(PACKAGE_DATA, 240)
    assert len(facts) == 240
    assert len(read_corpus(PACKAGE_DATA)) > 100_000
    assert (PACKAGE_DATA / "NOTICE.md").exists()


@pytest.mark.parametrize("fmt", ["counterfact-train.json", "counterfact-rome-format.json"])
def test_both_counterfact_formats(shared_data, tmp_path, fmt):
    (tmp_path / "counterfact").mkdir()
    (tmp_path / "counterfact" / fmt).write_bytes((shared_data / "counterfact" / fmt).read_bytes())
    facts = build_facts(tmp_path, 50)
    relations = load_relations()
    for f in facts:
        assert f.subject in f.prompt
        assert f.prompt.replace(f.subject, "{}", 1) in relations[f.relation_id]
        assert f.target_true != f.target_new
        # the held-out phrasing is a template of the relation that the fact is never trained under
        held = f.heldout_prompts[0].replace(f.subject, "{}", 1)
        assert held in relations[f.relation_id] and held not in f.train_templates
        assert f.prompt.replace(f.subject, "{}", 1) in f.train_templates
    subjects = [f.subject for f in facts] + [n.subject for n in unedited_facts(facts, relations)]
    assert len(subjects) == len(set(subjects)), "a subject appears in two facts"
    assert sum(bool(f.neighbours) for f in facts) > 40


def test_rome_format_records_keep_paraphrases_and_neighbours(shared_data):
    records = read_counterfact_records(shared_data)
    rome = [r for r in records if r["relation_id"]]
    assert rome and all(len(r["paraphrases"]) == 2 and len(r["neighbour_prompts"]) == 10 for r in rome)


def test_split_subject():
    templates = ["The mother tongue of {} is", "{} is"]
    assert split_subject("The mother tongue of Danielle Darrieux is", templates) == "Danielle Darrieux"
    assert split_subject("nothing matches", ["The capital of {} is"]) is None


def test_ambiguous_templates_are_not_indexed():
    idx = template_index({"P1": ["{} is in", "{} a"], "P2": ["{} is in", "{} b"]})
    assert idx == {"{} a": "P1", "{} b": "P2"}


def test_missing_data_directory(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        build_facts(tmp_path / "nope", 10)


def test_directory_without_counterfact(tmp_path):
    with pytest.raises(DataError, match="no CounterFact files"):
        build_facts(tmp_path, 10)


def test_too_few_records(tmp_path, shared_data):
    (tmp_path / "counterfact").mkdir()
    rows = json.loads((shared_data / "counterfact" / "counterfact-train.json").read_text())[:30]
    (tmp_path / "counterfact" / "small.json").write_text(json.dumps(rows))
    with pytest.raises(DataError, match="--facts 100"):
        build_facts(tmp_path, 100)


def test_corrupt_json(tmp_path):
    (tmp_path / "counterfact").mkdir()
    (tmp_path / "counterfact" / "bad.json").write_text("[{")
    with pytest.raises(DataError, match="not valid JSON"):
        build_facts(tmp_path, 1)


def test_missing_corpus(tmp_path):
    with pytest.raises(DataError, match="corpus"):
        read_corpus(tmp_path)


def test_profile_facts(shared_data):
    relations = load_relations()
    facts = build_facts(shared_data, 10, relations)
    pools = relation_objects(shared_data, relations)
    profiles = profile_facts(facts, pools, relations, 3)
    assert profiles == profile_facts(facts, pools, relations, 3), "deterministic"
    assert profile_facts(facts, pools, relations, 0) == []
    for fact in facts:
        mine = [p for p in profiles if p.subject == fact.subject]
        assert len(mine) == 3 and len({p.relation_id for p in mine}) == 3
        assert all(p.relation_id != fact.relation_id and p.target_true in pools[p.relation_id] for p in mine)
        assert all(p.train_templates == relations[p.relation_id] and not p.is_edit_fact for p in mine)
