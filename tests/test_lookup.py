"""The lookup token: subject_last / subject_first / last, multi-token subjects, padding, bad input."""

import pytest

from mote_plugin.mote.model.lookup import encode_with_lookup
from mote_plugin.testbed.tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(["The mother tongue of Danielle Darrieux is French.", "Paris is in France."] * 5, 300)


def test_positions(tok):
    prompts = ["The mother tongue of Danielle Darrieux is", "Paris is"]
    subjects = ["Danielle Darrieux", "Paris"]
    for fact_token in ("subject_last", "subject_first", "last"):
        batch, lookup, span = encode_with_lookup(tok, prompts, subjects, fact_token)
        for b, prompt in enumerate(prompts):
            ids = tok(prompt)["input_ids"]
            assert batch["input_ids"][b, : len(ids)].tolist() == ids  # right padding, same tokens
            assert batch["attention_mask"][b].sum() == len(ids)
            first, last = span[b].tolist()
            text = tok.decode(ids[first : last + 1]).strip()
            assert text == subjects[b]
            expected = {"subject_last": last, "subject_first": first, "last": len(ids) - 1}[fact_token]
            assert lookup[b] == expected
    assert span[0, 1] > span[0, 0], "the multi-token subject spans several tokens"


def test_subject_missing(tok):
    with pytest.raises(ValueError, match="not found"):
        encode_with_lookup(tok, ["Paris is"], ["London"], "last")


def test_unknown_fact_token(tok):
    with pytest.raises(ValueError, match="unknown fact_token"):
        encode_with_lookup(tok, ["Paris is"], ["Paris"], "subject_middle")


def test_long_prompt_is_cut_from_the_left(tok):
    prompt = "word " * 50 + "Paris is"
    batch, lookup, span = encode_with_lookup(tok, [prompt], ["Paris"], "subject_last", max_length=8)
    assert batch["input_ids"].shape[1] == 8 and batch["input_ids"][0, 0] == tok.bos_token_id
    assert tok.decode(batch["input_ids"][0, span[0, 0] : span[0, 1] + 1]).strip() == "Paris"
    with pytest.raises(ValueError, match="max_length"):
        encode_with_lookup(tok, ["Paris " + "word " * 50], ["Paris"], "last", max_length=8)
