import contextlib
import io
import json
import os
import sqlite3
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
def tiny_demo_run(tmp_path_factory):
    """One tiny demo run: (output folder, its stdout, its stderr with the progress bar)."""
    out = tmp_path_factory.mktemp("demo")
    stdout, stderr = io.StringIO(), io.StringIO()
    # --threads 0 keeps the test process's thread setting.
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        rc = cli.main(["demo", "--tiny", "--out", str(out), "--threads", "0"])
    assert rc == 0, stderr.getvalue()
    return out, stdout.getvalue(), stderr.getvalue()


@pytest.fixture(scope="module")
def tiny_demo(tiny_demo_run):
    return tiny_demo_run[0]


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
            "--like",
            "1",
            "--export-json",
            str(tmp_path / "g.json"),
            "--export-graphml",
            str(tmp_path / "g.graphml"),
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert "nodes:" in out and "similar to node 1" in out
    doc = json.loads((tmp_path / "g.json").read_text())
    assert doc  # a JSON document with the graph
    assert (tmp_path / "g.graphml").read_text().lstrip().startswith("<?xml")
    assert cli.main(["kg", store, "--where", "digit=3"]) == 0
    assert '"digit": 3' in capsys.readouterr().out


# ---------------------------------------------------------------- kg: what it prints (item 15)


def _node_lines(out: str) -> list:
    return [line for line in out.splitlines() if line.startswith("  node ")]


def _node_id(line: str) -> int:
    return int(line.split()[1])


def test_kg_like_prints_only_the_hits_and_leaves_the_node_itself_out(tiny_demo, capsys):
    assert cli.main(["kg", str(tiny_demo / "knowledge.sqlite"), "--like", "1"]) == 0
    out = capsys.readouterr().out
    lines = _node_lines(out)
    # No default 20-node listing before the answer: exactly the top 5 hits, node 1 not among them.
    assert len(lines) == 5
    assert 1 not in [_node_id(line) for line in lines]
    assert all("cos=" in line for line in lines)


def test_kg_vector_prints_only_the_hits(tiny_demo, capsys):
    store = str(tiny_demo / "knowledge.sqlite")
    vector = json.dumps([1.0] * 32)
    assert cli.main(["kg", store, "--vector", vector, "--top-k", "3"]) == 0
    lines = _node_lines(capsys.readouterr().out)
    assert len(lines) == 3 and all("cos=" in line for line in lines)


def test_kg_where_prints_only_matches_up_to_list(tiny_demo, capsys):
    store = str(tiny_demo / "knowledge.sqlite")
    assert cli.main(["kg", store, "--where", "layer=1"]) == 0
    out = capsys.readouterr().out
    lines = _node_lines(out)
    assert lines and all('"layer": 1' in line for line in lines)
    # --list bounds the matches and says how many were left out.
    assert cli.main(["kg", store, "--where", "layer=digits", "--list", "3"]) == 0
    out = capsys.readouterr().out
    assert len(_node_lines(out)) == 3
    assert "7 more" in out


def test_kg_where_with_like_filters_the_hits_and_honours_top_k(tiny_demo, capsys):
    store = str(tiny_demo / "knowledge.sqlite")
    assert cli.main(["kg", store, "--like", "1", "--where", "layer=1", "--top-k", "3"]) == 0
    lines = _node_lines(capsys.readouterr().out)
    assert len(lines) == 3
    assert all('"layer": 1' in line and "cos=" in line for line in lines)
    assert 1 not in [_node_id(line) for line in lines]


def test_kg_where_follows_the_stores_json_matching_rule(tmp_path, capsys):
    import numpy as np

    from moe_framework.knowledge_graph import KnowledgeGraph

    rng = np.random.default_rng()
    metas = [
        {"v": 1},  # 1: number
        {"v": "1"},  # 2: the string "1"
        {"v": True},  # 3: a bool: never equal to 1
        {"v": 1.0},  # 4: 1.0 == 1 by value
        {"v": [1, True]},  # 5: arrays element by element, bools only to bools
        {"v": [1, 1]},  # 6
        {"w": 1},  # 7: key missing
        {"v": "NaN"},  # 8: a string that json.loads would read as a float
    ]
    store = str(tmp_path / "kg.sqlite")
    with KnowledgeGraph.open(store, dim=6) as kg:
        kg.add_nodes_batch(rng.standard_normal((len(metas), 6)), "n", metas)

    def where(value, *extra):
        assert cli.main(["kg", store, "--where", f"v={value}", "--list", "50", *extra]) == 0
        return [_node_id(line) for line in _node_lines(capsys.readouterr().out)]

    assert where("1") == [1, 2, 4]
    assert where("true") == [3]
    assert where("[1, 1]") == [6]
    assert where("[1, true]") == [5]
    assert where("NaN") == [8]
    assert where('"1"') == []  # the quotes are part of the string written
    # The same rule in similarity search: the hits are the matches, best first, node 1 left out.
    hits = where("1", "--like", "1", "--top-k", "5")
    assert sorted(hits) == [2, 4]


