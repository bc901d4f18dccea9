"""Process-group setup and a small local launcher (tests, benchmarks, examples).

:func:`init_distributed` reads what ``torchrun`` sets (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``,
``MASTER_PORT``, ``LOCAL_RANK``) and initialises ``torch.distributed`` with a bounded timeout
(gloo on CPU, NCCL on GPU), so a rank that dies or stops answering makes the others fail with an
error instead of hanging. :func:`launch_local` starts ``nprocs`` copies of a Python module on this
machine with those variables set, one thread each, and waits for all with a timeout.
"""

from __future__ import annotations

import datetime
import os
import socket
import subprocess
import sys
import time
from typing import NamedTuple, Optional, Sequence

import torch
import torch.distributed as dist

__all__ = ["RankResult", "free_port", "init_distributed", "launch_local"]


def init_distributed(backend: Optional[str] = None, timeout_s: float = 60.0) -> tuple[int, int]:
    """Initialise the default process group from the ``torchrun`` environment (idempotent).

    backend: ``"gloo"`` or ``"nccl"`` (default: NCCL when CUDA is available, else gloo).
    timeout_s: how long a collective waits for a peer before failing (seconds, > 0).
    Returns ``(rank, world_size)``.
    """
    if not timeout_s > 0:
        raise ValueError(f"init_distributed: timeout_s must be > 0, got {timeout_s!r}")
    if not dist.is_initialized():
        missing = [
            v for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ
        ]
        if missing:
            raise RuntimeError(
                f"init_distributed: environment variables {missing} are not set; launch with "
                "torchrun (torchrun --nproc-per-node N ...) or moe_framework.distributed.launch_local"
            )
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size()


def free_port() -> int:
    """A TCP port free on this machine now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RankResult(NamedTuple):
    rank: int
    returncode: Optional[int]  # None: killed at the timeout
    stdout: str
    stderr: str


def launch_local(
    module: str,
    args: Sequence[str],
    nprocs: int,
    *,
    timeout_s: float = 120.0,
    threads: int = 1,
    env: Optional[dict] = None,
    python: Optional[str] = None,
) -> list[RankResult]:
    """Run ``python -m module *args`` (or ``python module *args`` when ``module`` is a ``.py``
    path) as ``nprocs`` ranks (a fresh port, ``threads`` threads each); wait for all of them at
    most ``timeout_s`` seconds, then kill the rest. A rank that fails does not stop the others:
    they must fail by themselves (that is what the fault tests check). ``python``: the
    interpreter (default this one; another virtual environment's for a peer baseline)."""
    port = free_port()
    run = [module] if module.endswith(".py") else ["-m", module]
    procs = []
    for rank in range(nprocs):
        e = dict(os.environ if env is None else env)
        e.update(
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(nprocs),
            LOCAL_WORLD_SIZE=str(nprocs),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            OMP_NUM_THREADS=str(threads),
            MKL_NUM_THREADS=str(threads),
        )
        procs.append(
            subprocess.Popen(
                [python or sys.executable, *run, *args],
                env=e,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    deadline = time.monotonic() + timeout_s
    results = []
    for rank, p in enumerate(procs):
        try:
            out, err = p.communicate(timeout=max(0.1, deadline - time.monotonic()))
            results.append(RankResult(rank, p.returncode, out, err))
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate()
            results.append(RankResult(rank, None, out, err))
    return results
