"""The fact model builder: determinism, cache reuse and repair, save/load round trip, all three
architectures, the CLI, and (reduced size) the knowledge gates."""

import hashlib
import json
from dataclasses import replace

import pytest
import torch

from mote_plugin.testbed import ARCHS, BuildOptions, ModelSize, TrainConfig, build, load, load_zsre
from mote_plugin.testbed.__main__ import main
from mote_plugin.testbed.data import DataError, facts_from_json
from mote_plugin.testbed.model import make_config
from mote_plugin.testbed.probes import knowledge_report

TINY = BuildOptions(
    facts=24, vocab_size=600, corpus_chars=20_000, probe_facts=2,
    size=ModelSize(d_model=32, layers=2, heads=2, experts=4, top_k=2, expert_hidden=32, max_positions=128),
    train=TrainConfig(epochs=2, batch_size=32, warmup_steps=2),
)


def weights_hash(model) -> str:
    """sha256 of every weight's bytes, by name."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def tiny_builds(tmp_path_factory):
    out = {}
    for arch in ARCHS:
        path = tmp_path_factory.mktemp(arch)
        out[arch] = (path, replace(TINY, arch=arch), build(path, replace(TINY, arch=arch), log=lambda m: None))
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_architectures_round_trip(tiny_builds, tmp_path, arch):
    path, opts, report = tiny_builds[arch]
    model, tok, facts, saved_report = load(path)
    assert saved_report == json.loads(json.dumps(report))
    fields = {"prompt", "subject", "target_new", "ground_truth", "rephrase_prompt", "locality_prompt", "known"}
    assert fields <= facts[0].keys()
    ids = tok([f["prompt"] for f in facts[:4]], return_tensors="pt", padding=True)
    logits = model(**ids).logits
    model.save_pretrained(tmp_path / "again")
    again = type(model).from_pretrained(tmp_path / "again").eval()
    assert torch.equal(again(**ids).logits, logits)
    # the cached model is the trained one: its knowledge table is reproduced from the saved weights
    rows = [{k: v for k, v in f.items() if k not in ("known", "ground_truth", "rephrase_prompt", "locality_prompt",
                                                     "locality_ground_truth")} for f in facts]
    rewrite = knowledge_report(model, tok, facts_from_json(rows))["rewrite"]
    assert rewrite == pytest.approx(report["knowledge"]["rewrite"])


def test_family_specifics(tiny_builds):
    gpt, _, _ = load(tiny_builds["gpt_oss"][0])[:3]
    experts = gpt.model.layers[0].mlp.experts
    assert experts.down_proj.shape == (4, 32, 32) and experts.down_proj_bias is not None  # [E, h, d] + bias
    qwen35 = load(tiny_builds["qwen3_5_moe"][0])[0]
    assert qwen35.model.layers[0].mlp.shared_expert is not None
    qwen3 = load(tiny_builds["qwen3_moe"][0])[0]
    assert qwen3.config.norm_topk_prob is True


def test_deterministic_and_cached(tiny_builds, tmp_path):
    path, opts, _ = tiny_builds["qwen3_moe"]
    logs = []
    build(path, opts, log=logs.append)
    assert logs == [f"cache reused: {path}"]
    build(tmp_path / "second", opts, log=lambda m: None)
    assert weights_hash(load(path)[0]) == weights_hash(load(tmp_path / "second")[0])
    build(tmp_path / "other-seed", replace(opts, seed=1), log=lambda m: None)
    assert weights_hash(load(path)[0]) != weights_hash(load(tmp_path / "other-seed")[0])


def test_corrupt_cache_is_rebuilt(tiny_builds, tmp_path):
    path, opts, _ = tiny_builds["qwen3_moe"]
    build(tmp_path / "c", opts, log=lambda m: None)
    weights = tmp_path / "c" / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    logs = []
    build(tmp_path / "c", opts, log=logs.append)
    assert any("corrupt" in m for m in logs), logs
    assert weights_hash(load(tmp_path / "c")[0]) == weights_hash(load(path)[0])
    (tmp_path / "c" / "manifest.json").write_text("{not json")
    logs = []
    build(tmp_path / "c", opts, log=logs.append)
    assert any("unreadable" in m for m in logs), logs


def test_other_options_rebuild(tiny_builds, tmp_path):
    path, opts, _ = tiny_builds["qwen3_moe"]
    logs = []
    build(path, replace(opts, train=replace(opts.train, epochs=3)), log=logs.append)
    assert any("other options" in m for m in logs)


def test_options_added_later_keep_older_caches_valid():
    """An option added after the first release leaves the fingerprint (so the caches built before it) unchanged at
    the value builds had before it, and changes it at any other value: top-level and nested (train.*) alike."""
    base = BuildOptions().fingerprint()
    assert "profile_facts" not in base and "length_grouped" not in base["train"]
    assert BuildOptions(subject_tokens=False).fingerprint()["subject_tokens"] is False
    assert BuildOptions(train=TrainConfig(length_grouped=True)).fingerprint()["train"]["length_grouped"] is True


def test_zsre_facts_build(tiny_builds, zsre_data, tmp_path, monkeypatch):
    """`zsre_facts`: the build teaches zsRE questions too (read from `zsre_data`, the user's file), writes them as
    MEND/MEMIT rows marked `known` (zsre.json, under the manifest's hashes) and reports what the model knows of them
    and, on the known ones, the unedited model's zsRE metrics. The option and the zsRE file's content are part of the
    cache key only for a build that uses them."""
    from mote_plugin.testbed import probes
    from mote_plugin.testbed.data import ZSRE

    real = probes.known_facts  # the tiny model knows nothing: let it "know" its zsRE facts, to reach the metrics
    monkeypatch.setattr(probes, "known_facts", lambda model, tok, facts: [True] * sum(f.is_edit_fact for f in facts)
                        if facts[0].relation_id == ZSRE else real(model, tok, facts))
    opts = replace(TINY, facts=8, zsre_facts=6, zsre_data=str(zsre_data))
    z = build(tmp_path / "z", opts, log=lambda m: None)["zsre"]
    rows = load_zsre(tmp_path / "z")
    assert len(rows) == 6 and all(r["known"] for r in rows)
    assert {"src", "rephrase", "alt", "answers", "loc", "loc_ans"} <= rows[0].keys()
    assert "zsre.json" in json.loads((tmp_path / "z" / "manifest.json").read_text())["files"]
    assert z["n_facts"] == 6 and z["n_unedited_facts"] == 12 and z["known_share"] == 1.0
    assert set(z["knowledge"]) == {"rewrite", "heldout_template", "paraphrase", "neighbourhood", "support"}
    assert set(z["unedited"]) >= {"efficacy", "generalization", "specificity", "utility", "efficacy_exact"}
    without = replace(opts, zsre_facts=0).fingerprint()
    assert opts.fingerprint()["zsre_facts"] == 6 and {"zsre_facts", "zsre_data"}.isdisjoint(without)
    assert opts.fingerprint()["zsre_data"] == hashlib.sha256(zsre_data.read_bytes()).hexdigest()[:16]
    assert without == replace(TINY, facts=8).fingerprint()
    assert load_zsre(tiny_builds["qwen3_moe"][0]) == []


def test_zsre_data_option(tmp_path, capsys):
    """zsre_data (--zsre-data) is required with zsre_facts: without it a build fails before any work, naming the option
    and the format; it is in the cache key (by content, not path) only with zsre_facts, so every other cache stays
    valid."""
    logs = []
    with pytest.raises(DataError, match=r"--zsre-data PATH \(BuildOptions.zsre_data\): a MEND/MEMIT-format zsRE JSON"):
        build(tmp_path / "z", replace(TINY, zsre_facts=2), log=logs.append)
    assert logs == [] and not (tmp_path / "z").exists()
    assert main(["build", "--zsre-facts", "2", "--out", str(tmp_path / "z")]) == 2
    assert "--zsre-data PATH" in capsys.readouterr().err and not (tmp_path / "z").exists()
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text("[]")
    b.write_text("[]")
    assert BuildOptions(zsre_data=str(a)).fingerprint() == BuildOptions().fingerprint()
    assert BuildOptions(zsre_facts=2, zsre_data=str(a)).fingerprint() == BuildOptions(zsre_facts=2,
                                                                                      zsre_data=str(b)).fingerprint()


def test_unknown_architecture(capsys):
    with pytest.raises(SystemExit):
        main(["build", "--arch", "llama"])
    assert "invalid choice" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown architecture"):
        make_config("llama", 100, ModelSize(), {})


def test_cli_bad_data(tmp_path, capsys):
    assert main(["build", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error:") and "does not exist" in err and "--data" in err


def test_cli_prints_knowledge_table(tiny_builds, capsys):
    path, opts, _ = tiny_builds["gpt_oss"]
    s = opts.size
    argv = ["build", "--arch", "gpt_oss", "--out", str(path), "--facts", "24", "--vocab-size", "600", "--corpus-chars",
            "20000",
            "--probe-facts", "2", "--d-model", str(s.d_model), "--layers", "2", "--heads", "2", "--experts", "4",
            "--expert-hidden", "32", "--max-positions", "128", "--epochs", "2", "--batch-size", "32", "--warmup-steps",
            "2"]
    assert main(argv) == 0
    out = capsys.readouterr()
    assert "cache reused" in out.err
    assert "| rewrite |" in out.out and "majority baseline" in out.out


@pytest.mark.slow
def test_reduced_fact_model_knows_its_facts(reduced_fact_model):
    """The demo's build (56 facts) knows what the editing gates need, on any build of its recipe (conftest.py): at
    least the 50 facts the 50-edit gate rewrites (known: the true object is the top-1 answer and preferred to the new
    one), its held-out phrasings well above the majority answer (knowledge of the subject, not of one sentence), most
    of the neighbours on which specificity is scored, and an edit band: layers where restoring the lookup token
    recovers at least half of the fact. Measured on training seeds 0 / 1 / 2: known 53 / 55 / 55 of 56, held-out
    top-1 0.91 / 0.88 / 0.93 (majority 0.54), neighbourhood 0.98 / 0.92 / 0.94, lookup token subject_last / last /
    subject_last with bands of 3 / 2 / 3 layers. Worst margins: 3 facts known, held-out 0.14, neighbourhood 0.12."""
    _, report = reduced_fact_model("qwen3_moe")
    k = report["knowledge"]
    print({name: {m: round(k[name][m], 3) for m in ("top1", "majority", "p_true_gt_new") if m in k[name]}
           for name in ("rewrite", "heldout_template", "neighbourhood")}, report["lookup_token"], report["edit_layers"],
          {t: round(e["flipped"], 2) for t, e in report["editability"].items()})
    assert round(report["known_share"] * report["n_facts"]) >= 50
    assert k["heldout_template"]["top1"] > k["heldout_template"]["majority"] + 0.2
    assert k["neighbourhood"]["top1"] >= 0.8
    token = report["lookup_token"]
    assert token in ("subject_last", "last")
    band = report["edit_layers"]
    assert band and all(report["tracing"][token][l] >= 0.5 for l in band)
    assert report["editability"][token]["flipped"] >= 0.9


def test_subject_names_are_split_into_shared_pieces(tiny_builds, tmp_path):
    """With `subject_tokens=False` the tokenizer never sees the subjects' names, so a name is made of pieces other
    words use too (as real LLM tokenizers split most CounterFact subjects); the default gives names tokens of their
    own; the two caches are kept apart."""
    from mote_plugin.testbed.build import tokenizer_texts
    from mote_plugin.testbed.data import Fact

    facts = [Fact("Danielle Darrieux", "P103", "French", prompt="The mother tongue of Danielle Darrieux is",
                  target_new="English",
                  heldout_prompts=["Danielle Darrieux spoke"], train_templates=["{} is a native speaker of"]),
             Fact("Darrieux", "P103", "French", train_templates=["The mother tongue of {} is"])]
    texts = tokenizer_texts("Some text about Darrieux.", facts[:1], facts, subject_tokens=False)
    assert not [t for t in texts if "Darrieux" in t]
    assert " is a native speaker of French." in texts and " English" in texts
    assert any("Danielle Darrieux" in t for t in tokenizer_texts("", facts[:1], facts, subject_tokens=True))

    path, opts, _ = tiny_builds["qwen3_moe"]
    assert opts.subject_tokens is True
    build(tmp_path / "shared", replace(opts, subject_tokens=False), log=lambda m: None)
    _, own_tok, facts, _ = load(path)
    shared_tok = load(tmp_path / "shared")[1]
    subjects = sorted({f["subject"] for f in facts})
    pieces = [sum(len(tok(" " + s, add_special_tokens=False)["input_ids"]) for s in subjects)
              for tok in (shared_tok, own_tok)]
    assert pieces[0] > 1.1 * pieces[1], pieces  # measured at this tiny size (600 tokens): 213 vs 184
    assert opts.fingerprint() != replace(opts, subject_tokens=False).fingerprint()
