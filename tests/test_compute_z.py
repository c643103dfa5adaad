"""v* (vstar_objective.py): MEMIT's objective term for term, a batch equal to one request at a time, per-request
stops."""

import math

import pytest
import torch

from mote_plugin.metrics import target_token_ids
from mote_plugin.mote.hparams import MoTEHyperParams
from mote_plugin.mote.model import vstar_objective
from mote_plugin.mote.model.lookup import encode_with_lookup, pad_right
from mote_plugin.mote.model.requests import normalise_requests
from mote_plugin.mote.model.vstar_objective import VStarConfig, compute_targets
from test_mote_main import REQUESTS, tiny_model, tok  # noqa: F401 (tok: the fixture)

TEMPLATES = ["{}", "The cat sat on the mat. {}", "Because it rained, {}"]


def config(**kw) -> VStarConfig:
    base = dict(v_num_grad_steps=8, v_lr=0.5, v_weight_decay=0.5, clamp_norm_factor=4.0, kl_factor=0.0625,
                lm_head_module="model.embed_tokens", max_length=64)
    return MoTEHyperParams.default_vstar_config(**(base | kw))


def memit_reference(model, tok, request: dict, layer: int, cfg: VStarConfig, templates: list[str]) -> torch.Tensor:
    """EasyEdit's MEMIT compute_z written out plainly for one request (every step a full forward with a hook adding
    delta at the lookup tokens, logits from the model's own head): z [d]."""
    target = target_token_ids(tok, request["target_new"])
    prompts = [t.format(request["prompt"]) for t in templates] + [f"{request['subject']} is a"]
    batch, lookup, _ = encode_with_lookup(tok, prompts, [request["subject"]] * len(prompts), cfg.fact_token)
    lengths = batch["attention_mask"].sum(1).tolist()
    n = len(templates)
    rows = [batch["input_ids"][i, : lengths[i]].tolist() + (target[:-1] if i < n else []) for i in range(n + 1)]
    padded = pad_right(rows, tok.pad_token_id)
    module = model.get_submodule(cfg.layer_module_tmp.format(layer))
    delta = torch.zeros(model.config.hidden_size, requires_grad=True)
    state = {}

    def hook(m, args, out):
        hidden = (out[0] if isinstance(out, tuple) else out).clone()
        if "h" not in state:
            state["h"] = hidden[0, lookup[0]].detach().clone()
        hidden[torch.arange(n + 1), lookup] += delta
        return (hidden, *out[1:]) if isinstance(out, tuple) else hidden

    opt = torch.optim.Adam([delta], lr=cfg.v_lr)
    for p in model.parameters():
        p.requires_grad_(False)
    kl_init = None
    for it in range(cfg.v_num_grad_steps):
        opt.zero_grad()
        handle = module.register_forward_hook(hook)
        logits = model(**padded, use_cache=False).logits.float()  # [n + 1, S, V]
        handle.remove()
        logp = torch.log_softmax(logits, -1)
        nll = torch.stack([-sum(logp[i, lengths[i] - 1 + j, t] for j, t in enumerate(target)) / len(target)
                           for i in range(n)]).mean()
        kl_lp = logp[n, lookup[n]]
        kl_init = kl_lp.detach() if kl_init is None else kl_init
        kl = cfg.kl_factor * torch.nn.functional.kl_div(kl_init[None], kl_lp[None], log_target=True,
                                                        reduction="batchmean")
        loss = nll + kl + cfg.v_weight_decay * delta.norm() / state["h"].norm() ** 2
        if loss < 5e-2 or it == cfg.v_num_grad_steps - 1:
            break
        loss.backward()
        opt.step()
        with torch.no_grad():
            max_norm = cfg.clamp_norm_factor * state["h"].norm()
            if delta.norm() > max_norm:
                delta.mul_(max_norm / delta.norm())
    return state["h"] + delta.detach()


def rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("arch,layer", [("qwen3_moe", 1), ("gpt_oss", 0)])
def test_memit_objective_matches_a_plain_reference(tok, arch, layer):
    model = tiny_model(tok, arch, layers=3)
    reqs = normalise_requests(REQUESTS)
    v = compute_targets(model, tok, reqs, layer, config(), TEMPLATES)
    for i, r in enumerate(reqs):
        assert rel(v.z[i], memit_reference(model, tok, r, layer, config(), TEMPLATES)) < 1e-4


def test_batch_equals_one_request_at_a_time_with_early_stops(tok, monkeypatch):
    """Requests stop at different steps (a stop threshold inside the range of their losses); each one's z and step count
    are what it gets alone, and a stopped request's delta is not moved by Adam's momentum afterwards."""
    model = tiny_model(tok, layers=3)
    reqs = normalise_requests(REQUESTS)
    cfg = config(v_num_grad_steps=12, kl_factor=0.0, v_weight_decay=0.0)
    free = compute_targets(model, tok, reqs, 1, cfg, TEMPLATES)
    # about half of them stop before the last step
    monkeypatch.setattr(vstar_objective, "STOP_LOSS", float(free.nll.median()))
    batch = compute_targets(model, tok, reqs, 1, cfg, TEMPLATES)
    alone = [compute_targets(model, tok, [r], 1, cfg, TEMPLATES) for r in reqs]
    assert len(set(batch.steps.tolist())) > 1 and int(batch.steps.min()) < cfg.v_num_grad_steps - 1
    for i, a in enumerate(alone):
        assert int(batch.steps[i]) == int(a.steps[0])
        assert rel(batch.z[i], a.z[0]) < 1e-4
        assert batch.nll[i] == pytest.approx(float(a.nll[0]), rel=1e-4)


def test_the_clamp_holds(tok):
    """After every step ||delta|| <= clamp_norm_factor * ||h||."""
    model = tiny_model(tok, layers=3)
    v = compute_targets(model, tok, normalise_requests(REQUESTS), 1, config(clamp_norm_factor=0.5), TEMPLATES)
    h = v.z - v.delta
    assert bool((v.delta.norm(dim=1) <= 0.5 * h.norm(dim=1) * (1 + 1e-5)).all())


def test_loss_layer_below_the_top_reads_that_layer(tok):
    """v_loss_layer = the edited layer: the loss reads the edited layer's own output through the final norm and head."""
    model = tiny_model(tok, layers=3)
    reqs = normalise_requests(REQUESTS[:2])
    top = compute_targets(model, tok, reqs, 1, config(), TEMPLATES)
    own = compute_targets(model, tok, reqs, 1, config(v_loss_layer=1), TEMPLATES)
    assert rel(top.z, own.z) > 1e-3 and torch.isfinite(own.nll).all()


def test_failed_flag_and_bad_names(tok):
    model = tiny_model(tok, layers=3)
    reqs = normalise_requests(REQUESTS[:2])
    v = compute_targets(model, tok, reqs, 1, config(v_num_grad_steps=2), TEMPLATES)
    assert v.failed.tolist() == [n > math.log(2) for n in v.nll.tolist()]
    with pytest.raises(ValueError, match="lm_head_module"):
        compute_targets(model, tok, reqs, 1, config(lm_head_module="model.nothing"), TEMPLATES)


@pytest.mark.parametrize("arch", ["qwen3_moe", "gpt_oss", "qwen3_5_moe"])
def test_replaying_suffixes_on_a_prefix_cache_equals_replaying_whole_rows(tok, arch):
    """The default replay (rows aligned at the lookup token, prefixes cached) gives the z of replaying whole rows."""
    model = tiny_model(tok, arch, layers=4)
    reqs = normalise_requests(REQUESTS)
    for cfg in (config(), config(kl_factor=0.0), config(v_loss_layer=2)):
        fast = compute_targets(model, tok, reqs, 1, cfg, TEMPLATES)
        whole = compute_targets(model, tok, reqs, 1, cfg, TEMPLATES, suffix=False)
        assert rel(fast.z, whole.z) < 1e-5 and torch.equal(fast.steps, whole.steps)
