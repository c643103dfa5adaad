"""The plugin's v* against EasyEdit's own MEMIT compute_z (runs where a current `easyeditor` imports; skipped otherwise,
see docs/easyedit.md): `v_objective: memit` is the host's objective, batched."""

import contextlib
import io

import pytest

from mote_plugin.mote.model import host_compute_z
from mote_plugin.mote.model.requests import normalise_requests
from mote_plugin.mote.model.vstar_objective import compute_targets
from test_mote_main import REQUESTS, hparams, tiny_model, tok  # noqa: F401 (tok: the fixture)

TEMPLATES = ["{}", "The cat sat on the mat. {}", "Because it rained, {}"]


@pytest.mark.parametrize("arch", ["qwen3_moe", "gpt_oss"])
def test_batched_memit_vstar_equals_the_hosts_compute_z(easyedit_host, tok, tmp_path, arch):
    model = tiny_model(tok, arch, layers=3)
    hp = hparams(tmp_path, layers=[0, 1], v_num_grad_steps=10, lm_head_module="model.embed_tokens")
    reqs = normalise_requests(REQUESTS)
    tok.padding_side = "right"
    batch = compute_targets(model, tok, reqs, 1, hp.vstar_config(), TEMPLATES)
    for i, r in enumerate(reqs):
        with contextlib.redirect_stdout(io.StringIO()):  # the host prints every step
            z = host_compute_z.compute_z_fn()(model, tok, r, hp, 1, [TEMPLATES]).detach().float()
        assert float((batch.z[i] - z).norm() / z.norm()) < 1e-3
