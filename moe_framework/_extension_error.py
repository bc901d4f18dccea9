"""The message of the ImportError raised when ``moe_framework._C`` cannot be loaded.

Kept out of ``__init__`` because it runs before the package's own imports, and must itself import
nothing but the standard library and torch.
"""

import importlib.machinery
import os
import platform

import torch


def extension_error(exc: ImportError) -> str:
    """What went wrong loading ``moe_framework._C`` and how to fix it, without Python's own text
    for a missing submodule ("partially initialized module ... circular import"), which blames
    the wrong thing."""
    here = os.path.dirname(os.path.abspath(__file__))
    files = sorted(
        f for f in os.listdir(here) if f.startswith("_C.") and f.endswith((".so", ".pyd"))
    )
    loadable = {"_C" + suffix for suffix in importlib.machinery.EXTENSION_SUFFIXES}
    built = [f for f in files if f in loadable]
    rebuild = (
        "Build it in place with `make inplace`, or install with `pip install "
        "--no-build-isolation .` and run from outside the source tree so the installed package "
        "is imported (see docs/troubleshooting.md)."
    )
    if not files:
        return (
            f"moe_framework: the compiled extension moe_framework._C is missing from {here}: this "
            f"is a source tree that was never built. {rebuild}"
        )
    if not built:
        return (
            f"moe_framework: the compiled extension in {here} ({', '.join(files)}) was built for "
            f"another Python, not this one ({platform.python_implementation()} "
            f"{platform.python_version()}). {rebuild}"
        )
    return (
        f"moe_framework: cannot load the compiled extension {os.path.join(here, built[0])} "
        f"({exc}). It was most likely built against another torch than this one "
        f"({torch.__version__}): rebuild it with `make inplace` in a source tree, or reinstall "
        "with `pip install --no-build-isolation .` (see docs/troubleshooting.md)."
    )
