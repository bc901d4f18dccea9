"""The C++ source layout stays what the build and the linters expect (docs/architecture.md,
"Source layout and build"): `make lint` formats-checks every C++/CUDA file under csrc/, including
the files of an op folder such as csrc/cpu/grouped_gemm/; no C++/CUDA file under csrc/ is longer
than 800 lines; and each op folder (grouped_gemm, route, similarity) is one translation unit, a
.cpp named after the folder that includes every kernel header of the folder."""

from __future__ import annotations

import glob
import re
from pathlib import Path

import pytest

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


MAX_SOURCE_LINES = 800
# Op families whose CPU kernels are split into a folder: csrc/cpu/<family>/<family>.cpp plus headers.
SPLIT_CPU_FAMILIES = ("grouped_gemm", "route", "similarity", "quant")
LOCAL_INCLUDE = re.compile(r'^#include "([^"/]+)"', re.MULTILINE)


def test_no_csrc_source_file_is_longer_than_800_lines():
    sources = sorted(p for p in (ROOT / "csrc").rglob("*") if p.suffix in SOURCE_SUFFIXES)
    assert sources, "no C++ sources found under csrc/"
    too_long = {
        p.relative_to(ROOT).as_posix(): n
        for p in sources
        if (n := len(p.read_text().splitlines())) > MAX_SOURCE_LINES
    }
    assert not too_long, (
        f"files over {MAX_SOURCE_LINES} lines (split them into a folder): {too_long}"
    )


@pytest.mark.parametrize("family", SPLIT_CPU_FAMILIES)
def test_split_cpu_family_is_one_translation_unit_that_includes_every_header(family):
    folder = ROOT / "csrc" / "cpu" / family
    assert folder.is_dir(), f"csrc/cpu/{family}/ is missing"
    assert not (ROOT / "csrc" / "cpu" / f"{family}.cpp").exists(), (
        f"csrc/cpu/{family}.cpp and csrc/cpu/{family}/ both exist: the family would compile twice"
    )
    files = sorted(p for p in folder.glob("*") if p.suffix in SOURCE_SUFFIXES)
    assert [p.name for p in files if p.suffix == ".cpp"] == [f"{family}.cpp"], (
        f"csrc/cpu/{family}/ should hold one translation unit ({family}.cpp) that includes the "
        f"kernel headers, got {[p.name for p in files]}"
    )
    # Headers reached from the .cpp through local includes: one that is not is never compiled.
    reached, pending = set(), [f"{family}.cpp"]
    while pending:
        name = pending.pop()
        for included in LOCAL_INCLUDE.findall((folder / name).read_text()):
            if included not in reached and (folder / included).exists():
                reached.add(included)
                pending.append(included)
    orphans = sorted(p.name for p in files if p.suffix == ".h" and p.name not in reached)
    assert not orphans, f"headers of csrc/cpu/{family}/ that {family}.cpp never includes: {orphans}"
