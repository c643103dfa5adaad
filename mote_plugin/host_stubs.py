"""Stand-ins for the vision packages EasyEdit imports at `import easyeditor` (its multimodal trainer pulls in
torchvision, timm, OpenCV, decord and av), for a CPU set-up where they cannot load: torchvision has no build for
torch 2.13.0, the torch this project pins. Text editing never calls them. A package is stubbed only when the real one
does not import, and a stub raises on any use, so nothing silently runs on a stub. Nothing is stubbed unless asked:

    from mote_plugin.host_stubs import install; install()        # before `import easyeditor`
    python -m mote_plugin.host_stubs SCRIPT [ARGS...]              # run an EasyEdit script with the stubs installed
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import runpy
import sys
import types
from pathlib import Path

STUBBED = ("torchvision", "timm", "cv2", "decord", "av")


class _Unavailable:
    def __init__(self, name: str):
        self._name = name

    def __call__(self, *args, **kwargs):
        raise RuntimeError(f"{self._name} is a test stub (the real package cannot load here)")

    def __getattr__(self, attr):
        return _Unavailable(f"{self._name}.{attr}")

    def __mro_entries__(self, bases):  # `class X(torchvision.Foo)` at import time
        return (object,)


class _StubModule(types.ModuleType):
    def __getattr__(self, attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Unavailable(f"{self.__name__}.{attr}")


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self, roots):
        self.roots = tuple(roots)

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in self.roots:
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _StubModule(spec.name)
        module.__path__ = []
        module.__version__ = "0.0+stub"
        return module

    def exec_module(self, module):
        pass


def _loads(name: str) -> bool:
    try:
        importlib.import_module(name)
        return True
    except Exception:
        for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
            del sys.modules[key]
        return False


def install() -> list[str]:
    """Stub the packages of STUBBED that do not import (idempotent); returns the names stubbed by this call."""
    stubbed = {root for finder in sys.meta_path if isinstance(finder, _StubFinder) for root in finder.roots}
    missing = [name for name in STUBBED if name not in stubbed and not _loads(name)]
    if missing:
        sys.meta_path.insert(0, _StubFinder(missing))
    return missing


def main(argv: list[str] | None = None) -> int:
    """`python -m mote_plugin.host_stubs SCRIPT [ARGS...]`: run SCRIPT as `python SCRIPT ARGS...` would (as __main__,
    its directory first on sys.path), with the vision packages that cannot load stubbed."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv else 2
    script = Path(argv[0])
    if not script.is_file():
        print(f"mote_plugin.host_stubs: no such script: {script}", file=sys.stderr)
        return 2
    stubbed = install()
    if stubbed:
        print(f"mote_plugin.host_stubs: stubbed {', '.join(stubbed)} (they cannot load here)", file=sys.stderr)
    sys.argv = [str(script), *argv[1:]]
    sys.path.insert(0, str(script.resolve().parent))
    runpy.run_path(str(script), run_name="__main__")
    return 0


if __name__ == "__main__":
    sys.exit(main())
