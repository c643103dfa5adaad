"""`mote`: edit a local Hugging Face MoE model with MoTE and move the edit around as a patch (docs/patches.md).

    mote edit    --hparams H[.yaml] --requests R.json --model DIR --out PATCH [--set KEY=VALUE ...] [--save-model DIR]
                 [--device-map MAP [--offload-folder DIR]] [--dequantize]
    mote apply   --model DIR --patch PATCH --out DIR [--approximate] [--dequantize]
    mote revert  --model DIR --patch PATCH --out DIR [--approximate] [--dequantize]
    mote inspect PATCH [--json]
    mote --version

Bad input (a missing file, a patch for another model, a damaged patch, a bad hyper-parameter or device) ends with one
line on stderr and exit code 2, before any model is loaded where the input alone shows it.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import yaml

DEQUANTIZE_HELP = ("load a quantized checkpoint (GPT-OSS's MXFP4 experts) de-quantized: MoTE edits de-quantized "
                   "experts, and transformers keeps MXFP4 experts quantized where its kernels run (a GPU with triton "
                   "and `kernels`)")


class CLIError(Exception):
    """Bad input found by the CLI itself (exit code 2)."""


# ---------------------------------------------------------------------------------------------------------
# model directories
# ---------------------------------------------------------------------------------------------------------


def _model_dir(path: str) -> Path:
    p = Path(path)
    if not (p / "config.json").is_file():
        raise CLIError(f"{p}: not a model directory (no config.json)")
    return p


def _device_map(text: str | None):
    """--device-map: None, a strategy name ("auto", "balanced", ...), or a JSON object {module: device}."""
    if text is None or not text.lstrip().startswith("{"):
        return text
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise CLIError(f"--device-map: not a JSON object ({e})") from None


def _free_out(path: str, model_dir: Path) -> Path:
    out = Path(path)
    if out.resolve() == model_dir.resolve():
        raise CLIError(f"{out}: the output directory must differ from --model")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CLIError(f"{out}: exists and is not an empty directory; remove it or choose another --out")
    return out


def _save_model(model, src: Path, out: Path, patch: str) -> None:
    """The checkpoint at `src` with the parameters the patch changes rewritten (`saving.save_model`: every other file,
    tensor and config entry as in `src`), and one line saying what changed."""
    from .mote.patches.files import load_patch
    from .saving import save_model

    report = save_model(model, src, out, load_patch(patch).meta["params"])
    dequantized = (f"; de-quantized into {model.dtype} (quantized in {src}, now in quantization_config."
                   f"modules_to_not_convert): {', '.join(report['dequantized'])}" if report["dequantized"] else "")
    print(f"model written to {out}: {src} with {len(report['written'])} tensor(s) rewritten{dequantized}; every "
          "other file and tensor as in the source")


# ---------------------------------------------------------------------------------------------------------
# verbs
# ---------------------------------------------------------------------------------------------------------


def _read_requests(path: str) -> list[dict]:
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise CLIError(f"{path}: no such requests file") from None
    except json.JSONDecodeError as e:
        raise CLIError(f"{path}: not JSON ({e})") from None
    data = [data] if isinstance(data, dict) else data
    if not isinstance(data, list) or not data:
        raise CLIError(f"{path}: expected a JSON list of requests (prompt, subject, target_new)")
    return data


def key_value(text: str) -> tuple[str, object]:
    """"layers=[1,2,3]" -> ("layers", [1, 2, 3]): a `--set KEY=VALUE` argument, the value read as YAML."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key.strip(), yaml.safe_load(value)
    except yaml.YAMLError as e:
        raise argparse.ArgumentTypeError(f"{key.strip()}: the value is not YAML ({' '.join(str(e).split())})") from None


def edit_hparams(path: str, overrides: list[tuple[str, object]]):
    """The hyper-parameters `mote edit` uses: the YAML (".yaml" optional) with `--set` overrides applied, read and
    checked as the YAML's own keys are."""
    from .mote.hparams import MoTEHyperParams

    hp = MoTEHyperParams.from_hparams(path)
    return hp.updated("--set", **dict(overrides)) if overrides else hp


