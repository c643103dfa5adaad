"""Training pieces of the fact model: statements, subject spans and the train-time subject read-out mask."""

import pytest
import torch

from mote_plugin.mote.model.lookup import token_span
from mote_plugin.testbed.data import Fact
from mote_plugin.testbed.model import ARCHS, ModelSize, make_config, make_model
from mote_plugin.testbed.tokenizer import train_tokenizer
from mote_plugin.testbed.train import TrainConfig, readout_mask, statement, subject_chars, subject_readout_hooks


def test_subject_chars_locate_the_subject():
    fact = Fact(subject="Danielle Darrieux", relation_id="P103", target_true="French")
    for template in ("The mother tongue of {} is", "{} spoke the language"):
        text = statement(fact, template, prefix="Some words. ")
        a, b = subject_chars(fact, template, prefix="Some words. ")
        assert text[a:b] == fact.subject and text.endswith(" French.")
    tok = train_tokenizer([statement(fact, "The mother tongue of {} is")] * 3, 300)
    text = statement(fact, "The mother tongue of {} is")
    enc = tok(text, return_offsets_mapping=True)
    first, last = token_span(enc["offset_mapping"], *subject_chars(fact, "The mother tongue of {} is"))
    assert tok.decode(enc["input_ids"][first : last + 1]).strip() == fact.subject


@pytest.mark.parametrize("arch", ARCHS)
def test_readout_mask_hides_the_subject_from_later_tokens(arch):
    """With the mask on every layer, nothing after the subject depends on the subject's tokens."""
    torch.manual_seed(0)
    size = ModelSize(d_model=32, layers=2, heads=2, experts=4, expert_hidden=32)
    model = make_model(make_config(arch, 100, size, dict(bos_token_id=1, eos_token_id=2, pad_token_id=0))).eval()
    current = {"early": readout_mask([(2, 3), (2, 3), None], 8)}
    handles = subject_readout_hooks(model, TrainConfig(subject_readout_layer=2), current)
    ids = torch.randint(3, 100, (3, 8))
    other = ids.clone()
    other[:, 2:4] = torch.randint(3, 100, (3, 2))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # padding on the right
    a, b = model(input_ids=ids, attention_mask=mask).logits, model(input_ids=other, attention_mask=mask).logits
    assert torch.allclose(a[:2, 4:], b[:2, 4:], atol=1e-5)
    assert not torch.allclose(a[2, 4:], b[2, 4:])  # a row without a subject span is not masked
    for h in handles:
        h.remove()
    c = model(input_ids=other, attention_mask=mask).logits
    assert not torch.allclose(b[:2, 4:], c[:2, 4:])  # hooks removed: back to full attention


def test_edit_band():
    from mote_plugin.testbed.probes import edit_band

    assert edit_band([0.02, 0.17, 0.53, 0.84, 0.98, 1.0]) == [2, 3, 4]
    assert edit_band([0.53, 0.27, 0.14, 0.04, 0.01, 0.0]) == []  # a lone layer 0 is no band
    assert edit_band([0.6, 0.2, 0.7, 0.8, 0.3]) == [2, 3]
    assert edit_band([0.1, 0.2]) == []


def test_readout_mask_last_only_keeps_the_subject_last_token_visible():
    early, late = readout_mask([(2, 4), None], 7), readout_mask([(2, 4), None], 7, keep_last=True)
    assert not early[0, 0, 5:, 2:5].any() and early[0, 0, :5].all()  # queries up to the subject's end see it all
    assert not late[0, 0, 5:, 2:4].any() and late[0, 0, 5:, 4].all()  # later queries see only its last token
    assert early[1].all() and late[1].all()  # no subject span (a WikiText window): no restriction


def test_length_grouped_epochs_keep_the_sequences_and_cut_the_padding():
    """`length_grouped` reorders an epoch into batches of similar length: the same sequences, far less padding."""
    import random

    from mote_plugin.testbed.train import epoch_sequences

    templates = ["The mother tongue of {} is", "{} speaks"]
    facts = [Fact(f"Subject {i}", "P103", "French", train_templates=list(templates)) for i in range(40)]
    text = " ".join(f"word{i % 50}" for i in range(2000))
    tok = train_tokenizer([text] + [statement(f, t) for f in facts for t in f.train_templates], 300)
    text_ids = tok(text, add_special_tokens=False)["input_ids"]

    size = 8

    def epoch(grouped: bool):
        return epoch_sequences(facts, text_ids, tok, TrainConfig(batch_size=size, length_grouped=grouped),
                               random.Random(0), text)

    def padded_share(seqs):
        grid = sum(max(len(s) for s, _ in seqs[i : i + size]) * len(seqs[i : i + size])
                   for i in range(0, len(seqs), size))
        return 1 - sum(len(s) for s, _ in seqs) / grid

    plain, grouped = epoch(False), epoch(True)
    assert sorted(map(repr, plain)) == sorted(map(repr, grouped))
    print(f"padding share: random batches {padded_share(plain):.2f}, length-grouped {padded_share(grouped):.2f}")
    assert padded_share(grouped) < 0.5 * padded_share(plain)
    lengths = [len(s) for s, _ in grouped]
    assert lengths != sorted(lengths)  # the batch order is shuffled, not one ascending run