def test_kg_list_alone_still_prints_the_first_nodes(tiny_demo, capsys):
    assert cli.main(["kg", str(tiny_demo / "knowledge.sqlite"), "--list", "4"]) == 0
    lines = _node_lines(capsys.readouterr().out)
    assert [_node_id(line) for line in lines] == [1, 2, 3, 4]


@pytest.fixture
def hostile_store(tmp_path):
    """A valid store whose node type and metadata carry terminal escape sequences (written with
    plain SQL, as a hostile file would carry them)."""
    import numpy as np

    from moe_framework.knowledge_graph import KnowledgeGraph

    path = str(tmp_path / "hostile.sqlite")
    with KnowledgeGraph.create(path, dim=4) as kg:
        kg.add_node(np.array([1.0, 0.0, 0.0, 0.0]), type="plain", metadata={"k": "v"})
        kg.add_node(np.array([1.0, 0.1, 0.0, 0.0]), type="plain", metadata={"k": "w"})
    evil_type = "\x1b]0;pwned\x07\x1b[2J\u202e\x9b31m"
    evil_meta = json.dumps({"k": "v\x1b[31m", "\x1b[1mkey": "\u202ex"})
    conn = sqlite3.connect(path)
    with conn:
        conn.execute("UPDATE nodes SET type = ?, metadata = ? WHERE id = 1", (evil_type, evil_meta))
    conn.close()
    return path


@pytest.mark.parametrize(
    "extra",
    [[], ["--list", "5"], ["--like", "2"], ["--where", "k=v\x1b[31m"], ["--vector", "[1,0,0,0]"]],
)
def test_kg_escapes_control_characters_from_the_store(hostile_store, extra, capsys):
    assert cli.main(["kg", hostile_store, *extra]) == 0
    out = capsys.readouterr().out
    assert _node_lines(out), out
    for raw in ("\x1b", "\x07", "\x9b", "\u202e"):
        assert raw not in out
    if not extra or extra[0] == "--list":
        assert "\\x1b]0;pwned\\x07" in out  # shown, escaped


def test_safe_text_escapes_controls_and_keeps_printable_text():
    assert cli.safe_text("ok é 中 ") == "ok é 中 "
    assert cli.safe_text("a\x1b[31mb\nc\u202ed\ud800\U000e0001") == (
        "a\\x1b[31mb\\x0ac\\u202ed\\ud800\\U000e0001"
    )


# ---------------------------------------------------------------- bad input: exit 2 (item 16)


@pytest.fixture
def small_store(tmp_path):
    import numpy as np

    from moe_framework.knowledge_graph import KnowledgeGraph

    path = str(tmp_path / "small.sqlite")
    with KnowledgeGraph.create(path, dim=4) as kg:
        for i in range(3):
            kg.add_node(np.eye(4)[i] + 0.1, type="t", metadata={"layer": i})
    return path