def cmd_edit(args) -> None:
    from .loading import load_model, load_tokenizer
    from .mote.mote_main import apply_mote_to_model, last_coverage
    from .mote.patches.files import save_edit

    hp = edit_hparams(args.hparams, args.set)
    requests = _read_requests(args.requests)
    src = _model_dir(args.model)
    save_to = _free_out(args.save_model, src) if args.save_model else None
    device_map = _device_map(args.device_map)
    if device_map is not None and save_to is not None:
        raise CLIError("--save-model needs the whole model in memory; with --device-map keep the patch and "
                       "`mote apply` it where the model fits")
    # a device this torch cannot use: before the weights load (with --device-map too: the edit reads `device`)
    try:
        device = hp.torch_device()
    except ValueError as e:
        raise CLIError(f"{e} (on the command line: --set device=cpu)") from None
    device = None if device_map is not None else device
    model = load_model(src, hp.torch_dtype() if hp.dtype else None, device_map, args.offload_folder,
                       local_files_only=True, dequantize=hp.dequantize or args.dequantize)
    if device is not None:
        model = model.to(device)
    tok = load_tokenizer(src, local_files_only=True)
    # batch_size requests per call, one call after another (EasyEdit's batch_edit with sequential_edit=True)
    for start in range(0, len(requests), hp.batch_size):
        model, _ = apply_mote_to_model(model, tok, requests[start : start + hp.batch_size], hp)
        for c in last_coverage(model):
            print(format_coverage(start // hp.batch_size + 1, c))
    path = save_edit(model, args.out)
    calls = -(-len(requests) // hp.batch_size)
    print(f"edited {len(requests)} request(s) in {calls} call(s) of up to batch_size {hp.batch_size}; patch written to "
          f"{path}")
    if save_to is not None:
        _save_model(model, src, save_to, path)


def format_coverage(call: int, c: dict) -> str:
    """One line of `mote edit`'s output per solve: what the basis held and what the update reproduced (mean, min)."""
    shares = [f"{name} {c[key]['mean']:.2f} (min {c[key]['min']:.2f})" for name, key in
              (("keys past the null space", "keys_kept"), ("residual in U_out", "residual_in_U_out"),
               ("keys in U_in", "keys_in_U_in"), ("gates in U_e", "gates_in_U_e"), ("reproduced", "reproduced"))
              if c[key] is not None]
    if c["empty_nullspace"]:
        shares.append(f"experts with an empty null space {len(c['empty_nullspace'])}")
    ranks = f" ranks {tuple(c['ranks'])}" if c["ranks"] else ""
    return f"call {call}, layer {c['layer']}{ranks}: " + ", ".join(shares)


def _cmd_patch(args, forward: bool) -> None:
    from .loading import load_model
    from .mote.patches.files import apply_edit, load_patch, revert_edit

    src = _model_dir(args.model)
    out = _free_out(args.out, src)
    load_patch(args.patch)  # a missing or damaged patch is reported before the model is loaded
    model = load_model(src, local_files_only=True, dequantize=args.dequantize)
    result = (apply_edit if forward else revert_edit)(model, args.patch, exact=not args.approximate)
    how = "bit-exactly" if result["exact"] else "within the rounding tolerance (not bit-exact)"
    print(f"{'applied' if forward else 'reverted'} {args.patch} {how}")
    _save_model(model, src, out, args.patch)


def cmd_apply(args) -> None:
    _cmd_patch(args, forward=True)


def cmd_revert(args) -> None:
    _cmd_patch(args, forward=False)


def _kib(n: int) -> str:
    return f"{n / 1024:.1f} KiB"


def format_summary(s: dict) -> str:
    m, b = s["model"], s["bytes"]
    lines = [f"MoTE edit patch {s['path']} (format {s['format_version']}, {_kib(b['file'])})",
             f"model: {m['class']} ({m['model_type']}) {m.get('name_or_path') or ''}".rstrip(),
             f"base fingerprint:   {s['base_fingerprint']}", f"edited fingerprint: {s['edited_fingerprint']}",
             f"{s['calls']} call(s), {len(s['requests'])} request(s):"]
    lines += [f"  {r.get('prompt')!r} -> {r.get('target_new')!r}" for r in s["requests"]]
    for layer, info in s["layers"].items():
        shape, experts = info["shape"], info["experts_touched"]
        ranks = "+".join(str(r) for r in info["ranks"])
        lines.append(f"layer {layer}: {info['param']} {info['dtype']} {shape}, {info['writes']} write(s) of rank "
                     f"{ranks}, experts touched {len(experts)} of {shape[0]}")
    lines.append(f"bytes: factors {_kib(b['factors'])}, fix-ups {_kib(b['fixups'])}, samples {_kib(b['samples'])}; "
                 f"dense delta of the changed parameters {_kib(b['dense_delta'])}")
    return "\n".join(lines)


def cmd_inspect(args) -> None:
    from .mote.patches.files import inspect_edit

    summary = inspect_edit(args.patch)
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary))


# ---------------------------------------------------------------------------------------------------------
# entry point
# ---------------------------------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    from ._version import __version__

    p = argparse.ArgumentParser(prog="mote", description="MoTE knowledge editing for MoE models, and edit patches.")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__} (mote-plugin)")
    verbs = p.add_subparsers(dest="verb", required=True)
    e = verbs.add_parser("edit", help="edit a local model and save the edit as a patch")
    e.add_argument("--hparams", required=True, help="MoTE hyper-parameters (YAML; '.yaml' may be left out)")
    e.add_argument("--set", type=key_value, action="append", default=[], metavar="KEY=VALUE",
                   help="override a hyper-parameter of the YAML, the value read as YAML (e.g. --set layers=[1,2] "
                        "--set batch_size=50); repeatable. Requests are edited in calls of batch_size, one after "
                        "another")
    e.add_argument("--requests", required=True, help="JSON list of {prompt, subject, target_new}")
    e.add_argument("--model", required=True, help="local Hugging Face model directory")
    e.add_argument("--out", required=True, help="patch file to write (.safetensors)")
    e.add_argument("--save-model", help="also write the edited model to this directory")
    e.add_argument("--device-map", help="load with accelerate's device_map: auto, balanced, ... or a JSON object "
                   "{module: device}, \"disk\" and \"cpu\" for offload (docs/large-models.md)")
    e.add_argument("--offload-folder", help="where accelerate puts disk-offloaded weights (with --device-map)")
    e.add_argument("--dequantize", action="store_true", help=DEQUANTIZE_HELP + " (or `dequantize: true` in the YAML)")
    e.set_defaults(run=cmd_edit)
    for verb, run, what in (("apply", cmd_apply, "apply a patch to its base model"),
                            ("revert", cmd_revert, "undo a patch on its edited model")):
        a = verbs.add_parser(verb, help=what)
        a.add_argument("--model", required=True, help="local Hugging Face model directory")
        a.add_argument("--patch", required=True, help="patch file written by `mote edit` / save_edit")
        a.add_argument("--out", required=True, help="directory to write the resulting model to (new or empty)")
        a.add_argument("--approximate", action="store_true",
                       help="accept the model in another dtype (within rounding, not bit-exact)")
        a.add_argument("--dequantize", action="store_true", help=DEQUANTIZE_HELP + " (as `mote edit` loaded it)")
        a.set_defaults(run=run)
    i = verbs.add_parser("inspect", help="summarise a patch")
    i.add_argument("patch")
    i.add_argument("--json", action="store_true", help="print the summary as JSON")
    i.set_defaults(run=cmd_inspect)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        args.run(args)
    except (CLIError, ValueError, OSError) as e:  # FileNotFoundError is an OSError
        message = " ".join(str(e).split())
        print(f"mote {args.verb}: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
