"""Hyperparameter search on Optuna: TPE sampling, median pruning, a SQLite study that resumes.

>>> from moe_framework.tuning import tune
>>> def train_fn(params, report):
...     acc = 0.0
...     for epoch in range(5):
...         acc = train_one_epoch(params)          # your training
...         report(epoch, acc)                     # may stop the trial (pruned)
...     return acc
>>> result = tune(train_fn, {"num_experts": [4, 8], "lr": (1e-4, 1e-2, "log")}, n_trials=20,
...               storage="study.sqlite")
>>> result.best_params, result.best_value

A search space maps each name to a list (a categorical choice: ``[4, 8, 16]``, ``[None, 1.25]``),
a ``(low, high)`` pair (ints: an integer range; floats: a float range) or ``(low, high, "log")``
(a log-scaled range). ``train_fn(params, report)`` trains with ``params`` and returns the objective
(higher is better unless ``direction="minimize"``); it may call ``report(step, value)`` with
intermediate values, which raises :class:`optuna.TrialPruned` when the median pruner stops the
trial (let it propagate).

With ``storage`` (a path, or an SQLAlchemy URL such as ``sqlite:///study.sqlite``) every trial is
committed to SQLite as it finishes: calling :func:`tune` again with the same storage and study name
resumes the study, runs only the trials still missing to reach ``n_trials`` finished ones, and
marks trials left running by a crashed process as failed (one process per study at a time).

``python -m moe_framework tune`` searches the demo task (:mod:`moe_framework.demo`: digits, two
MoE layers): experts, k, capacity factor, balancing-loss weights, aux-loss-free bias update rate,
router temperature, learning rate; it reports the best configuration against the defaults (test
accuracy and active parameters).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from typing import Callable, Optional

__all__ = ["tune", "TuneResult", "DEMO_SPACE", "suggest", "demo_train_fn", "run_demo_search"]

# The demo task's search space (MoEConfig fields plus the learning rate "lr").
DEMO_SPACE: dict = {
    "num_experts": [4, 8],
    "k": [1, 2],
    "capacity_factor": [None, 1.25, 2.0],
    "load_balance_coef": (1e-4, 1e-1, "log"),
    "z_loss_coef": (1e-5, 1e-2, "log"),
    "bias_update_rate": [0.0, 1e-3, 1e-2],
    "temperature": (0.5, 2.0),
    "lr": (1e-3, 3e-2, "log"),
}
# The demo's values of the searched knobs (the baseline the best trial is compared against).
DEMO_DEFAULTS: dict = {
    "num_experts": 8,
    "k": 2,
    "capacity_factor": None,
    "load_balance_coef": 1e-2,
    "z_loss_coef": 1e-3,
    "bias_update_rate": 0.0,
    "temperature": 1.0,
    "lr": 1e-2,
}


def _optuna():
    try:
        import optuna
    except ImportError as exc:  # an optional dependency: pip install moe_framework[tune]
        raise ImportError(
            "moe_framework.tuning needs optuna: pip install 'moe_framework[tune]' (or optuna)"
        ) from exc
    return optuna


def suggest(trial, space: dict) -> dict:
    """Draw one value per entry of ``space`` (format: the module docstring) from ``trial``."""
    params = {}
    for name, spec in space.items():
        if isinstance(spec, list):
            if not spec:
                raise ValueError(f"tune: space[{name!r}] is an empty list of choices")
            params[name] = trial.suggest_categorical(name, spec)
        elif isinstance(spec, tuple) and len(spec) in (2, 3):
            lo, hi = spec[0], spec[1]
            log = len(spec) == 3 and spec[2] == "log"
            if len(spec) == 3 and not log:
                raise ValueError(f"tune: space[{name!r}] third item must be 'log', got {spec[2]!r}")
            if not lo <= hi:
                raise ValueError(f"tune: space[{name!r}] needs low <= high, got {spec}")
            if all(isinstance(v, int) and not isinstance(v, bool) for v in (lo, hi)):
                params[name] = trial.suggest_int(name, lo, hi, log=log)
            else:
                params[name] = trial.suggest_float(name, float(lo), float(hi), log=log)
        else:
            raise ValueError(
                f"tune: space[{name!r}] must be a list of choices, (low, high) or "
                f"(low, high, 'log'), got {spec!r}"
            )
    return params


@dataclass
class TuneResult:
    """The study's outcome: best parameters and value, and every finished trial."""

    best_params: dict
    best_value: float
    trials: list  # dicts: number, state, value, params
    study_name: str
    storage: Optional[str]

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def _storage_url(storage: Optional[str]) -> Optional[str]:
    if storage is None or "://" in storage:
        return storage
    return f"sqlite:///{os.path.abspath(storage)}"