def _bad_inputs(tmp_path, store):
    text = tmp_path / "notes.txt"
    text.write_text("just text\n")
    pickled = tmp_path / "model.pt"
    pickled.write_bytes(b"\x80\x04\x95" + b"\x00" * 200)
    folder = tmp_path / "folder"
    folder.mkdir()
    missing = str(tmp_path / "missing" / "x.json")
    return {
        "kg missing file": ["kg", str(tmp_path / "nope.sqlite")],
        "kg text file": ["kg", str(text)],
        "kg pickle": ["kg", str(pickled)],
        "kg directory": ["kg", str(folder)],
        "kg --like unknown id": ["kg", store, "--like", "99999"],
        "kg --like negative": ["kg", store, "--like", "-1"],
        "kg --like not an int": ["kg", store, "--like", "one"],
        "kg --like beyond int64": ["kg", store, "--like", str(2**70)],
        "kg --vector wrong length": ["kg", store, "--vector", "[1, 2]"],
        "kg --vector object": ["kg", store, "--vector", '{"a": 1}'],
        "kg --vector string": ["kg", store, "--vector", '"abcd"'],
        "kg --vector scalar": ["kg", store, "--vector", "3"],
        "kg --vector not JSON": ["kg", store, "--vector", "1,2,3,4"],
        "kg --vector NaN": ["kg", store, "--vector", "[1, NaN, 0, 0]"],
        "kg --vector bools": ["kg", store, "--vector", "[true, false, true, false]"],
        "kg --vector nested": ["kg", store, "--vector", "[[1, 2, 3, 4]]"],
        "kg --vector zeros": ["kg", store, "--vector", "[0, 0, 0, 0]"],
        "kg --where without =": ["kg", store, "--where", "layer"],
        "kg --where empty key": ["kg", store, "--where", "=1"],
        "kg --top-k 0": ["kg", store, "--like", "1", "--top-k", "0"],
        "kg --list negative": ["kg", store, "--list", "-1"],
        "kg export over the store": ["kg", store, "--export-json", store],
        "kg export over the store's WAL": ["kg", store, "--export-graphml", store + "-wal"],
        "kg export into a missing folder": ["kg", store, "--export-json", missing],
        "kg export onto a folder": ["kg", store, "--export-json", str(folder)],
        "demo --threads negative": ["demo", "--threads", "-4"],
        "demo --seed negative": ["demo", "--seed", "-1"],
        "demo --seed too large": ["demo", "--seed", str(2**32)],
        "demo --epochs 0": ["demo", "--epochs", "0"],
        "demo --epochs huge": ["demo", "--epochs", str(10**12)],
        "demo --out is a file": ["demo", "--out", str(text)],
        "demo --out under a file": ["demo", "--out", str(text / "sub")],
        "bench --dir missing": ["bench", "--dir", str(tmp_path / "nope")],
        "bench --only matches nothing": ["bench", "--only", "no-such-benchmark", "--list"],
        "unknown command": ["frobnicate"],
        "unknown option": ["info", "--bogus"],
    }


def test_every_bad_argument_or_file_is_one_line_and_exit_2(tmp_path, small_store, capsys):
    for name, argv in _bad_inputs(tmp_path, small_store).items():
        rc = cli.main(argv)
        captured = capsys.readouterr()
        lines = captured.err.strip().splitlines()
        assert rc == 2, f"{name}: exit {rc}\n{captured.err}"
        assert len(lines) == 1, f"{name}: stderr is not one line:\n{captured.err}"
        assert "Traceback" not in captured.err, name
        assert "error" in lines[0], f"{name}: {lines[0]}"
    # The exports aimed at the store were refused before writing: it is intact.
    from moe_framework.knowledge_graph import KnowledgeGraph

    with KnowledgeGraph.open(small_store, readonly=True) as kg:
        assert len(kg) == 3


def test_bad_arguments_name_the_argument_and_the_value(tmp_path, small_store, capsys):
    cases = {
        ("demo", "--threads", "-4"): ["--threads", "-4"],
        ("demo", "--seed", "-1"): ["--seed", "-1"],
        ("kg", small_store, "--like", "99999"): ["--like", "99999"],
        ("kg", small_store, "--vector", "[1, 2]"): ["--vector", "4 numbers", "got 2"],
        ("kg", small_store, "--where", "layer"): ["--where", "KEY=VALUE", "'layer'"],
    }
    for argv, needles in cases.items():
        assert cli.main(list(argv)) == 2
        err = capsys.readouterr().err
        for needle in needles:
            assert needle in err, (argv, err)


def test_bad_files_exit_2_without_traceback_in_a_real_process(tmp_path):
    # End to end through `python -m`, including a FIFO, which would block a plain open() forever.
    fifo = tmp_path / "store.fifo"
    os.mkfifo(fifo)
    for argv in (["kg", str(fifo)], ["demo", "--threads", "-4"]):
        r = _run(*argv, timeout=120)
        assert r.returncode == 2, (argv, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1, (argv, r.stderr)
        assert "Traceback" not in r.stderr


def test_demo_checks_its_arguments_before_training(tmp_path):
    from moe_framework.demo import check_demo_args, run_demo

    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match="threads must be None"):
        check_demo_args(out_dir=str(tmp_path / "o"), threads=0)
    with pytest.raises(ValueError, match=r"seed must be an int in \[0, 4294967295\], got -1"):
        run_demo(out_dir=str(tmp_path / "o"), seed=-1)
    with pytest.raises(ValueError, match="cannot write the output folder"):
        run_demo(out_dir=str(blocker / "sub"))
    with pytest.raises(ValueError, match="device must be 'cpu' or 'cuda'"):
        check_demo_args(out_dir=str(tmp_path / "o"), device="tpu")


