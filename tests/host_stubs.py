"""Stand-ins for the vision packages EasyEdit imports at `import easyeditor` (its multimodal trainer pulls in
torchvision and timm), for environments where they cannot load: torchvision has no build for torch 2.13.0,
the torch this project pins. Text editing never calls them. Installed only by the host tests, and only when
the real package does not import; a stub module raises on any use, so nothing silently runs on a stub.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types

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
    """Stub the packages of STUBBED that do not import; returns their names."""
    missing = [name for name in STUBBED if not _loads(name)]
    if missing:
        sys.meta_path.insert(0, _StubFinder(missing))
    return missing