def tune(
    train_fn: Callable[[dict, Callable[[int, float], None]], float],
    space: dict,
    n_trials: int,
    *,
    storage: Optional[str] = None,
    study_name: str = "moe_framework",
    direction: str = "maximize",
    seed: int = 0,
    n_startup_trials: int = 5,
    n_warmup_steps: int = 1,
    timeout: Optional[float] = None,
    enqueue: Optional[dict] = None,
) -> TuneResult:
    """Search ``space`` with ``n_trials`` finished trials in all (resumed ones included).

    TPE sampler (``seed``; random for the first ``n_startup_trials``), median pruner (no pruning
    before ``n_startup_trials`` trials finished or before step ``n_warmup_steps``). ``enqueue``: a
    parameter set to try first (e.g. the defaults), once per study. An exception from
    ``train_fn`` other than a prune marks its trial failed in the storage and propagates.
    """
    optuna = _optuna()
    if not isinstance(n_trials, int) or n_trials < 1:
        raise ValueError(f"tune: n_trials must be an int >= 1, got {n_trials!r}")
    if direction not in ("maximize", "minimize"):
        raise ValueError(f"tune: direction must be 'maximize' or 'minimize', got {direction!r}")
    if not isinstance(space, dict) or not space:
        raise ValueError(f"tune: space must be a non-empty dict, got {space!r}")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        study_name=study_name,
        storage=_storage_url(storage),
        load_if_exists=True,
        direction=direction,
        sampler=optuna.samplers.TPESampler(seed=seed, n_startup_trials=n_startup_trials),
        pruner=optuna.pruners.MedianPruner(
            n_startup_trials=n_startup_trials, n_warmup_steps=n_warmup_steps
        ),
    )
    TS = optuna.trial.TrialState
    # Trials a crashed process left running can never finish: mark them failed.
    for t in study.get_trials(deepcopy=False, states=(TS.RUNNING,)):
        study._storage.set_trial_state_values(t._trial_id, TS.FAIL)
    if enqueue is not None and not study.trials:
        study.enqueue_trial(enqueue)

    def objective(trial) -> float:
        params = suggest(trial, space)

        def report(step: int, value: float) -> None:
            trial.report(float(value), int(step))
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned at step {step} (value {value})")

        value = float(train_fn(params, report))
        if not math.isfinite(value):
            raise optuna.TrialPruned(f"non-finite objective {value}")
        return value

    done = len(study.get_trials(deepcopy=False, states=(TS.COMPLETE, TS.PRUNED)))
    remaining = n_trials - done
    if remaining > 0:
        study.optimize(objective, n_trials=remaining, timeout=timeout)
    trials = [
        {"number": t.number, "state": t.state.name, "value": t.value, "params": t.params}
        for t in study.get_trials(deepcopy=False)
    ]
    complete = [t for t in trials if t["state"] == "COMPLETE"]
    if not complete:
        raise RuntimeError(f"tune: no trial of study {study_name!r} completed")
    return TuneResult(study.best_params, study.best_value, trials, study_name, storage)


# ====================================================================== the demo task


def _demo_data(seed: int, tiny: bool):
    """Digits split train / validation / test (the demo's split; validation from its train)."""
    import torch

    from .demo import load_digits_split

    x_tr, y_tr, x_te, y_te = load_digits_split(seed, tiny)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(x_tr.shape[0], generator=g)
    n_val = x_tr.shape[0] // 5
    val, tr = perm[:n_val], perm[n_val:]
    return x_tr[tr], y_tr[tr], x_tr[val], y_tr[val], x_te, y_te


