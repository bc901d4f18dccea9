"""Child processes for the knowledge-graph crash tests (imported by a forkserver, so each child
starts in milliseconds instead of re-importing torch)."""

import os
import signal

import numpy as np

from moe_framework.knowledge_graph import KnowledgeGraph

DIM = 16
NODES_PER_TXN = 3


def txn_embeddings(txn: int) -> np.ndarray:
    """The nodes transaction ``txn`` writes: a pure function of ``txn`` so the parent can check."""
    return np.random.default_rng(txn).standard_normal((NODES_PER_TXN, DIM)).astype(np.float32)


def write_forever(path: str, ack_path: str, first_txn: int) -> None:
    """Write transactions first_txn, first_txn+1, ... forever; after each COMMIT returns, append
    the transaction id to ``ack_path`` (unbuffered write(2): the parent sees every ack written
    before the SIGKILL)."""
    ack = os.open(ack_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    kg = KnowledgeGraph.open(path, dim=DIM, merge_threshold=0.999, verify="none")
    txn = first_txn
    while True:
        emb = txn_embeddings(txn)
        if txn % 3 == 0:
            res = kg.add_or_update_batch(
                emb, "t", [{"txn": txn, "k": k} for k in range(NODES_PER_TXN)]
            )
            ids = [r.node_id for r in res]
        else:
            ids = kg.add_nodes_batch(emb, "t", [{"txn": txn, "k": k} for k in range(NODES_PER_TXN)])
        if txn % 2 == 0:
            kg.add_edges_batch([(int(ids[0]), int(ids[k]), "t", float(txn)) for k in (1, 2)])
        os.write(ack, b"%d\n" % txn)
        txn += 1


def checkpoint_and_die(path: str, stage: str, count: int) -> None:
    """Take checkpoints; SIGKILL ourselves the ``count``-th time the checkpoint reaches ``stage``."""
    kg = KnowledgeGraph.open(path, dim=DIM, keep_checkpoints=2, verify="none")
    seen = [0]

    def hook(s):
        if s == stage:
            seen[0] += 1
            if seen[0] == count:
                os.kill(os.getpid(), signal.SIGKILL)

    kg._checkpoint_hook = hook
    for txn in range(10):
        kg.add_nodes_batch(txn_embeddings(1000 + txn), "t", [{"txn": 1000 + txn}] * NODES_PER_TXN)
        kg.checkpoint()
    os._exit(3)  # the kill never came: the parent treats exit code 3 as a test failure


def hold_open_for_writing(path: str, ready_path: str) -> None:
    kg = KnowledgeGraph.open(path, dim=DIM)
    with open(ready_path, "w") as f:
        f.write("ready")
    signal.pause()
    kg.close()


def write_and_die(path: str) -> None:
    """Commit a few nodes, then SIGKILL ourselves: the committed transactions stay in the
    store's -wal file (a writer that did not close cleanly)."""
    kg = KnowledgeGraph.open(path, dim=DIM, verify="none")
    kg.add_nodes_batch(txn_embeddings(7), "t", [{"txn": 7}] * NODES_PER_TXN)
    os.kill(os.getpid(), signal.SIGKILL)


UNPRIVILEGED_UID = 65534  # "nobody"


def open_unprivileged(path: str, readonly: bool, conn) -> None:
    """Open the store as an unprivileged user and report through the pipe ``conn``:
    ``("ok", node ids)`` or ``(exception type name, message)``.

    Tests run as root in some environments, and root ignores permission bits, so a folder with
    mode 0555 would not be read-only media for it; the child drops to ``nobody`` first."""
    if os.geteuid() == 0:
        os.setgid(UNPRIVILEGED_UID)
        os.setuid(UNPRIVILEGED_UID)
    try:
        with KnowledgeGraph.open(path, dim=None if readonly else DIM, readonly=readonly) as kg:
            conn.send(("ok", kg.node_ids().tolist()))
    except Exception as exc:
        conn.send((type(exc).__name__, str(exc)))
