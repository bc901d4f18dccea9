"""The C++ source layout stays what the build and the linters expect (docs/architecture.md,
"Source layout and build"): `make lint` formats-checks every C++/CUDA file under csrc/, including
the files of an op folder such as csrc/cpu/grouped_gemm/, and the grouped_gemm CPU kernels stay
split into files of at most 800 lines."""

from __future__ import annotations

import glob
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SOURCE_SUFFIXES = {".cpp", ".h", ".cu", ".cuh"}


def _lint_clang_format_files() -> set[str]:
    """Files the clang-format line of `make lint` checks: its patterns, with $(wildcard ...)
    expanded as make does (a glob) and plain patterns as the shell does (also a glob)."""
    recipe = (ROOT / "Makefile").read_text().split("\nlint:", 1)[1].split("\n\n", 1)[0]
    line = next(cmd for cmd in recipe.splitlines() if "clang-format" in cmd)
    patterns = re.sub(r"\$\(wildcard ([^)]*)\)", r"\1", line.split("--Werror", 1)[1]).split()
    return {
        Path(path).relative_to(ROOT).as_posix()
        for pattern in patterns
        for path in glob.glob(str(ROOT / pattern))
    }


def test_make_lint_checks_the_format_of_every_csrc_source():
    sources = {
        p.relative_to(ROOT).as_posix()
        for p in (ROOT / "csrc").rglob("*")
        if p.suffix in SOURCE_SUFFIXES
    }
    assert sources, "no C++ sources found under csrc/"
    missing = sorted(sources - _lint_clang_format_files())
    assert not missing, f"make lint's clang-format does not check: {missing}"


def test_grouped_gemm_cpu_kernels_are_split_into_files_of_at_most_800_lines():
    folder = ROOT / "csrc" / "cpu" / "grouped_gemm"
    files = sorted(p for p in folder.glob("*") if p.suffix in SOURCE_SUFFIXES)
    assert [p.name for p in files if p.suffix == ".cpp"] == ["grouped_gemm.cpp"], (
        "csrc/cpu/grouped_gemm/ should hold one translation unit (grouped_gemm.cpp) that includes "
        f"the kernel headers, got {[p.name for p in files]}"
    )
    too_long = {p.name: n for p in files if (n := len(p.read_text().splitlines())) > 800}
    assert not too_long, f"files over 800 lines: {too_long}"
