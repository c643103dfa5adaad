"""Tiny random checkpoints in the on-disk layouts of the three real models the shipped YAMLs name, built in code in
seconds (no hub):

    qwen3-30b-a3b     Qwen3MoeForCausalLM; experts stored one tensor per expert and projection
                      (`model.layers.N.mlp.experts.J.{gate,up,down}_proj.weight`), which transformers packs on load;
                      two shards and an index
    gpt-oss-20b       GptOssForCausalLM; experts stored as MXFP4 (`experts.{gate_up,down}_proj_{blocks,scales}`, FP4
                      values two to a byte with one power-of-two scale per 32), biases and everything else bf16, and
                      `quantization_config: {quant_method: mxfp4, modules_to_not_convert: [...]}` in config.json
    qwen3.6-35b-a3b   Qwen3_5MoeForConditionalGeneration (model_type qwen3_5_moe): a vision tower (`model.visual.*`),
                      the language model under `model.language_model.`, linear- and full-attention layers, a shared
                      expert, and the multi-token-prediction head `mtp.*`, which transformers' classes do not load

Each has the layer count its YAML's `layers` need, bf16 weights of the default initialisation (std 0.02), and the
tests' tokenizer. `build(name, root)` writes one and returns its directory; `shipped_hparams(name, model_dir, ...)` is
the shipped YAML with only what the tiny size (and a CPU) forces changed.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from mote_plugin.mote.hparams import MoTEHyperParams
from mote_plugin.mote.model.stats import corpus_texts
from mote_plugin.testbed.tokenizer import special_ids, train_tokenizer

HPARAMS = Path(__file__).resolve().parent.parent / "hparams" / "MoTE"
MODELS = ("qwen3-30b-a3b", "gpt-oss-20b", "qwen3.6-35b-a3b")
REQUESTS = [
    {"prompt": "The mother tongue of Danielle Darrieux is", "subject": "Danielle Darrieux", "target_new": "English"},
    {"prompt": "Toko Yasuda, the", "subject": "Toko Yasuda", "target_new": "piano"},
]

_TOKENIZER = []


def tokenizer():
    if not _TOKENIZER:
        texts = list(corpus_texts(None))[:200] + [r["prompt"] + " " + r["target_new"] for r in REQUESTS]
        _TOKENIZER.append(train_tokenizer(texts, 400))
    return _TOKENIZER[0]


def _common(tok, layers: int) -> dict:
    return dict(vocab_size=len(tok), hidden_size=64, num_hidden_layers=layers, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, max_position_embeddings=512, tie_word_embeddings=False,
                dtype="bfloat16", **special_ids(tok))


def _save_sharded(tensors: dict[str, torch.Tensor], out: Path, shards: int = 2) -> None:
    """`tensors` in `shards` safetensors files with a `model.safetensors.index.json`, as the hub's checkpoints are."""
    names = sorted(tensors)
    per = -(-len(names) // shards)
    weight_map = {}
    for i in range(shards):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n].contiguous() for n in names[i * per : (i + 1) * per]}
        save_file(part, out / file, metadata={"format": "pt"})
        weight_map |= dict.fromkeys(part, file)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": weight_map}, indent=2))


def _state(model) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in model.state_dict().items()}


def _write_config(model, out: Path, **extra) -> None:
    config = model.config.to_dict() | extra
    (out / "config.json").write_text(json.dumps(config, indent=2, default=str))


# ---------------------------------------------------------------------------------------------------------------------
# the three layouts
# ---------------------------------------------------------------------------------------------------------------------


def qwen3_30b(out: Path, tok) -> None:
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(intermediate_size=128, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
                            norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], **_common(tok, 8))
    config.architectures = ["Qwen3MoeForCausalLM"]
    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM(config).to(torch.bfloat16)
    tensors = {}
    for name, t in _state(model).items():
        prefix, _, what = name.rpartition(".experts.")
        if what == "gate_up_proj":  # [E, 2h, d] -> per expert gate [h, d] and up [h, d]
            for j, w in enumerate(t):
                gate, up = w.chunk(2, dim=0)
                tensors[f"{prefix}.experts.{j}.gate_proj.weight"] = gate
                tensors[f"{prefix}.experts.{j}.up_proj.weight"] = up
        elif what == "down_proj":  # [E, d, h] -> per expert [d, h]
            for j, w in enumerate(t):
                tensors[f"{prefix}.experts.{j}.down_proj.weight"] = w
        else:
            tensors[name] = t
    _save_sharded(tensors, out)
    _write_config(model, out)


