"""`make docs`: the API reference is generated from the docstrings of every public module."""

import os

import pytest

from moe_framework import apidocs


def test_public_modules_lists_subpackages_and_leaves_out_private_and_benchmarks():
    names = apidocs.public_modules()
    assert names[0] == "moe_framework"
    assert "moe_framework.system" in names and "moe_framework.kg" in names
    assert not any(".benchmarks" in n or "._" in n for n in names)


def test_apidocs_renders_docstrings_of_public_classes(tmp_path):
    pytest.importorskip("pdoc")
    assert apidocs.main([str(tmp_path)]) == 0
    page = (tmp_path / "moe_framework" / "system.html").read_text()
    # the docstring of MixtureOfExpertsSystem.load, not a hand-written restatement
    assert "MixtureOfExpertsSystem" in page and "safetensors" in page
    assert os.path.exists(tmp_path / "index.html")


def test_apidocs_usage_error_without_an_output_folder(capsys):
    assert apidocs.main([]) == 2
    assert "usage" in capsys.readouterr().err