# ---------------------------------------------------------------- bench: packaged suite (item 17)


def test_bench_runs_the_packaged_suite_never_the_cwd_benchmarks(tmp_path):
    rogue = tmp_path / "benchmarks"
    rogue.mkdir()
    (rogue / "bench_rogue.py").write_text("open('EXECUTED', 'w').write('x')\n")
    r = _run("bench", "--list", cwd=str(tmp_path), timeout=120)
    assert r.returncode == 0, r.stderr
    listed = r.stdout.split()
    packaged = sorted(
        "moe_framework.benchmarks." + os.path.basename(p)[:-3]
        for p in cli.find_benchmarks(cli.packaged_benchmarks_dir())
    )
    assert listed == packaged
    assert "moe_framework.benchmarks.bench_route" in listed
    assert not any("rogue" in name for name in listed)
    assert not (tmp_path / "EXECUTED").exists()


def test_packaged_benchmarks_import_and_parse_through_the_bench_runner(tmp_path):
    # Each benchmark module, run the way `bench` runs it (the same runner code) from a folder
    # outside the source tree, gets as far as its argument parser: its imports all resolve.
    modules = [
        "moe_framework.benchmarks." + os.path.basename(p)[:-3]
        for p in cli.find_benchmarks(cli.packaged_benchmarks_dir())
    ]
    script = (
        "import contextlib, io, json, sys\n"
        "runner, pkg_root, modules = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])\n"
        "codes = {}\n"
        "for m in modules:\n"
        "    sys.argv = ['-c', pkg_root, '', m, '--help']\n"
        "    out = io.StringIO()\n"
        "    try:\n"
        "        with contextlib.redirect_stdout(out):\n"
        "            exec(runner, {'__name__': '__runner__'})\n"
        "        codes[m] = 'returned'\n"
        "    except SystemExit as exc:\n"
        "        codes[m] = [exc.code, 'usage' in out.getvalue()]\n"
        "print(json.dumps(codes))\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", script, cli._BENCH_RUNNER, PKG_PARENT, json.dumps(modules)],
        cwd=str(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    codes = json.loads(r.stdout.strip().splitlines()[-1])
    assert codes == {m: [0, True] for m in modules}


def test_import_moe_framework_loads_no_benchmark_or_plotting_module(tmp_path):
    code = (
        "import sys, moe_framework, moe_framework.cli\n"
        "heavy = ('moe_framework.benchmarks', 'matplotlib', 'sklearn', 'transformers')\n"
        "print([m for m in sys.modules if m.startswith(heavy)])\n"
    )
    env = dict(os.environ, PYTHONPATH=PKG_PARENT)
    r = subprocess.run(
        [sys.executable, "-c", code], cwd=str(tmp_path), env=env, capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_fma_peak_source_ships_inside_the_package():
    from moe_framework.benchmarks import common

    assert os.path.isfile(common.FMA_PEAK_SRC)
    assert os.path.dirname(common.FMA_PEAK_SRC) == cli.packaged_benchmarks_dir()


def test_bench_dir_runs_that_folder_from_the_current_directory(tmp_path, monkeypatch):
    suite = tmp_path / "mybench"
    suite.mkdir()
    (suite / "bench_here.py").write_text(
        "import os\nopen('ran-in', 'w').write(os.getcwd())\n"
        "assert __spec__.name == 'mybench.bench_here'\n"
    )
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    assert cli.main(["bench", "--dir", str(suite)]) == 0
    # Results (bench_results/, or here a marker) land in the directory the command ran in.
    assert (work / "ran-in").read_text() == str(work)


# ---------------------------------------------------------------- info and import (item 18)


def _all_kernels(with_cuda: bool) -> dict:
    from moe_framework import ops

    keys = ["CPU", "CUDA", "Meta"] if with_cuda else ["CPU", "Meta"]
    return {op: list(keys) for op in ops.OPS}


@pytest.mark.parametrize(
    "with_cuda, torch_cuda, device, compiled, usable, reason",
    [
        (True, "12.8", False, "yes", False, "no CUDA device"),
        (True, "12.8", True, "yes", True, ""),
        (False, "12.8", True, "no", False, "CPU-only"),
        (False, None, False, "no", False, "this torch is built without CUDA"),
    ],
)
def test_cuda_kernel_status_tells_compiled_from_usable(
    monkeypatch, with_cuda, torch_cuda, device, compiled, usable, reason
):
    import torch

    from moe_framework import ops

    monkeypatch.setattr(torch.version, "cuda", torch_cuda)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: device)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: int(device))
    status = ops.cuda_kernel_status(_all_kernels(with_cuda))
    assert status["compiled"] == compiled
    assert status["usable"] is usable
    assert reason in status["reason"]
    assert bool(status["reason"]) is not usable


