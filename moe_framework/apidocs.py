"""Build the HTML API reference from the docstrings: ``python -m moe_framework.apidocs OUT_DIR``
(``make docs`` writes ``build/api/``). Uses pdoc; every public module of the package is
included (names with a leading underscore and the benchmark scripts are left out)."""

from __future__ import annotations

import pkgutil
import sys
from typing import Optional, Sequence


def public_modules() -> list:
    """Dotted names of the package's public modules, the package itself first."""
    import moe_framework

    names = ["moe_framework"]
    for m in pkgutil.walk_packages(moe_framework.__path__, "moe_framework."):
        parts = m.name.split(".")
        if any(p.startswith("_") for p in parts) or "benchmarks" in parts:
            continue
        if parts[-1] in ("apidocs", "__main__"):
            continue
        names.append(m.name)
    return names


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: python -m moe_framework.apidocs OUT_DIR", file=sys.stderr)
        return 2
    try:
        import pdoc
    except ImportError:
        print("apidocs: pdoc is not installed (pip install pdoc)", file=sys.stderr)
        return 2
    from pathlib import Path

    pdoc.render.configure(docformat="google", show_source=False)
    pdoc.pdoc(*public_modules(), output_directory=Path(args[0]))
    print(f"apidocs: wrote {Path(args[0]) / 'index.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
