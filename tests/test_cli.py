"""The command lines on tiny models: `mote edit` reads --hparams as Python does ('.yaml' optional), applies --set
overrides as YAML keys, checks the device before loading weights and edits in calls of batch_size; `--version`;
every `mote-testbed build` option is explained by --help."""

import json

import pytest
import yaml

from mote_plugin import __version__, inspect_edit
from mote_plugin.cli import main
from test_mote_main import REQUESTS, hparams, tiny_model, tok  # noqa: F401 (tok: the fixture)


@pytest.fixture
def setup(tok, tmp_path):
    tiny_model(tok).save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    (tmp_path / "hp.yaml").write_text(yaml.safe_dump(hparams(tmp_path, preservation_tokens=1000).to_dict()))
    (tmp_path / "requests.json").write_text(json.dumps(REQUESTS[:3]))
    return ["edit", "--hparams", str(tmp_path / "hp"), "--requests", str(tmp_path / "requests.json"),  # no '.yaml'
            "--model", str(tmp_path / "base")]


def last_error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return err.rstrip("\n").split("\n")[-1]


def test_edit_with_overrides_in_calls_of_batch_size(setup, tmp_path, capsys):
    assert main([*setup, "--out", str(tmp_path / "p.safetensors"), "--set", "batch_size=2", "--set", "layers=[1]",
                 "--set", "mote_lambda=2e-2"]) == 0
    out = capsys.readouterr().out
    assert "edited 3 request(s) in 2 call(s) of up to batch_size 2" in out
    coverage = [line for line in out.splitlines() if line.startswith("call ")]  # one line per call and solve
    assert [line.split(":")[0] for line in coverage] == ["call 1, layer 1 ranks (4, 32, 24)",
                                                         "call 2, layer 1 ranks (4, 32, 24)"]
    assert all("residual in U_out" in line and "reproduced" in line for line in coverage), coverage
    summary = inspect_edit(tmp_path / "p.safetensors")
    assert summary["calls"] == 2 and list(summary["layers"]) == [1], summary["layers"]


@pytest.mark.parametrize("argv, match", [
    (["--set", "v_decay=3"], "--set: unknown MoTE hyper-parameter(s): v_decay"),
    (["--set", "v_loss_layer=0"], "v_loss_layer must be -1 (the last layer) or a layer at or above"),
    (["--set", "mote_lambda='0'"], "mote_lambda must be a number > 0, got 0.0"),  # a quoted number is a number
])
def test_bad_overrides_end_with_one_line(setup, tmp_path, capsys, argv, match):
    assert main([*setup, "--out", str(tmp_path / "p"), *argv]) == 2
    line = last_error(capsys)
    assert line.startswith("mote edit: error: ") and match in line, line


def test_device_is_checked_before_the_weights_load(setup, tmp_path, capsys, monkeypatch):
    import torch

    from mote_plugin import loading

    if torch.cuda.is_available():
        pytest.skip("this torch can use CUDA")
    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("the weights were loaded"))
    assert main([*setup, "--out", str(tmp_path / "p"), "--set", "device=0"]) == 2
    assert "device 0 needs CUDA" in last_error(capsys)


def test_missing_hparams_names_what_was_tried(setup, tmp_path, capsys):
    assert main([*setup[:2], str(tmp_path / "nope"), *setup[3:], "--out", str(tmp_path / "p")]) == 2
    assert f"no such hparams file: {tmp_path / 'nope'} (tried {tmp_path / 'nope.yaml'})" in last_error(capsys)


def test_malformed_set_is_a_usage_error(setup, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([*setup, "--out", str(tmp_path / "p"), "--set", "layers"])
    assert exit_.value.code == 2 and "expected KEY=VALUE, got 'layers'" in capsys.readouterr().err


def test_versions(capsys):
    from mote_plugin.testbed.__main__ import main as testbed_main

    for run, prog in ((main, "mote"), (testbed_main, "mote-testbed")):
        with pytest.raises(SystemExit) as exit_:
            run(["--version"])
        assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"{prog} {__version__} (mote-plugin)"


def test_every_testbed_build_option_is_explained():
    import argparse

    from mote_plugin.testbed.__main__ import parser

    sub = next(a for a in parser()._actions if isinstance(a, argparse._SubParsersAction)).choices["build"]
    options = [a for a in sub._actions if a.option_strings and a.dest != "help"]
    assert len(options) > 25
    for action in options:
        text = (action.help or "").split(" (default")[0]
        assert len(text) >= 10, f"{action.option_strings[0]}: {action.help!r}"
