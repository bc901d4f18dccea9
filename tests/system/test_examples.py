"""Every example runs (small sizes, time-bounded) so the examples cannot rot."""

import os
import subprocess
import sys

import pytest

import moe_framework

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLES = os.path.join(ROOT, "examples")
# The examples import the same moe_framework as this test process (the installed wheel under
# `make test`, the source tree after an in-place build).
PKG_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(moe_framework.__file__)))

CASES = {
    "quickstart.py": ["--tokens", "64", "--steps", "5"],
    "train_loop.py": ["--epochs", "1"],
    "compile_and_cuda_graphs.py": ["--backend", "aot_eager", "--batch", "8"],
    "hf_swap.py": [],
    "knowledge_graph_query.py": ["--steps", "12"],
    "expert_parallel.py": ["--steps", "2"],  # issue 15: starts its 2 ranks itself
    "adaptive_routing.py": ["--steps", "10"],
    # issue 17 (adaptive, hierarchical, multimodal MoE)
    "adaptive_moe.py": ["--epochs", "1", "--train", "320"],
    "multimodal_moe.py": ["--epochs", "1", "--train", "320"],
}


def test_every_example_has_a_test_case():
    found = sorted(f for f in os.listdir(EXAMPLES) if f.endswith(".py"))
    assert found == sorted(CASES)


@pytest.mark.parametrize("script", sorted(CASES))
def test_example_runs(script, tmp_path):
    args = list(CASES[script])
    if script in ("train_loop.py", "knowledge_graph_query.py"):
        args += ["--out", str(tmp_path)]
    env = dict(os.environ, PYTHONPATH=PKG_PARENT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.setdefault("OMP_NUM_THREADS", "2")
    r = subprocess.run(
        [sys.executable, os.path.join(EXAMPLES, script), *args],
        cwd=str(tmp_path),
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, f"{script} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    assert r.stdout.strip(), f"{script} printed nothing"


def test_knowledge_graph_query_example_answers_from_the_queried_layer_only(tmp_path):
    # The query is a last-layer embedding: hits from another layer's nodes would compare vectors
    # of different spaces.
    env = dict(os.environ, PYTHONPATH=PKG_PARENT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.setdefault("OMP_NUM_THREADS", "2")
    r = subprocess.run(
        [
            sys.executable,
            os.path.join(EXAMPLES, "knowledge_graph_query.py"),
            "--steps",
            "12",
            "--out",
            str(tmp_path / "new-folder"),
        ],
        cwd=str(tmp_path),
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    hits = [line for line in r.stdout.splitlines() if "metadata=" in line]
    assert len(hits) == 4  # two digits, top 2 each
    assert all("'layer': 1," in line for line in hits), r.stdout
