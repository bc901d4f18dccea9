import json
import os
import subprocess
import sys

from moe_framework import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args, timeout=300, cwd=ROOT):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run(
        [sys.executable, "-m", "moe_framework", *args],
        cwd=cwd,
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
    (tmp_path / "common.py").write_text("raise SystemExit('harness must not run')\n")
    (tmp_path / "_helper.py").write_text("raise SystemExit(3)\n")
    (tmp_path / "bench_ok.py").write_text(
        "import sys\nassert sys.argv[1:] == ['--quick'], sys.argv\nprint('| table |')\n"
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
