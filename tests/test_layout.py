"""The editor's layers import downward only (mote_plugin/mote/__init__.py): pure algebra, model-facing steps,
hyper-parameters and the edit record, the editor, then the EasyEdit contract and patch files; nothing in the core
imports the metrics, the experiments, the EasyEdit glue or the package root; importing the package registers nothing."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "mote_plugin"

# each module may import modules of a lower layer, or of its own package
LAYERS = {
    "mote_plugin._version": 0,
    "mote_plugin._hooks": 0,
    "mote_plugin.adapters": 1,
    "mote_plugin.mote.algebra": 0,
    "mote_plugin.mote.model": 1,
    "mote_plugin.mote.hparams": 2,
    "mote_plugin.mote.patches.history": 2,
    "mote_plugin.mote.editor": 3,
    "mote_plugin.mote.mote_main": 4,
    "mote_plugin.mote.patches.files": 4,
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path) -> set[str]:
    """The mote_plugin modules `path` imports (relative imports resolved; `from pkg import mod` names the module)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("mote_plugin")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if not base.startswith("mote_plugin"):
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                as_module = PACKAGE.parent / Path(*sub.split("."))
                out.add(sub if as_module.with_suffix(".py").exists() or as_module.is_dir() else base)
    return out


def layer(module: str) -> int | None:
    matches = [prefix for prefix in LAYERS if module == prefix or module.startswith(prefix + ".")]
    return LAYERS[max(matches, key=len)] if matches else None


CORE = sorted(p for p in (PACKAGE / "mote").rglob("*.py")) + sorted((PACKAGE / "adapters").rglob("*.py"))


@pytest.mark.parametrize("path", CORE, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_core_imports_downward_only(path):
    name = module_name(path)
    own = layer(name)
    targets = imported(path)
    assert own is not None or not targets, f"{name} has no layer in LAYERS"
    for target in targets:
        assert target != "mote_plugin", f"{name} imports the package root"
        theirs = layer(target)
        assert theirs is not None, f"{name} imports {target}, outside the core"
        same_package = target.rsplit(".", 1)[0] == name.rsplit(".", 1)[0] or target.startswith(name + ".")
        assert theirs < own or (theirs == own and same_package), f"{name} imports {target} (upward)"


def test_algebra_is_pure_tensor_code():
    for path in (PACKAGE / "mote" / "algebra").rglob("*.py"):
        others = {t for t in imported(path) if not t.startswith("mote_plugin.mote.algebra")}
        assert not others, f"{path.name} imports {others}"


def test_importing_the_package_registers_nothing():
    """`import mote_plugin` and the editor import no host and register nothing, even after `import easyeditor`."""
    fake = ROOT / "tests" / "fake_hosts" / "current"
    code = (f"import sys; sys.path.insert(0, {str(fake)!r}); import easyeditor, mote_plugin; "
            "from mote_plugin import MoTEEditor, MoTEHyperParams, apply_mote_to_model, save_edit; "
            "from easyeditor.util.alg_dict import ALG_DICT; assert 'MoTE' not in ALG_DICT, ALG_DICT; print('ok')")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-2000:]
