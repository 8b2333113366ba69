"""Imports for a run: torchvision without torch._dynamo, and no pandas, neither of which a run needs.

torchvision's `ops/roi_align.py` (0.26 to 0.29 at least) runs `from torch._dynamo.utils import is_compile_supported`
as torchvision is imported, and that line imports all of torch._dynamo and sympy: 2.5 s of every start on the CPU
machine, 4.1 s on an H200 (docs/levers.md, row 49), for a helper that `roi_align` calls only when it cannot use its
compiled kernel or deterministic algorithms are on. While torchvision imports, a stand-in module answers that name
with a function that imports the real helper when it is called; any other use of the stand-in replaces it with the
real module there and then. The stand-in is gone once torchvision is imported, so `torch._dynamo` (torch.compile,
say) imports as usual later.

pyarrow imports pandas, when it is installed, on the first array it builds (1.3-1.7 s on the H200 machine); the
command line's process blocks it.
"""

from __future__ import annotations

import importlib
import sys
import types
from contextlib import contextmanager

DYNAMO_UTILS = "torch._dynamo.utils"


def import_torch() -> None:
    """Import torch, then torchvision with torch._dynamo deferred (unless either is imported already)."""
    import torch  # noqa: F401

    if "torchvision" in sys.modules or DYNAMO_UTILS in sys.modules:
        return
    with dynamo_deferred():
        import torchvision  # noqa: F401


def keep_pandas_out() -> None:
    """`import pandas` fails in this process from now on (unless pandas is imported already), so pyarrow goes on
    without it. For the command line's own process: a program that calls the runner keeps its pandas."""
    if "pandas" not in sys.modules and not any(isinstance(finder, _NoPandas) for finder in sys.meta_path):
        sys.meta_path.insert(0, _NoPandas())  # not None in sys.modules: pyarrow's Cython import takes None as pandas


class _NoPandas:
    """A finder that refuses pandas, as if it were not installed."""

    def find_spec(self, name: str, path=None, target=None):
        if name == "pandas":
            raise ModuleNotFoundError("pandas is kept out of this process (pipeline.imports)", name=name)
        return None


@contextmanager
def dynamo_deferred():
    """Within the block, `torch._dynamo.utils` is a stand-in that imports the real module only when used."""
    stand_in = types.ModuleType(DYNAMO_UTILS, "imports the real torch._dynamo.utils when used (pipeline.imports)")

    def real() -> types.ModuleType:
        if sys.modules.get(DYNAMO_UTILS) is stand_in:
            del sys.modules[DYNAMO_UTILS]
        return importlib.import_module(DYNAMO_UTILS)

    def is_compile_supported(device_type: str) -> bool:
        return real().is_compile_supported(device_type)

    def module_getattr(name: str):
        if name.startswith("__"):  # `inspect` and the import system probe every module for __file__, __path__, ...
            raise AttributeError(name)
        return getattr(real(), name)

    stand_in.is_compile_supported = is_compile_supported
    stand_in.__getattr__ = module_getattr
    sys.modules[DYNAMO_UTILS] = stand_in
    try:
        yield
    finally:
        if sys.modules.get(DYNAMO_UTILS) is stand_in:
            del sys.modules[DYNAMO_UTILS]