def test_info_says_cuda_kernels_compiled_but_unusable_without_a_device(monkeypatch, capsys):
    import torch

    from moe_framework import ops

    monkeypatch.setattr(ops, "registered_kernels", lambda: _all_kernels(True))
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "CUDA kernels: compiled: yes, usable: no (no CUDA device)" in out
    route_row = next(line for line in out.splitlines() if line.split()[:1] == ["route"])
    assert route_row.split()[1:] == ["yes", "built", "yes"]
    assert cli.main(["info", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["cuda_kernels"] == {"compiled": "yes", "usable": False, "reason": "no CUDA device"}


def test_import_without_the_compiled_extension_says_the_cause_and_the_fix(tmp_path):
    import shutil

    src = os.path.dirname(os.path.abspath(cli.__file__))
    shutil.copytree(
        src,
        tmp_path / "moe_framework",
        ignore=shutil.ignore_patterns("_C*.so", "_C*.pyd", "__pycache__", "*.tmp"),
    )
    r = subprocess.run(
        [sys.executable, "-c", "import moe_framework"],
        cwd=str(tmp_path),
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode != 0
    assert "circular import" not in r.stderr
    assert "partially initialized" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: moe_framework: the compiled extension")
    assert "missing" in last and "never built" in last
    assert "make inplace" in last and "pip install --no-build-isolation ." in last
    assert "outside the source tree" in last


# ---------------------------------------------------------------- demo output (item 22)


def test_demo_text_labels_which_conditional_probability_it_prints(tiny_demo_run):
    _, out, _ = tiny_demo_run
    spec_header = next(line for line in out.splitlines() if "expert specialisation" in line)
    assert "P(digit | expert)" in spec_header
    query = out[out.index("query:") :].splitlines()
    hits = [line for line in query if line.lstrip().startswith("node")]
    assert hits and all("P(expert | digit)" in line for line in hits)


def test_demo_progress_bar_says_its_numbers_are_training_losses(tiny_demo_run):
    _, _, err = tiny_demo_run
    assert "train loss: moe " in err and ", dense " in err
    assert "dense=" not in err and "moe=" not in err


def test_demo_graph_layout_gives_each_layer_its_own_column(tiny_demo):
    from moe_framework.demo import graph_layout
    from moe_framework.knowledge_graph import KnowledgeGraph

    with KnowledgeGraph.open(str(tiny_demo / "knowledge.sqlite"), readonly=True) as kg:
        nodes = list(kg.iter_nodes())
    pos = graph_layout(nodes, num_layers=2, num_experts=4)
    assert set(pos) == {n.id for n in nodes}
    column = {}
    for n in nodes:
        key = "digits" if n.type == "digit" else n.metadata["layer"]
        column.setdefault(key, []).append(pos[n.id][0])
        if n.type != "digit":
            assert pos[n.id][1] == -n.metadata["expert"]  # one row per expert
    assert max(column[0]) < min(column[1]) < max(column[1]) < min(column["digits"])
    # within an expert's row, older knowledge is further left
    for layer in (0, 1):
        for e in range(4):
            row = [
                n for n in nodes if n.metadata.get("layer") == layer and n.metadata["expert"] == e
            ]
            ordered = sorted(row, key=lambda n: (n.metadata["step"], n.id))
            assert [pos[n.id][0] for n in ordered] == sorted(pos[n.id][0] for n in ordered)


def test_demo_graph_picture_labels_experts_and_explains_node_size(tiny_demo, tmp_path):
    from moe_framework.demo import draw_knowledge_graph
    from moe_framework.knowledge_graph import KnowledgeGraph

    s = json.loads((tiny_demo / "summary.json").read_text())
    spec = s["specialisation"]["per_layer"]
    names = [f"expert_{e}" for e in range(4)]
    png = tmp_path / "kg.png"
    with KnowledgeGraph.open(str(tiny_demo / "knowledge.sqlite"), readonly=True) as kg:
        texts = draw_knowledge_graph(kg, str(png), spec, names)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "layer 0 experts" in texts and "layer 1 experts" in texts and "digits" in texts
    for e in range(4):
        labels = [t for t in texts if t.startswith(f"expert_{e}: top digit ")]
        assert len(labels) == 2  # one per layer
    caption = texts[-1]
    assert "Node size" in caption and "P(expert | digit)" in caption
    assert "P(digit | expert)" in caption