def _train_demo(params: dict, data, epochs: int, seed: int, report=None, tiny: bool = False):
    """Train the demo model with ``params``; returns (model, validation accuracy, config)."""
    import torch

    from .demo import demo_config
    from .system import MixtureOfExpertsSystem

    x_tr, y_tr, x_val, y_val = data[:4]
    cfg_params = {k: v for k, v in params.items() if k != "lr"}
    base = demo_config("unused", tiny, 1, seed)
    cfg = base.replace(kg_path=None, consolidation_interval=0, track_stats=False, **cfg_params)
    torch.manual_seed(seed)
    model = MixtureOfExpertsSystem(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=params.get("lr", DEMO_DEFAULTS["lr"]))
    g = torch.Generator().manual_seed(seed)
    batch = 64
    acc = 0.0
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(x_tr.shape[0], generator=g)
        for i in range(0, x_tr.shape[0], batch):
            idx = perm[i : i + batch]
            model.training_step((x_tr[idx], y_tr[idx]), opt)
        acc = _accuracy(model, x_val, y_val)
        if report is not None:
            report(epoch, acc)
    return model, acc, cfg


def _accuracy(model, x, y) -> float:
    import torch

    model.eval()
    with torch.no_grad():
        return float((model(x).output.argmax(-1) == y).float().mean())


def demo_train_fn(epochs: int = 5, seed: int = 0, tiny: bool = False):
    """A ``train_fn`` for :func:`tune` on the demo task (objective: validation accuracy)."""
    data = _demo_data(seed, tiny)

    def train_fn(params: dict, report) -> float:
        return _train_demo(params, data, epochs, seed, report, tiny)[1]

    return train_fn


def run_demo_search(
    n_trials: int,
    *,
    epochs: int = 5,
    storage: Optional[str] = None,
    seed: int = 0,
    tiny: bool = False,
    space: Optional[dict] = None,
) -> dict:
    """Search the demo task, then retrain the best and the default configurations and compare
    them on the held-out test split: accuracy and active parameters per token."""
    from .demo import count_active_parameters

    space = space or DEMO_SPACE
    data = _demo_data(seed, tiny)

    def train_fn(params: dict, report) -> float:
        return _train_demo(params, data, epochs, seed, report, tiny)[1]

    t0 = time.perf_counter()
    res = tune(
        train_fn,
        space,
        n_trials,
        storage=storage,
        seed=seed,
        enqueue={k: v for k, v in DEMO_DEFAULTS.items() if k in space},
        n_startup_trials=min(5, max(1, n_trials // 2)),
    )
    out: dict = {"n_trials": n_trials, "epochs": epochs, "search_seconds": time.perf_counter() - t0}
    for name, params in (
        ("defaults", DEMO_DEFAULTS),
        ("best", {**DEMO_DEFAULTS, **res.best_params}),
    ):
        model, val_acc, cfg = _train_demo(params, data, epochs, seed, None, tiny)
        out[name] = {
            "params": params,
            "val_accuracy": val_acc,
            "test_accuracy": _accuracy(model, data[4], data[5]),
            "active_parameters": count_active_parameters(model, cfg)["active"],
            "total_parameters": count_active_parameters(model, cfg)["total"],
        }
    out["trials"] = res.trials
    return out


# ====================================================================== command line


def add_parser(sub) -> None:
    from .cli import _int_in

    p = sub.add_parser("tune", help="Optuna search of the demo task's hyperparameters")
    p.add_argument("--trials", type=_int_in(1, 10_000), default=20)
    p.add_argument("--epochs", type=_int_in(1, 1000), default=5, help="epochs per trial")
    p.add_argument("--storage", default=None, help="SQLite file of the study (resumable)")
    p.add_argument("--seed", type=_int_in(0, 2**32 - 1), default=0)
    p.add_argument("--tiny", action="store_true", help="a small slice of the data (smoke runs)")
    p.add_argument("--threads", type=_int_in(0, 4096), default=1, help="torch threads (0: default)")
    p.add_argument("--out", default=None, help="write the report as JSON here")
    p.set_defaults(func=cmd_tune)


def cmd_tune(args) -> int:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    rep = run_demo_search(
        args.trials, epochs=args.epochs, storage=args.storage, seed=args.seed, tiny=args.tiny
    )
    for name in ("defaults", "best"):
        r = rep[name]
        print(
            f"{name:8s} test accuracy {r['test_accuracy']:.4f}  validation {r['val_accuracy']:.4f}"
            f"  active parameters {r['active_parameters']}  {json.dumps(r['params'])}"
        )
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(rep, f, indent=2, default=str)
        print(f"wrote {args.out}")
    return 0
