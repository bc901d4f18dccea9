"""moe_framework.tuning: the Optuna search (space parsing, pruning, the SQLite study that resumes
after a crash) and `python -m moe_framework tune` on the demo task."""

from __future__ import annotations

import json

import pytest

optuna = pytest.importorskip("optuna")

from moe_framework import cli  # noqa: E402
from moe_framework.tuning import suggest, tune  # noqa: E402


def _objective(params, report):
    # maximum 0 at x = 0.3, kind = "b"
    value = -((params["x"] - 0.3) ** 2) - (0 if params["kind"] == "b" else 0.5)
    report(0, value)
    return value


SPACE = {"x": (0.0, 1.0), "kind": ["a", "b"], "n": (1, 4), "lr": (1e-4, 1e-1, "log")}


def test_suggest_maps_each_spec_to_its_distribution():
    trial = optuna.trial.FixedTrial({"x": 0.5, "kind": "a", "n": 3, "lr": 0.01})
    assert suggest(trial, SPACE) == {"x": 0.5, "kind": "a", "n": 3, "lr": 0.01}
    study = optuna.create_study()
    t = study.ask()
    suggest(t, SPACE)
    dists = t.distributions
    assert isinstance(dists["x"], optuna.distributions.FloatDistribution)
    assert isinstance(dists["n"], optuna.distributions.IntDistribution)
    assert dists["lr"].log and not dists["x"].log
    assert isinstance(dists["kind"], optuna.distributions.CategoricalDistribution)


@pytest.mark.parametrize(
    "space, match",
    [
        ({"x": []}, "empty list"),
        ({"x": (2, 1)}, "low <= high"),
        ({"x": (1, 2, "sqrt")}, "must be 'log'"),
        ({"x": "ab"}, "must be a list of choices"),
    ],
)
def test_bad_spaces_are_refused(space, match):
    with pytest.raises(ValueError, match=match):
        tune(_objective, space, 1)


def test_tune_finds_the_best_region_and_prunes_with_the_median_rule():
    calls = []

    def train_fn(params, report):
        # a bad trial reports a bad value at step 1 and would continue: the pruner stops it
        calls.append(params)
        value = _objective(params, lambda *_: None)
        for step in range(3):
            report(step, value)
        return value

    res = tune(train_fn, SPACE, 16, seed=1, n_startup_trials=4, n_warmup_steps=1)
    states = {t["state"] for t in res.trials}
    assert "PRUNED" in states and len(res.trials) == 16
    best = max(t["value"] for t in res.trials if t["state"] == "COMPLETE")
    assert res.best_value == best
    assert res.best_params["kind"] == "b" and abs(res.best_params["x"] - 0.3) < 0.25


def test_a_study_in_sqlite_resumes_after_a_crash(tmp_path):
    storage = str(tmp_path / "study.sqlite")
    seen = []

    def crashing(params, report):
        seen.append(params["x"])
        if len(seen) == 3:
            raise RuntimeError("power cut")
        return _objective(params, report)

    with pytest.raises(RuntimeError, match="power cut"):
        tune(crashing, SPACE, 6, storage=storage, seed=0)
    # a process killed mid-trial leaves it RUNNING in the storage
    study = optuna.load_study(study_name="moe_framework", storage=f"sqlite:///{storage}")
    study.ask()
    del study

    res = tune(_objective, SPACE, 6, storage=storage, seed=0)
    by_state: dict = {}
    for t in res.trials:
        by_state.setdefault(t["state"], []).append(t)
    assert len(by_state["COMPLETE"]) == 6  # 2 before the crash + 4 after
    assert len(by_state["FAIL"]) == 2  # the crashed one and the one left running
    # the trials finished before the crash are kept, not rerun
    first_two = [t["params"]["x"] for t in res.trials[:2]]
    assert first_two == seen[:2]
    # once complete, calling again runs nothing
    again = tune(lambda p, r: pytest.fail("ran a trial"), SPACE, 6, storage=storage)
    assert again.best_value == res.best_value


def test_tune_command_reports_best_against_defaults(tmp_path, capsys):
    out = tmp_path / "tune.json"
    argv = ["tune", "--tiny", "--trials", "2", "--epochs", "1", "--out", str(out)]
    assert cli.main(argv + ["--storage", str(tmp_path / "s.sqlite")]) == 0
    printed = capsys.readouterr().out
    assert "defaults" in printed and "best" in printed and "active parameters" in printed
    rep = json.loads(out.read_text())
    for name in ("defaults", "best"):
        assert 0.0 <= rep[name]["test_accuracy"] <= 1.0
        assert 0 < rep[name]["active_parameters"] <= rep[name]["total_parameters"]
    # the defaults were the first trial, so the best is at least as good on validation
    assert rep["trials"][0]["params"]["num_experts"] == rep["defaults"]["params"]["num_experts"]
    assert rep["best"]["val_accuracy"] >= rep["defaults"]["val_accuracy"] - 1e-9
