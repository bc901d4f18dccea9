import json
import os
import subprocess
import sys

import pytest

from moe_framework import cli

# The subprocesses import the same moe_framework as this test process (the installed wheel under
# `make test`, the source tree after an in-place build), never whichever one the cwd would give.
PKG_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(cli.__file__)))


def _run(*args, timeout=300, cwd=None):
    env = dict(os.environ, PYTHONPATH=PKG_PARENT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run(
        [sys.executable, "-m", "moe_framework", *args],
        cwd=cwd or os.path.dirname(os.path.abspath(__file__)),
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_cli_info_reports_kernels_per_device_and_threads(capsys):
    assert cli.main(["info", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    import torch

    from moe_framework import ops

    assert d["versions"]["torch"] == torch.__version__
    assert d["kernels"] == ops.registered_kernels()
    assert "CPU" in d["kernels"]["permute"]
    assert d["threads"]["torch.get_num_threads"] == torch.get_num_threads()


def test_cli_info_text_runs_as_module():
    r = _run("info", timeout=120)
    assert r.returncode == 0, r.stderr
    assert "kernels" in r.stdout and "permute" in r.stdout and "threads" in r.stdout


def test_cli_without_subcommand_fails_with_usage():
    r = _run(timeout=120)
    assert r.returncode != 0
    assert "usage" in r.stderr


def test_cli_bench_finds_scripts_and_skips_harness(tmp_path):
    tmp_path = tmp_path / "benchmarks"
    tmp_path.mkdir()
    (tmp_path / "common.py").write_text("raise SystemExit('harness must not run')\n")
    (tmp_path / "_helper.py").write_text("raise SystemExit(3)\n")
    (tmp_path / "bench_ok.py").write_text(
        "import sys\nassert sys.argv[1:] == ['--quick'], sys.argv\n"
        "assert __name__ == '__main__' and __spec__.name == 'benchmarks.bench_ok'\n"
    )
    (tmp_path / "bench_fail.py").write_text("raise SystemExit(4)\n")
    assert [os.path.basename(p) for p in cli.find_benchmarks(str(tmp_path))] == [
        "bench_fail.py",
        "bench_ok.py",
    ]
    assert cli.main(["bench", "--dir", str(tmp_path), "--only", "ok"]) == 0
    assert cli.main(["bench", "--dir", str(tmp_path)]) == 1


def test_cli_bench_without_scripts_is_an_error(tmp_path):
    assert cli.main(["bench", "--dir", str(tmp_path)]) == 2


def test_cli_kg_missing_store_is_an_error(tmp_path):
    assert cli.main(["kg", str(tmp_path / "nope.sqlite")]) == 2


@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    # --threads 0 keeps the test process's thread setting.
    rc = cli.main(["demo", "--tiny", "--out", str(out), "--no-progress", "--threads", "0"])
    assert rc == 0
    return out


def test_demo_tiny_writes_plots_store_model_and_summary(tiny_demo):
    out = tiny_demo
    for name in (
        "expert_load.png",
        "specialisation.png",
        "knowledge_graph.png",
        "knowledge.sqlite",
        "summary.json",
        os.path.join("model", "model.safetensors"),
        os.path.join("model", "config.json"),
        os.path.join("model", "knowledge.sqlite"),
    ):
        assert (out / name).stat().st_size > 0, name
    with open(out / "expert_load.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    s = json.loads((out / "summary.json").read_text())
    # Ten classes: chance is 0.1; even two tiny epochs learn far more than that.
    assert 0.3 < s["test_accuracy"]["moe"] <= 1.0
    assert 0.3 < s["test_accuracy"]["dense"] <= 1.0
    # The dense baseline has the MoE's active parameters (up to the router's weights).
    p = s["parameters"]
    assert abs(p["moe"]["active"] - p["dense"]["active"]) <= 2 * 32 * 4 + 2 * 4
    assert p["moe"]["total"] > p["moe"]["active"]
    assert len(s["routing_telemetry"]) == 2
    assert sum(s["routing_telemetry"][0]["load"]) == s["dataset"]["test"] * 2
    assert len(s["specialisation"]["last_layer_experts"]) == 4
    assert s["query"]["hits"], "the graph answered the query"
    assert all(h["metadata"]["layer"] == 1 for h in s["query"]["hits"])


def test_demo_store_reopens_with_the_summary_counts(tiny_demo):
    from moe_framework.knowledge_graph import KnowledgeGraph

    s = json.loads((tiny_demo / "summary.json").read_text())
    with KnowledgeGraph.open(str(tiny_demo / "knowledge.sqlite"), readonly=True) as kg:
        assert len(kg) == s["knowledge_graph"]["nodes"]
        assert kg.num_edges() == s["knowledge_graph"]["edges"]
        types = {n.type for n in kg.iter_nodes()}
    assert {"digit", "expert_report"} <= types


def test_demo_model_loads_and_predicts_the_reported_accuracy(tiny_demo):
    from moe_framework.demo import load_digits_split
    from moe_framework.system import MixtureOfExpertsSystem

    s = json.loads((tiny_demo / "summary.json").read_text())
    model = MixtureOfExpertsSystem.load(tiny_demo / "model")
    _, _, x_te, y_te = load_digits_split(seed=0, tiny=True)
    acc = float((model.predict(x_te).argmax(-1) == y_te).float().mean())
    assert acc == pytest.approx(s["test_accuracy"]["moe"], abs=1e-6)
    model.close()


def test_cli_kg_lists_queries_and_exports_the_demo_store(tiny_demo, tmp_path, capsys):
    store = str(tiny_demo / "knowledge.sqlite")
    rc = cli.main(
        [
            "kg",
            store,
            "--list",
            "3",
            "--like",
            "1",
            "--where",
            "digit=3",
            "--export-json",
            str(tmp_path / "g.json"),
            "--export-graphml",
            str(tmp_path / "g.graphml"),
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert "nodes:" in out and "similar to node 1" in out
    assert "cos=+1.000" in out  # node 1 is its own nearest neighbour
    assert '"digit": 3' in out
    doc = json.loads((tmp_path / "g.json").read_text())
    assert doc  # a JSON document with the graph
    assert (tmp_path / "g.graphml").read_text().lstrip().startswith("<?xml")