def mxfp4_quantized(blocks_shape: tuple[int, ...], gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random MXFP4 data of a packed expert weight: blocks `[E, out, in / 32, 16]` uint8 (two FP4 codes a byte, the
    low nibble first) and scales `[E, out, in / 32]` uint8 (exponent + 127); of weights near the default init's
    size (|w| <= 6 * 2^-8)."""
    blocks = torch.randint(0, 256, blocks_shape, generator=gen, dtype=torch.uint8)
    scales = torch.randint(118, 121, blocks_shape[:-1], generator=gen, dtype=torch.uint8)
    return blocks, scales


MXFP4_NOT_CONVERTED = ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]


def gpt_oss_20b(out: Path, tok) -> None:
    from transformers import GptOssConfig, GptOssForCausalLM

    config = GptOssConfig(intermediate_size=64, num_local_experts=4, num_experts_per_tok=2, sliding_window=32,
                          **(_common(tok, 6) | {"max_position_embeddings": 131072}))  # yarn: 32 x 4096
    config.architectures = ["GptOssForCausalLM"]
    torch.manual_seed(0)
    model = GptOssForCausalLM(config).to(torch.bfloat16)
    gen = torch.Generator().manual_seed(0)
    tensors = {}
    for name, t in _state(model).items():
        prefix, _, what = name.rpartition(".experts.")
        if what in ("gate_up_proj", "down_proj"):  # [E, in, out] in the model; MXFP4 rows are its outputs
            E, n_in, n_out = t.shape
            blocks, scales = mxfp4_quantized((E, n_out, n_in // 32, 16), gen)
            tensors[f"{prefix}.experts.{what}_blocks"], tensors[f"{prefix}.experts.{what}_scales"] = blocks, scales
        else:
            tensors[name] = t
    _save_sharded(tensors, out)
    _write_config(model, out, quantization_config={"modules_to_not_convert": MXFP4_NOT_CONVERTED,
                                                   "quant_method": "mxfp4"})


def qwen3_6_35b(out: Path, tok) -> None:
    from transformers import Qwen3_5MoeConfig, Qwen3_5MoeForConditionalGeneration

    text = dict(_common(tok, 8), moe_intermediate_size=32, shared_expert_intermediate_size=32, num_experts=8,
                num_experts_per_tok=2, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
                linear_value_head_dim=16, full_attention_interval=4, mtp_num_hidden_layers=1,
                layer_types=["linear_attention"] * 3 + ["full_attention"] + ["linear_attention"] * 3
                + ["full_attention"])
    text.pop("tie_word_embeddings")
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=16,
                  spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64)
    config = Qwen3_5MoeConfig(text_config=text, vision_config=vision, tie_word_embeddings=False)
    config.architectures = ["Qwen3_5MoeForConditionalGeneration"]
    torch.manual_seed(0)
    model = Qwen3_5MoeForConditionalGeneration(config).to(torch.bfloat16)
    tensors = _state(model)
    gen = torch.Generator().manual_seed(1)
    d = 64
    mtp = {"mtp.fc.weight": (d, 2 * d), "mtp.norm.weight": (d,), "mtp.pre_fc_norm_embedding.weight": (d,),
           "mtp.pre_fc_norm_hidden.weight": (d,), "mtp.layers.0.input_layernorm.weight": (d,),
           "mtp.layers.0.self_attn.q_proj.weight": (4 * 16 * 2, d), "mtp.layers.0.mlp.gate.weight": (8, d)}
    tensors |= {n: (0.02 * torch.randn(shape, generator=gen)).to(torch.bfloat16) for n, shape in mtp.items()}
    assert any(n.startswith("model.visual.") for n in tensors)
    assert any(n.startswith("model.language_model.layers.") for n in tensors)
    _save_sharded(tensors, out)
    _write_config(model, out)
    (out / "preprocessor_config.json").write_text(json.dumps({"image_processor_type": "Qwen2VLImageProcessor"}))


BUILDERS = {"qwen3-30b-a3b": qwen3_30b, "gpt-oss-20b": gpt_oss_20b, "qwen3.6-35b-a3b": qwen3_6_35b}


def build(name: str, root: Path) -> Path:
    """The tiny `name` checkpoint (MODELS) with the tests' tokenizer, written under `root`; its directory."""
    out = Path(root) / name
    out.mkdir(parents=True)
    tok = tokenizer()
    BUILDERS[name](out, tok)
    tok.save_pretrained(out)
    return out


def checkpoint_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory, by its on-disk name."""
    out = {}
    for file in sorted(Path(model_dir).glob("*.safetensors")):
        out |= load_file(file)
    return out


# the keys of the shipped YAMLs that a tiny model or this machine force to change (the rest as shipped)
def shipped_hparams(name: str, model_dir: Path, stats_dir: Path, **changes) -> MoTEHyperParams:
    """The shipped YAML of `name` with only the size- and machine-forced keys changed: `model_name` (the tiny
    checkpoint), `device: cpu` (no CUDA here), `v_loss_layer` (its last layer), `stats_dir` (a temporary cache),
    `preservation_tokens` (the shipped excerpt holds fewer than 50000), `v_num_grad_steps` (time) and
    `v_keep_failed` (a random model's v* rarely reaches its target in those steps: the solve is what is tested)."""
    hp = MoTEHyperParams.from_hparams(str(HPARAMS / name))
    config = json.loads((Path(model_dir) / "config.json").read_text())
    n_layers = config.get("text_config", config)["num_hidden_layers"]
    forced = dict(model_name=str(model_dir), device="cpu", v_loss_layer=n_layers - 1, stats_dir=str(stats_dir),
                  preservation_tokens=3000, v_num_grad_steps=5, v_keep_failed=True)
    return hp.updated("tiny real-layout checkpoint", **(forced | changes))
