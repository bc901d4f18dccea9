"""The package type-checks: `make lint` (and so CI) runs mypy over moe_framework/ with the
configuration in pyproject.toml, and mypy reports zero errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_make_lint_runs_mypy_with_the_pyproject_configuration():
    recipe = (ROOT / "Makefile").read_text().split("\nlint:", 1)[1].split("\n\n", 1)[0]
    commands = [line.strip() for line in recipe.splitlines()[1:]]
    # No arguments: mypy then reads what to check (and how strictly) from pyproject.toml.
    assert "$(VENV)/bin/mypy" in commands, f"make lint does not run mypy: {commands}"
    # (Read as text: tomllib is Python 3.11+, the package supports 3.9.)
    section = (
        (ROOT / "pyproject.toml").read_text().split("\n[tool.mypy]\n", 1)[1].split("\n[", 1)[0]
    )
    assert 'files = ["moe_framework"]' in section.splitlines(), section


@pytest.mark.slow
def test_moe_framework_has_no_mypy_errors():
    pytest.importorskip("mypy", reason="mypy is a development tool (requirements-ci.txt)")
    # The source tree's package, as `make lint` checks it; the cache makes reruns take seconds.
    result = subprocess.run(
        [sys.executable, "-m", "mypy"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, f"mypy found errors:\n{result.stdout}{result.stderr}"
    assert result.stdout.startswith("Success: no issues found"), result.stdout
