"""The `easyedit` extra installs everything `import easyeditor` imports (docs/easyedit.md, "Getting a host"): with an
EasyEdit checkout importable, EasyEdit is imported in a fresh interpreter and every distribution behind the modules it
loaded must be one the extra (with the plugin's own dependencies) brings in. Skipped without a host."""

import importlib.metadata
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mote_plugin.host_stubs import STUBBED

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parent.parent

IMPORTED = """
import json, sys
from mote_plugin.host_stubs import install
install()
before = set(sys.modules)
import easyeditor
print(json.dumps(sorted({name.split(".")[0] for name in set(sys.modules) - before})))
"""


def _name(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[(]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def _markers_hold(requirement: str) -> bool:
    """Whether a requirement's environment marker holds here with no extra asked for."""
    from packaging.requirements import Requirement

    marker = Requirement(requirement).marker
    return marker is None or marker.evaluate({"extra": ""})


def installed_by(requirements: list[str]) -> set[str]:
    """The distributions `requirements` bring in here, with their dependencies (normalised names)."""
    todo, seen = [_name(r) for r in requirements], set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            todo += [_name(r) for r in importlib.metadata.requires(name) or [] if _markers_hold(r)]
        except importlib.metadata.PackageNotFoundError:
            pass
    return seen


def test_the_extra_names_what_easyedit_imports_unconditionally():
    """pandas (its BLIP-2 trainer), datasets (layer statistics) and matplotlib (ROME's compute_v) are imported at
    `import easyeditor` and are not dependencies of anything else in the extra."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert {"pandas", "datasets", "matplotlib"} <= {_name(r) for r in project["optional-dependencies"]["easyedit"]}


@pytest.mark.skipif(importlib.util.find_spec("easyeditor") is None, reason="no EasyEdit checkout on PYTHONPATH")
def test_easyedit_imports_only_what_the_extra_installs():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = installed_by(project["dependencies"] + project["optional-dependencies"]["easyedit"])
    run = subprocess.run([sys.executable, "-c", IMPORTED], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    modules = json.loads(run.stdout.strip().splitlines()[-1])
    by_module = importlib.metadata.packages_distributions()
    skip = set(sys.stdlib_module_names) | set(STUBBED) | {"easyeditor", "mote_plugin", "__main__"}
    missing = {}
    for module in modules:
        if module in skip or module.startswith("_"):
            continue
        dists = {_name(d) for d in by_module.get(module, [])}
        if dists and not dists & wanted:
            missing[module] = sorted(dists)
    assert not missing, f"import easyeditor loads modules of distributions the easyedit extra lacks: {missing}"
