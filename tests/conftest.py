import importlib
import importlib.util
from pathlib import Path

import pytest
import torch
import transformers

from mote_plugin import host_stubs

# With an EasyEdit checkout on PYTHONPATH, stand in for the vision packages it imports but cannot load here, before
# anything imports mote_plugin.mote.hparams (whose base class is the host's HyperParams when the host imports).
if importlib.util.find_spec("easyeditor") is not None:
    host_stubs.install()

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The project's test data (../shared/data); tests that need it are skipped where it is absent."""
    if not (SHARED_DATA / "counterfact").is_dir():
        pytest.skip(f"{SHARED_DATA} not present (the project's shared test data)")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _torch_threads():
    torch.set_num_threads(2)


# Reduced fact models shared by the knowledge and editing tests: built once into .cache/, where the builder's manifest
# makes a later run reuse them only when nothing changed. qwen3_moe is the build the 50-edit gate is measured on:
# names split into shared pieces (subject_tokens=False) and three fictional profile facts per subject, so that
# neighbourhood subjects are kept apart (README "On smaller builds"); 1620 length-grouped steps, about 8 min on
# 2 cores. gpt_oss and qwen3_5_moe: 24 facts, about 1.5 min each.
REDUCED_BUILDS = {
    "qwen3_moe": dict(facts=56, subject_tokens=False, profile_facts=3, train=dict(epochs=60, length_grouped=True)),
    "gpt_oss": dict(facts=24, train=dict(epochs=60)),
    "qwen3_5_moe": dict(facts=24, train=dict(epochs=60)),
}


@pytest.fixture(scope="session")
def reduced_fact_model(shared_data):
    from mote_plugin.testbed import BuildOptions, TrainConfig, build

    built = {}

    def get(arch: str):
        if arch not in built:
            spec = dict(REDUCED_BUILDS[arch])
            train = TrainConfig(**spec.pop("train"))
            opts = BuildOptions(arch=arch, data=str(shared_data), probe_facts=10, train=train, **spec)
            # one directory per transformers version (a build is only valid under the version it was trained with)
            out = ROOT / ".cache" / "test-fact-models" / f"{arch}-{opts.facts}-transformers{transformers.__version__}"
            built[arch] = (out, build(out, opts, log=lambda m: None))
        return built[arch]

    return get


@pytest.fixture(scope="session")
def easyedit_host():
    """The current EasyEdit (`easyeditor` package) with MoTE registered; skipped when none is importable."""
    if importlib.util.find_spec("easyeditor") is None:
        pytest.skip("no easyeditor importable: put an EasyEdit checkout on PYTHONPATH to run the host tests")
    import mote_plugin

    try:
        status = mote_plugin.register(strict=True)
    except Exception as e:
        pytest.skip(f"easyeditor is not usable as a host: {type(e).__name__}: {e}")
    assert status
    return importlib.import_module("easyeditor")
