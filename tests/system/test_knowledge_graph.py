"""KnowledgeGraph: durable SQLite store, derived FAISS index, traversal, checkpoints, export."""

import contextlib
import multiprocessing as mp
import os
import pickle
import random
import signal
import sqlite3
import sys
import tempfile
import threading
import time

import networkx as nx
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moe_framework.knowledge_graph import (
    KnowledgeGraph,
    KnowledgeGraphError,
    StoreLockedError,
)

sys.path.insert(0, os.path.dirname(__file__))
import kg_crash_worker as worker  # noqa: E402


def _rng(seed):
    return np.random.default_rng(seed)


def _unit(x):
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _store(tmp_path, dim=8, **kw):
    return KnowledgeGraph.open(tmp_path / "kg.sqlite", dim=dim, **kw)


def _forkserver():
    # Children forked from a server that already imported the package start in milliseconds.
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["moe_framework.knowledge_graph"])
    return ctx


@contextlib.contextmanager
def _writer_in_child(path, ready):
    """Another process holds the store at ``path`` open for writing while the block runs; it is
    SIGKILLed afterwards (its lock goes with it)."""
    child = _forkserver().Process(target=worker.hold_open_for_writing, args=(str(path), str(ready)))
    child.start()
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert child.is_alive() and time.monotonic() < deadline
            time.sleep(0.01)
        yield child
    finally:
        if child.is_alive():
            os.kill(child.pid, signal.SIGKILL)
        child.join()


# ============================================================================ round trip

_json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8)
)
_json = st.recursive(
    _json_scalars,
    lambda kids: (
        st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=5), kids, max_size=3)
    ),
    max_leaves=8,
)
_finite_f32 = st.floats(allow_nan=False, allow_infinity=False, width=32)


@st.composite
def _graphs(draw):
    dim = draw(st.integers(1, 6))
    n = draw(st.integers(0, 12))
    emb = []
    for _ in range(n):
        v = draw(st.lists(_finite_f32, min_size=dim, max_size=dim))
        if not any(v):
            v[0] = 1.0  # zero vectors are refused (cosine undefined)
        emb.append(v)
    types = draw(st.lists(st.sampled_from(["a", "report", "ü"]), min_size=n, max_size=n))
    metas = draw(
        st.lists(st.dictionaries(st.text(max_size=6), _json, max_size=4), min_size=n, max_size=n)
    )
    edges = []
    if n:
        m = draw(st.integers(0, 2 * n))
        for _ in range(m):
            edges.append(
                (
                    draw(st.integers(0, n - 1)),
                    draw(st.integers(0, n - 1)),
                    draw(st.sampled_from(["sim", "cites"])),
                    draw(st.floats(-1e6, 1e6, allow_nan=False)),
                )
            )
    return dim, np.asarray(emb, np.float32).reshape(n, dim), types, metas, edges


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_graphs())
def test_round_trip_reopen_gives_identical_ids_embeddings_metadata_edges(g):
    dim, emb, types, metas, edges = g
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "kg.sqlite")
        with KnowledgeGraph.open(path, dim=dim) as kg:
            ids = kg.add_nodes_batch(emb, types, metas) if len(emb) else np.zeros(0, np.int64)
            expected_edges = {}
            for a, b, t, w in edges:
                kg.add_edge(int(ids[a]), int(ids[b]), t, w)
                expected_edges[(int(ids[a]), int(ids[b]), t)] = w  # re-adding re-weights
            before = list(kg.iter_nodes())
        with KnowledgeGraph.open(path, readonly=True, verify="full") as kg:
            after = list(kg.iter_nodes())
            assert [n.id for n in after] == ids.tolist()
            for n, e, t, m, b in zip(after, emb, types, metas, before):
                assert n.embedding.tobytes() == e.tobytes()  # bitwise
                assert n.type == t
                assert n.metadata == m
                assert (n.created_at, n.updated_at) == (b.created_at, b.updated_at)
            assert {(s, t, ty): w for s, t, ty, w in kg.edges()} == expected_edges


# ============================================================================ merge rule


def test_report_above_threshold_merges_with_ema_and_keeps_provenance(tmp_path, seed):
    rng = _rng(seed)
    with _store(tmp_path, dim=16, merge_threshold=0.8, ema_rate=0.25) as kg:
        base = rng.standard_normal((3, 16)).astype(np.float32)
        ids = kg.add_nodes_batch(
            base, "n", [{"name": "a", "keep": 1}, {"name": "b"}, {"name": "c"}]
        )
        report = (base[0] + 0.05 * rng.standard_normal(16)).astype(np.float32)
        res = kg.add_or_update_node(report, "r", {"name": "a2", "extra": True}, {"layer": 4})
        assert res.action == "merged" and res.node_id == ids[0]
        expected_sim = float(_unit(base[0]) @ _unit(report))
        assert res.similarity == pytest.approx(expected_sim, abs=1e-5)
        node = kg.get_node(ids[0])
        ema = (0.75 * base[0].astype(np.float64) + 0.25 * report.astype(np.float64)).astype(
            np.float32
        )
        np.testing.assert_array_equal(node.embedding, ema)
        assert node.metadata == {"name": "a2", "keep": 1, "extra": True}
        assert node.merge_count == 2
        prov = kg.get_provenance(ids[0])
        assert [p["action"] for p in prov] == ["merge"]
        assert prov[0]["source"] == {"layer": 4}
        assert prov[0]["metadata"] == {"name": "a2", "extra": True}
        assert prov[0]["embedding"].tobytes() == report.tobytes()
        # The index follows the merge: the node's new embedding is found with cosine 1.
        hit = kg.find_similar_nodes(ema, 1)[0]
        assert hit.id == ids[0] and hit.score == pytest.approx(1.0, abs=1e-6)
        assert len(kg) == 3


def test_merge_threshold_is_strict(tmp_path):
    e = np.eye(4, dtype=np.float32)
    with _store(tmp_path, dim=4, merge_threshold=1.0) as kg:
        kg.add_node(e[0])
        assert kg.add_or_update_node(e[0] * 3).action == "inserted"  # cosine 1.0, not > 1.0
    diag = np.array([1, 1, 0, 0], np.float32)  # cosine with e0 = 0.7071
    for threshold, action in ((0.70, "merged"), (0.71, "inserted")):
        path = tmp_path / f"t{threshold}.sqlite"
        with KnowledgeGraph.open(path, dim=4, merge_threshold=threshold) as kg:
            kg.add_node(e[0])
            assert kg.add_or_update_node(diag).action == action


def _naive_filing(reports, threshold, rate):
    """Direct float64 implementation of the merge rule, one report at a time."""
    nodes, actions = [], []
    for r in reports.astype(np.float64):
        if nodes:
            sims = np.array([_unit(n) @ _unit(r) for n in nodes])
            best = int(np.argmax(sims))
            if sims[best] > threshold:
                nodes[best] = (1 - rate) * nodes[best] + rate * r
                actions.append(("merged", best))
                continue
        nodes.append(r.copy())
        actions.append(("inserted", len(nodes) - 1))
    return nodes, actions


def test_batch_filing_matches_naive_sequential_merge_rule(tmp_path, seed):
    rng = _rng(seed)
    centers = _unit(rng.standard_normal((6, 32)))
    # Clusters well separated from the threshold: within ~0.99, across ~0 +- 0.2.
    reports = (centers[rng.integers(0, 6, 60)] + 0.01 * rng.standard_normal((60, 32))).astype(
        np.float32
    )
    nodes, actions = _naive_filing(reports, 0.8, 0.3)
    with _store(tmp_path, dim=32, merge_threshold=0.8, ema_rate=0.3) as kg:
        # Two batches: the second sees the first through the index, and itself sequentially.
        res = kg.add_or_update_batch(reports[:25]) + kg.add_or_update_batch(reports[25:])
        first_ids = {}
        for r, (act, k) in zip(res, actions):
            assert r.action == act
            first_ids.setdefault(k, r.node_id)
            assert r.node_id == first_ids[k]
        assert len(kg) == len(nodes)
        for k, n in enumerate(nodes):
            np.testing.assert_allclose(kg.get_node(first_ids[k]).embedding, n, rtol=1e-5, atol=1e-6)
        total = sum(len(kg.get_provenance(i)) for i in kg.node_ids())
        assert total == 60  # every report is kept


def test_merge_rule_bad_inputs_are_refused_without_writing(tmp_path):
    with _store(tmp_path, dim=4) as kg:
        for bad, msg in (
            (np.array([np.nan, 1, 0, 0]), "NaN"),
            (np.array([np.inf, 1, 0, 0]), "NaN or Inf"),
            (np.zeros(4), "zero norm"),
            (np.ones(5), r"shape \[n, 4\]"),
        ):
            with pytest.raises(ValueError, match=msg):
                kg.add_or_update_node(bad)
        with pytest.raises(ValueError, match="JSON"):
            kg.add_node(np.ones(4), metadata={"x": float("nan")})
        with pytest.raises(ValueError, match="JSON"):
            kg.add_node(np.ones(4), metadata={"x": object()})
        with pytest.raises(ValueError, match="metadatas has 1 entries for 2"):
            kg.add_nodes_batch(np.ones((2, 4)), "n", [{}])
        a = kg.add_node(np.ones(4))
        with pytest.raises(ValueError, match="node 99 does not exist"):
            kg.add_edge(a, 99)
        with pytest.raises(ValueError, match="finite"):
            kg.add_edge(a, a, "t", float("inf"))
        assert len(kg) == 1 and kg.num_edges() == 0
    with pytest.raises(ValueError, match="merge_threshold"):
        _store(tmp_path, dim=4, merge_threshold=1.5)
    with pytest.raises(ValueError, match="index_type"):
        _store(tmp_path, dim=4, index_type="lsh")


# ============================================================================ search


@pytest.mark.parametrize("n", [1, 7, 300])
def test_search_matches_brute_force_cosine(tmp_path, seed, n):
    rng = _rng(seed)
    emb = rng.standard_normal((n, 24)).astype(np.float32) * rng.uniform(0.1, 10, (n, 1))
    q = rng.standard_normal((5, 24)).astype(np.float32)
    with _store(tmp_path, dim=24) as kg:
        ids = kg.add_nodes_batch(emb)
        k = min(10, n + 3)
        scores, got = kg.search(q, k)
        sims = _unit(q) @ _unit(emb).T
        order = np.argsort(-sims, axis=1, kind="stable")[:, : min(k, n)]
        np.testing.assert_array_equal(got[:, : min(k, n)], ids[order])
        np.testing.assert_allclose(
            scores[:, : min(k, n)], np.take_along_axis(sims, order, 1), atol=1e-5
        )
        assert (got[:, n:] == -1).all() and np.isneginf(scores[:, n:]).all()
        s_t, i_t = kg.search(torch.from_numpy(q), k)  # torch tensors are accepted as well
        np.testing.assert_array_equal(i_t, got)
        hits = kg.find_similar_nodes(q[0], top_k=k, threshold=0.1)
        assert [h.id for h in hits] == [i for i, s in zip(got[0], scores[0]) if i >= 0 and s >= 0.1]


def test_search_on_empty_graph_returns_missing(tmp_path):
    with _store(tmp_path, dim=3) as kg:
        s, i = kg.search(np.ones((2, 3)), 4)
        assert i.shape == (2, 4) and (i == -1).all() and np.isneginf(s).all()
        assert kg.find_similar_nodes(np.ones(3)) == []
        with pytest.raises(ValueError, match="zero norm"):
            kg.search(np.zeros(3), 1)


@pytest.mark.parametrize("index_type", ["hnsw", "ivfpq"])
def test_approximate_index_returns_exact_scores_of_current_embeddings(tmp_path, seed, index_type):
    rng = _rng(seed)
    centers = _unit(rng.standard_normal((40, 32)))
    emb = (centers[rng.integers(0, 40, 3000)] + 0.2 * rng.standard_normal((3000, 32))).astype(
        np.float32
    )
    params = {"train_min": 1000, "nlist": 32} if index_type == "ivfpq" else None
    with _store(
        tmp_path, dim=32, index_type=index_type, index_params=params, merge_threshold=0.99
    ) as kg:
        ids = kg.add_nodes_batch(emb[:1500])
        kg.add_nodes_batch(emb[1500:])  # ivfpq trains once it has train_min vectors
        ids = kg.node_ids()
        q = emb[rng.integers(0, 3000, 50)] + 0.05 * rng.standard_normal((50, 32)).astype(np.float32)
        scores, got = kg.search(q, 10)
        sims = _unit(q) @ _unit(emb).T
        # Whatever was found, its score is the exact cosine with that node.
        for r in range(50):
            for s, i in zip(scores[r], got[r]):
                assert i >= 0
                assert s == pytest.approx(sims[r, i - ids[0]], abs=1e-5)
        exact = np.argsort(-sims, axis=1)[:, :10] + ids[0]
        recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got, exact)])
        assert recall >= (0.9 if index_type == "hnsw" else 0.6), recall
        # A merge moves a node; the approximate index must not keep serving the old vector.
        target = int(got[0, 0])
        moved = kg.get_node(target).embedding
        res = kg.add_or_update_node(moved * 1.0001)
        assert res.action == "merged" and res.node_id == target
        s2, i2 = kg.search(moved, 3)
        assert len(set(i2[0].tolist())) == 3 and i2[0, 0] == target


# ============================================================================ traversal


def _random_graph(kg, rng, n=40, m=90, dim=8):
    ids = kg.add_nodes_batch(rng.standard_normal((n, dim)).astype(np.float32))
    edges = []
    for _ in range(m):
        a, b = rng.choice(ids, 2)
        t = str(rng.choice(["sim", "cites"]))
        w = float(rng.uniform(0.1, 5.0))
        edges.append((int(a), int(b), t, w))
    kg.add_edges_batch(edges)
    return ids, {(a, b, t): w for a, b, t, w in edges}


def _oracle(edges, ids, direction, etype=None):
    g = nx.DiGraph() if direction != "both" else nx.Graph()
    g.add_nodes_from(int(i) for i in ids)
    for (a, b, t), w in edges.items():
        if etype is not None and t != etype:
            continue
        u, v = (a, b) if direction != "in" else (b, a)
        if g.has_edge(u, v):
            w = min(w, g[u][v]["weight"])
        g.add_edge(u, v, weight=w)
    return g


@pytest.mark.parametrize("direction", ["both", "out", "in"])
def test_traversal_matches_networkx(tmp_path, seed, direction):
    rng = _rng(seed)
    with _store(tmp_path) as kg:
        ids, edges = _random_graph(kg, rng)
        for etype in (None, "sim"):
            g = _oracle(edges, ids, direction, etype)
            for src in rng.choice(ids, 8):
                src = int(src)
                nb = kg.neighbors(src, type=etype, direction=direction)
                expect = set(g.neighbors(src))
                assert {n.id for n in nb} == expect
                for k in (0, 1, 2, 3):
                    assert kg.k_hop(src, k, type=etype, direction=direction) == dict(
                        nx.single_source_shortest_path_length(g, src, cutoff=k)
                    )
                dst = int(rng.choice(ids))
                path = kg.shortest_path(src, dst, type=etype, direction=direction)
                wpath = kg.shortest_path(src, dst, weighted=True, type=etype, direction=direction)
                if not nx.has_path(g, src, dst):
                    assert path is None and wpath is None
                    continue
                assert len(path) - 1 == nx.shortest_path_length(g, src, dst)
                assert path[0] == src and path[-1] == dst
                assert all(g.has_edge(u, v) for u, v in zip(path, path[1:]))
                length = sum(g[u][v]["weight"] for u, v in zip(wpath, wpath[1:]))
                assert length == pytest.approx(nx.dijkstra_path_length(g, src, dst))


def test_neighbors_report_edge_type_weight_and_direction(tmp_path):
    with _store(tmp_path, dim=2) as kg:
        a, b, c = kg.add_nodes_batch(np.eye(2, dtype=np.float32)[[0, 1, 0]]).tolist()
        kg.add_edge(a, b, "sim", 0.5)
        kg.add_edge(c, a, "cites", 2.0)
        kg.add_edge(a, b, "sim", 0.75)  # re-weight, not a second edge
        assert kg.neighbors(a) == [(b, "sim", 0.75, "out"), (c, "cites", 2.0, "in")]
        assert kg.neighbors(a, direction="out") == [(b, "sim", 0.75, "out")]
        assert kg.neighbors(a, type="cites") == [(c, "cites", 2.0, "in")]
        assert kg.shortest_path(b, c) == [b, a, c]
        assert kg.shortest_path(b, c, direction="out") is None
        kg.add_edge(b, c, "neg", -1.0)
        with pytest.raises(ValueError, match="non-negative"):
            kg.shortest_path(b, c, weighted=True, type="neg")
        with pytest.raises(KeyError):
            kg.k_hop(12345, 1)


# ============================================================================ bad files


def _populated(path, n=200, dim=8):
    with KnowledgeGraph.open(path, dim=dim) as kg:
        ids = kg.add_nodes_batch(np.random.default_rng(0).standard_normal((n, dim)))
        kg.add_edge(int(ids[0]), int(ids[1]), "t", 1.0)
    return ids


def test_foreign_sqlite_file_is_refused_and_left_untouched(tmp_path):
    path = tmp_path / "other.sqlite"
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE users (name TEXT)")
    con.execute("INSERT INTO users VALUES ('x')")
    con.commit()
    con.close()
    before = path.read_bytes()
    for kw in ({"dim": 8}, {"readonly": True}):
        with pytest.raises(KnowledgeGraphError, match="not a knowledge-graph store") as ei:
            KnowledgeGraph.open(path, **kw)
        assert isinstance(ei.value, ValueError)
    assert path.read_bytes() == before  # not even switched to WAL
    assert not os.path.exists(str(path) + "-wal")


class _Boom:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_pickle_or_torch_file_renamed_to_store_name_is_refused(tmp_path):
    path = tmp_path / "kg.sqlite"
    path.write_bytes(pickle.dumps({"nodes": [_Boom()]}, protocol=4))
    with pytest.raises(KnowledgeGraphError, match="pickle"):
        KnowledgeGraph.open(path, dim=8)
    torch.save({"w": torch.ones(2)}, path)
    with pytest.raises(KnowledgeGraphError, match="zip"):
        KnowledgeGraph.open(path, readonly=True)
    path.write_bytes(b"")
    with pytest.raises(KnowledgeGraphError, match="empty"):
        KnowledgeGraph.open(path, readonly=True)


@pytest.mark.parametrize("cut", [50, 0.5, 0.9])
def test_truncated_store_is_refused(tmp_path, cut):
    path = tmp_path / "kg.sqlite"
    _populated(path)
    data = path.read_bytes()
    n = cut if isinstance(cut, int) else int(len(data) * cut)
    path.write_bytes(data[:n])
    with pytest.raises(KnowledgeGraphError):
        KnowledgeGraph.open(path, readonly=True)


def test_corrupted_pages_are_refused(tmp_path, seed):
    path = tmp_path / "kg.sqlite"
    _populated(path, n=400)
    data = bytearray(path.read_bytes())
    page = 4096
    rng = random.Random(seed)
    for p in range(1, len(data) // page):  # keep the header page, scramble every other page
        lo = p * page
        data[lo : lo + page] = rng.randbytes(page)
    path.write_bytes(bytes(data))
    with pytest.raises(KnowledgeGraphError):
        KnowledgeGraph.open(path, readonly=True)


def _tamper(path, sql, *args):
    con = sqlite3.connect(path)
    con.execute("PRAGMA foreign_keys=OFF")
    con.execute(sql, args)
    con.commit()
    con.close()


@pytest.mark.parametrize(
    "sql,args,msg",
    [
        (
            "UPDATE nodes SET embedding = ? WHERE id = 3",
            (np.full(8, np.nan, np.float32).tobytes(),),
            "node 3 .*NaN",
        ),
        (
            "UPDATE nodes SET embedding = ? WHERE id = 4",
            (np.zeros(8, np.float32).tobytes(),),
            "node 4 .*zero",
        ),
        ("UPDATE nodes SET embedding = ? WHERE id = 5", (b"\x00" * 12,), "node 5 .*8 float32"),
        ("INSERT INTO edges VALUES (1, 999, 't', 1.0, 0)", (), "missing node"),
        ("UPDATE meta SET value = '9' WHERE key = 'dim'", (), "not 9 float32 values"),
        ("UPDATE nodes SET metadata = '{not json' WHERE id = 2", (), "invalid JSON"),
        ("PRAGMA user_version = 7", (), "schema version 7"),
    ],
)
def test_store_with_broken_invariants_is_refused(tmp_path, sql, args, msg):
    path = tmp_path / "kg.sqlite"
    _populated(path)
    _tamper(path, sql, *args)
    with pytest.raises(KnowledgeGraphError, match=msg):
        KnowledgeGraph.open(path, readonly=True)


def test_dimension_mismatch_is_refused(tmp_path):
    path = tmp_path / "kg.sqlite"
    _populated(path, dim=8)
    with pytest.raises(KnowledgeGraphError, match="dim 8, opened with dim=16"):
        KnowledgeGraph.open(path, dim=16)
    with pytest.raises(FileNotFoundError):
        KnowledgeGraph.open(tmp_path / "missing.sqlite")
    with pytest.raises(FileExistsError):
        KnowledgeGraph.create(path, dim=8)


# ============================================================================ writers / readers


def test_second_writer_is_refused_in_process_and_across_processes(tmp_path):
    path = tmp_path / "kg.sqlite"
    with KnowledgeGraph.open(path, dim=worker.DIM) as kg:
        kg.add_node(np.ones(worker.DIM))
        with pytest.raises(StoreLockedError, match="already open for writing"):
            KnowledgeGraph.open(path, dim=worker.DIM)
        with KnowledgeGraph.open(path, readonly=True) as ro:  # readers are welcome
            assert len(ro) == 1
            with pytest.raises(PermissionError):
                ro.add_node(np.ones(worker.DIM))
    with _writer_in_child(path, tmp_path / "ready"):
        with pytest.raises(StoreLockedError):
            KnowledgeGraph.open(path, dim=worker.DIM)
    with KnowledgeGraph.open(path, dim=worker.DIM) as kg:  # the dead writer's lock went with it
        assert len(kg) == 1


def test_searches_from_threads_during_batched_writes_are_consistent(tmp_path, seed):
    rng = _rng(seed)
    dim = 32
    anchors = rng.standard_normal((8, dim)).astype(np.float32)
    errors = []
    stop = threading.Event()
    with _store(tmp_path, dim=dim, merge_threshold=0.999) as kg:
        anchor_ids = kg.add_nodes_batch(anchors, "anchor")

        def reader(r):
            try:
                local = np.random.default_rng(r)
                while not stop.is_set():
                    a = int(local.integers(0, 8))
                    hits = kg.find_similar_nodes(anchors[a], top_k=5)
                    assert hits[0].id == anchor_ids[a] and hits[0].type == "anchor"
                    assert hits[0].score == pytest.approx(1.0, abs=1e-5)
                    assert all(x.score >= y.score for x, y in zip(hits, hits[1:]))
                    for h in hits[1:]:  # every hit exists and its score is its cosine
                        e = kg.get_node(h.id).embedding
                        assert h.score == pytest.approx(
                            float(_unit(e) @ _unit(anchors[a])), abs=1e-5
                        )
            except BaseException as exc:  # surfaced below
                errors.append(exc)

        threads = [threading.Thread(target=reader, args=(r,)) for r in range(4)]
        for t in threads:
            t.start()
        # Random batches (no merges with the anchors: random 32-d vectors are far from them).
        for _ in range(30):
            batch = rng.standard_normal((50, dim)).astype(np.float32)
            kg.add_or_update_batch(batch, "x") if rng.random() < 0.5 else kg.add_nodes_batch(batch)
        stop.set()
        for t in threads:
            t.join()
        assert not errors, errors[0]
        assert len(kg) == 8 + 30 * 50


# ============================================================================ crash safety


def _read_acks(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [int(x) for x in f.read().split()]


def test_sigkilled_writer_never_loses_a_committed_transaction(tmp_path, seed):
    rng = random.Random(seed)
    path = str(tmp_path / "kg.sqlite")
    ctx = _forkserver()
    acked: list = []
    n_kills = 20
    t_start = time.monotonic()
    for round_ in range(n_kills):
        ack_path = str(tmp_path / f"acks-{round_}")
        first = round_ * 1_000_000
        child = ctx.Process(target=worker.write_forever, args=(path, ack_path, first))
        child.start()
        deadline = time.monotonic() + 60
        while not _read_acks(ack_path):  # kill while writing, not while starting
            assert child.is_alive() and time.monotonic() < deadline, "writer did not start"
            time.sleep(0.002)
        time.sleep(rng.uniform(0.0, 0.25))
        os.kill(child.pid, signal.SIGKILL)
        child.join()
        assert child.exitcode == -signal.SIGKILL
        acks = _read_acks(ack_path)
        assert acks == list(range(first, first + len(acks)))
        acked += acks
        con = sqlite3.connect(path)
        assert con.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        con.close()
        with KnowledgeGraph.open(path, readonly=True, verify="full") as kg:
            present = {}
            for n in kg.iter_nodes():
                present.setdefault(n.metadata["txn"], []).append(n)
            for txn in acked:
                nodes = present.get(txn)
                assert nodes is not None, f"acknowledged transaction {txn} lost (round {round_})"
            # Atomicity: a transaction is there with all its nodes (and edges) or not at all.
            for txn, nodes in present.items():
                assert len(nodes) == worker.NODES_PER_TXN
                expected = worker.txn_embeddings(txn)
                for n in nodes:
                    assert n.embedding.tobytes() == expected[n.metadata["k"]].tobytes()
            unacked = set(present) - set(acked)
            assert len(unacked) <= round_ + 1  # at most the one in flight per kill
            edges_by_txn = {}
            for _s, _d, _t, w in kg.edges():
                edges_by_txn[int(w)] = edges_by_txn.get(int(w), 0) + 1
            acked_set = set(acked)
            for txn in present:  # nodes and edges are two transactions: the ack follows both
                want = 2 if txn % 2 == 0 else 0
                got = edges_by_txn.get(txn, 0)
                assert got == want or (txn not in acked_set and got == 0)
    assert len(acked) > n_kills
    assert time.monotonic() - t_start < 120


# ============================================================================ checkpoints


def test_checkpoints_are_consistent_snapshots_and_rotate(tmp_path, seed):
    rng = _rng(seed)
    with _store(tmp_path, dim=8, keep_checkpoints=3) as kg:
        sizes = []
        for i in range(5):
            kg.add_nodes_batch(rng.standard_normal((10, 8)), "n", [{"i": i}] * 10)
            snap = kg.checkpoint()
            sizes.append(len(kg))
            assert os.path.basename(snap) == f"snapshot-{i + 1:08d}.sqlite"
        snaps = kg.list_checkpoints()
        assert [os.path.basename(s) for s in snaps] == [
            f"snapshot-{i:08d}.sqlite" for i in (3, 4, 5)
        ]
        for s, n in zip(snaps, sizes[2:]):
            assert not os.path.exists(s + "-wal")
            with KnowledgeGraph.open(s, readonly=True, verify="full") as snap_kg:
                assert len(snap_kg) == n
                assert snap_kg.get_node(1).embedding.tobytes() == kg.get_node(1).embedding.tobytes()
    with KnowledgeGraph.open(tmp_path / "ro.sqlite", dim=8) as kg:
        pass
    with KnowledgeGraph.open(tmp_path / "ro.sqlite", readonly=True) as kg:
        with pytest.raises(PermissionError):
            kg.checkpoint()


@pytest.mark.parametrize(
    "stage,count",
    [
        ("written", 3),
        ("fsynced", 3),
        ("renamed", 3),
        ("dir_fsynced", 4),
        ("removed", 1),
        ("removed", 2),
    ],
)
def test_crash_during_checkpoint_rotation_leaves_good_snapshots(tmp_path, stage, count):
    path = str(tmp_path / "kg.sqlite")
    ctx = _forkserver()
    child = ctx.Process(target=worker.checkpoint_and_die, args=(path, stage, count))
    child.start()
    child.join(120)
    assert child.exitcode == -signal.SIGKILL, "the child was expected to die mid-checkpoint"
    with KnowledgeGraph.open(path, dim=worker.DIM) as kg:
        good = kg.list_checkpoints()
        assert len(good) >= 1
        for s in good:
            with KnowledgeGraph.open(s, readonly=True, verify="full") as snap:
                assert len(snap) % worker.NODES_PER_TXN == 0 and len(snap) > 0
        kg.checkpoint()  # the next checkpoint cleans up after the crash
        assert not [f for f in os.listdir(kg.checkpoint_dir) if ".tmp-" in f]
        assert len(kg.list_checkpoints()) <= kg.keep_checkpoints


# ============================================================================ export


def test_json_and_graphml_exports_hold_the_graph(tmp_path, seed):
    import json

    rng = _rng(seed)
    with _store(tmp_path, dim=4) as kg:
        emb = rng.standard_normal((6, 4)).astype(np.float32)
        ids = kg.add_nodes_batch(
            emb, "report", [{"expert": i % 3, "label": f"<n{i}&>"} for i in range(6)]
        )
        kg.add_edges_batch([(int(ids[i]), int(ids[i + 1]), "sim", 0.5 + i) for i in range(5)])
        kg.to_json(tmp_path / "g.json")
        kg.to_graphml(tmp_path / "g.graphml")
    doc = json.loads((tmp_path / "g.json").read_text())
    assert doc["dim"] == 4 and [n["id"] for n in doc["nodes"]] == ids.tolist()
    for n, e in zip(doc["nodes"], emb):
        assert np.asarray(n["embedding"], np.float32).tobytes() == e.tobytes()
    assert [(e["src"], e["dst"], e["weight"]) for e in doc["edges"]] == [
        (int(ids[i]), int(ids[i + 1]), 0.5 + i) for i in range(5)
    ]
    g = nx.read_graphml(tmp_path / "g.graphml")
    assert g.is_directed() and g.number_of_nodes() == 6 and g.number_of_edges() == 5
    n0 = g.nodes[f"n{ids[0]}"]
    assert n0["type"] == "report" and n0["meta_expert"] == 0 and n0["meta_label"] == "<n0&>"
    assert json.loads(n0["metadata"]) == {"expert": 0, "label": "<n0&>"}
    assert g.edges[f"n{ids[0]}", f"n{ids[1]}"]["weight"] == 0.5


def test_draw_writes_png_coloured_by_expert(tmp_path, seed):
    import matplotlib.image as mpimg

    rng = _rng(seed)
    with _store(tmp_path, dim=8) as kg:
        ids = kg.add_nodes_batch(
            rng.standard_normal((30, 8)), "r", [{"expert": i % 4} for i in range(30)]
        )
        kg.add_edges_batch([(int(ids[i]), int(ids[(i * 7) % 30]), "sim", 0.5) for i in range(30)])
        kg.draw(tmp_path / "g.png", nodes=ids[:20], color_by="expert")
        with pytest.raises(ValueError, match="max_nodes"):
            kg.draw(tmp_path / "big.png", nodes=ids, max_nodes=10)
    raw = (tmp_path / "g.png").read_bytes()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    img = mpimg.imread(tmp_path / "g.png")[..., :3]
    colours = {tuple(np.round(p, 2)) for p in img.reshape(-1, 3)[::7]}
    assert len(colours) > 4  # four experts in four colours (plus white, grey edges, black)


# ============================================================================ device bank


def test_device_bank_search_matches_store_and_follows_writes(tmp_path, seed):
    rng = _rng(seed)
    with _store(tmp_path, dim=16, merge_threshold=0.95, ema_rate=0.5) as kg:
        kg.add_nodes_batch(rng.standard_normal((40, 16)))
        bank = kg.device_bank(capacity=128)
        q = rng.standard_normal((5, 16)).astype(np.float32)
        fn = torch.compile(bank.search, fullgraph=True, backend="aot_eager")
        for step in range(3):
            scores, ids = fn(torch.from_numpy(q), 8)
            ref_s, ref_i = kg.search(q, 8)
            np.testing.assert_array_equal(ids.numpy(), ref_i)
            np.testing.assert_allclose(scores.numpy(), ref_s, atol=1e-5)
            # Writes reach the bank in place (no reallocation below capacity): the compiled
            # search sees them through n_valid and the rows it reads.
            before = bank.bank.data_ptr()
            kg.add_nodes_batch(rng.standard_normal((10, 16)))
            node = int(ref_i[0, 0])
            kg.add_or_update_node(kg.get_node(node).embedding + 0.01)
            assert bank.bank.data_ptr() == before and int(bank.n_valid) == 50 + 10 * step
        s, i = bank.search(torch.from_numpy(q), 100)  # k > n_valid: -1 padded
        assert (i[:, len(kg) :] == -1).all() and torch.isneginf(s[:, len(kg) :]).all()


def test_failed_index_update_keeps_the_write_and_rebuilds_the_index(tmp_path, monkeypatch, seed):
    rng = _rng(seed)
    with _store(tmp_path, dim=8) as kg:
        kg.add_nodes_batch(rng.standard_normal((5, 8)))
        x = rng.standard_normal(8).astype(np.float32)

        def broken(*args):
            raise MemoryError("simulated")

        monkeypatch.setattr(kg._index, "add", broken)
        with pytest.warns(RuntimeWarning, match="rebuilding it from the store"):
            new = kg.add_node(x)
        monkeypatch.undo()
        assert len(kg) == 6 and kg.get_node(new).embedding.tobytes() == x.tobytes()
        hit = kg.find_similar_nodes(x, 1)[0]  # the index was rebuilt from the store
        assert hit.id == new and hit.score == pytest.approx(1.0, abs=1e-6)


def test_backup_writes_a_consistent_standalone_copy(tmp_path, seed):
    rng = _rng(seed)
    with _store(tmp_path, dim=8) as kg:
        ids = kg.add_nodes_batch(rng.standard_normal((20, 8)), "n", [{"i": i} for i in range(20)])
        kg.add_edge(int(ids[0]), int(ids[1]), "t", 0.5)
        out = kg.backup(tmp_path / "copy.sqlite")
        with pytest.raises(ValueError, match="store itself"):
            kg.backup(tmp_path / "kg.sqlite")
        with KnowledgeGraph.open(tmp_path / "kg.sqlite", readonly=True) as ro:
            ro.backup(tmp_path / "copy2.sqlite")
    assert not os.path.exists(out + "-wal")
    for p in (out, tmp_path / "copy2.sqlite"):
        with KnowledgeGraph.open(p, readonly=True, verify="full") as copy:
            assert copy.node_ids().tolist() == ids.tolist()
            assert copy.edges() == [(int(ids[0]), int(ids[1]), "t", 0.5)]
    assert not [f for f in os.listdir(tmp_path) if ".tmp-" in f]


# ============================================================================ other names of the store


def _linked_store(tmp_path, n=20, dim=8):
    """``runs/ckpt-1/kg.sqlite`` with ``n`` nodes, ``runs/latest -> ckpt-1`` (a symlinked folder),
    ``runs/soft.sqlite`` (a symlink to the file) and ``runs/hard.sqlite`` (a hard link)."""
    runs = tmp_path / "runs"
    (runs / "ckpt-1").mkdir(parents=True)
    path = runs / "ckpt-1" / "kg.sqlite"
    _populated(path, n=n, dim=dim)
    os.symlink("ckpt-1", runs / "latest")
    os.symlink(path, runs / "soft.sqlite")
    os.link(path, runs / "hard.sqlite")
    return path, runs


def _assert_intact(path, n):
    con = sqlite3.connect(path)
    assert con.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    con.close()
    with KnowledgeGraph.open(path, readonly=True, verify="full") as kg:
        assert len(kg) == n


def test_backup_and_exports_refuse_every_other_name_of_the_open_store(tmp_path):
    path, runs = _linked_store(tmp_path)
    others = [
        runs / "latest" / "kg.sqlite",  # symlinked folder
        runs / "latest" / "kg.sqlite-wal",  # a companion, through the symlinked folder
        runs / "latest" / "kg.sqlite-shm",
        runs / "soft.sqlite",  # symlinked file
        runs / "hard.sqlite",  # hard link
        runs / "ckpt-1" / ".." / "ckpt-1" / "kg.sqlite",
    ]
    with pytest.warns(RuntimeWarning, match="hard links"):
        kg = KnowledgeGraph.open(path, dim=8)
    with kg:
        for dest in others:
            for call in (kg.backup, kg.to_json, kg.to_graphml, kg.draw):
                with pytest.raises(ValueError, match="is the store itself"):
                    call(dest)
        with KnowledgeGraph.open(runs / "latest" / "kg.sqlite", readonly=True) as ro:
            with pytest.raises(ValueError, match="is the store itself"):
                ro.backup(path)  # a readonly handle's backup, too
        # The writer goes on as if nothing happened (the reproducer corrupted it here).
        kg.add_nodes_batch(np.random.default_rng(1).standard_normal((300, 8)), "n", [{}] * 300)
        kg.backup(runs / "latest" / "copy.sqlite")  # another file in the same folder is fine
    _assert_intact(path, 320)
    _assert_intact(runs / "ckpt-1" / "copy.sqlite", 320)


def test_checkpoint_rotation_never_removes_the_store_named_like_a_snapshot(tmp_path):
    folder = tmp_path / "snaps"
    folder.mkdir()
    path = folder / "snapshot-00000001.sqlite"
    _populated(path, n=10)
    os.symlink("snaps", tmp_path / "alias")
    with KnowledgeGraph.open(
        path, dim=8, keep_checkpoints=1, checkpoint_dir=tmp_path / "alias"
    ) as kg:
        for _ in range(3):
            snap = kg.checkpoint()
            assert not os.path.samefile(snap, path)
        assert [os.path.basename(p) for p in kg.list_checkpoints()] == [
            "snapshot-00000001.sqlite",  # the store: listed by name, never rotated away
            "snapshot-00000004.sqlite",
        ]
    _assert_intact(path, 10)


@pytest.mark.parametrize("name", ["soft.sqlite", "latest/kg.sqlite", "hard.sqlite"])
def test_second_writer_through_another_name_is_refused(tmp_path, name):
    path, runs = _linked_store(tmp_path, dim=worker.DIM)
    with pytest.warns(RuntimeWarning, match="hard links"):
        kg = KnowledgeGraph.open(path, dim=worker.DIM)
    with kg:
        with pytest.raises(StoreLockedError, match="already open for writing"):
            KnowledgeGraph.open(runs / name, dim=worker.DIM)
    # and across processes
    with _writer_in_child(runs / name, tmp_path / "ready"):
        with pytest.raises(StoreLockedError):
            KnowledgeGraph.open(path, dim=worker.DIM)


def test_close_leaves_no_lock_file_and_the_lock_is_free_again(tmp_path):
    path = tmp_path / "kg.sqlite"
    with KnowledgeGraph.open(path, dim=4) as kg:
        kg.add_node(np.ones(4))
        with KnowledgeGraph.open(path, readonly=True) as ro:
            assert len(ro) == 1
    assert sorted(os.listdir(tmp_path)) == ["kg.sqlite"]
    with KnowledgeGraph.open(path, dim=4) as kg:  # the lock went with the handle
        assert len(kg) == 1


def test_closing_a_reader_keeps_the_writer_lock_of_another_handle(tmp_path):
    path = tmp_path / "kg.sqlite"
    with KnowledgeGraph.open(path, dim=4) as kg:
        KnowledgeGraph.open(path, readonly=True).close()
        with pytest.raises(StoreLockedError):
            KnowledgeGraph.open(path, dim=4)
        kg.add_node(np.ones(4))


@pytest.mark.parametrize("kind", ["fifo", "directory"])
def test_store_path_that_is_not_a_regular_file_is_refused_without_hanging(tmp_path, kind):
    path = tmp_path / "kg.sqlite"
    os.mkfifo(path) if kind == "fifo" else path.mkdir()
    for kw in ({"readonly": True}, {"dim": 4}):
        with pytest.raises(KnowledgeGraphError, match="a FIFO|a directory"):
            KnowledgeGraph.open(path, **kw)


# ============================================================================ hostile schema


@pytest.mark.parametrize(
    "sql,msg",
    [
        (
            "CREATE TRIGGER wipe AFTER INSERT ON nodes BEGIN DELETE FROM nodes; END",
            "unexpected trigger 'wipe' on table 'nodes'",
        ),
        ("CREATE VIEW v AS SELECT id FROM nodes", "unexpected view 'v'"),
        ("CREATE TABLE extra (x)", "unexpected table 'extra'"),
        ("CREATE INDEX by_type ON nodes (type)", "unexpected index 'by_type' on table 'nodes'"),
        ("ALTER TABLE nodes ADD COLUMN evil TEXT", "table 'nodes' is defined as"),
        ("DROP INDEX edges_by_dst", "missing index 'edges_by_dst'"),
    ],
)
@pytest.mark.parametrize("verify", ["none", "full"])
def test_store_with_foreign_schema_objects_is_refused_untouched(tmp_path, sql, msg, verify):
    path = tmp_path / "kg.sqlite"
    _populated(path)
    con = sqlite3.connect(path)
    con.execute(sql)
    con.commit()
    con.close()
    before = path.read_bytes()
    for kw in ({"readonly": True}, {"dim": 8}):
        with pytest.raises(KnowledgeGraphError, match=msg):
            KnowledgeGraph.open(path, verify=verify, **kw)
    assert path.read_bytes() == before


def test_planner_statistics_from_analyze_are_accepted(tmp_path):
    path = tmp_path / "kg.sqlite"
    _populated(path)
    con = sqlite3.connect(path)
    con.execute("ANALYZE")
    con.commit()
    con.close()
    with KnowledgeGraph.open(path, dim=8) as kg:
        kg.add_node(np.ones(8))
        assert len(kg) == 201


def test_trigger_added_after_open_is_refused_before_the_next_write(tmp_path):
    path = tmp_path / "kg.sqlite"
    with KnowledgeGraph.open(path, dim=4) as kg:
        kg.add_nodes_batch(np.eye(4))
        con = sqlite3.connect(path)
        con.execute("CREATE TRIGGER wipe AFTER INSERT ON nodes BEGIN DELETE FROM nodes; END")
        con.commit()
        con.close()
        with pytest.raises(KnowledgeGraphError, match="unexpected trigger 'wipe'"):
            kg.add_node(np.ones(4))
        assert len(kg) == 4


@pytest.mark.parametrize(
    "text,kind",
    [("[1, 2]", "an array"), ("3", "a number"), ('"s"', "a string"), ("null", "null")],
)
def test_metadata_that_is_json_but_not_an_object_is_refused(tmp_path, text, kind):
    path = tmp_path / "kg.sqlite"
    _populated(path)
    _tamper(path, "UPDATE nodes SET metadata = ? WHERE id = 2", text)
    for kw in ({"readonly": True}, {"dim": 8, "verify": "none"}):
        with pytest.raises(KnowledgeGraphError, match=f"node 2 metadata is {kind}, expected"):
            KnowledgeGraph.open(path, **kw)


def test_metadata_changed_to_non_object_after_open_raises_a_clear_error(tmp_path):
    path = tmp_path / "kg.sqlite"
    ids = _populated(path)
    with KnowledgeGraph.open(path, readonly=True) as ro:
        _tamper(path, "UPDATE nodes SET metadata = '[1]' WHERE id = ?", int(ids[3]))
        with pytest.raises(KnowledgeGraphError, match=f"node {ids[3]} metadata is an array"):
            ro.get_node(int(ids[3]))


def _nested(depth, leaf=0):
    v = leaf
    for _ in range(depth):
        v = [v]
    return v


@pytest.mark.parametrize("depth", [100, 5000])  # 5000: json.dumps itself would recurse out
def test_deeply_nested_metadata_is_refused_on_write_naming_the_field(tmp_path, depth):
    with _store(tmp_path, dim=4) as kg:
        kg.add_node(np.ones(4), metadata={"ok": _nested(99)})  # 100 levels with the object
        with pytest.raises(ValueError, match="metadata field 'deep' is nested more than 100"):
            kg.add_node(np.ones(4), metadata={"a": 1, "deep": _nested(depth)})
        with pytest.raises(ValueError, match="provenance field 'src' is nested more than 100"):
            kg.add_or_update_node(np.ones(4), provenance={"src": _nested(depth)})
        assert len(kg) == 1


@pytest.mark.parametrize("depth", [150, 5000])
def test_deeply_nested_metadata_in_the_file_is_refused_on_open_and_read(tmp_path, depth):
    path = tmp_path / "kg.sqlite"
    ids = _populated(path)
    deep = '{"a": 1, "deep": ' + "[" * depth + "]" * depth + "}"
    with KnowledgeGraph.open(path, readonly=True) as ro:
        _tamper(path, "UPDATE nodes SET metadata = ? WHERE id = ?", deep, int(ids[5]))
        if depth > 1000:  # past what Python's json can parse: a clear error, not RecursionError
            with pytest.raises(KnowledgeGraphError, match="field 'deep' is nested more than"):
                ro.get_node(int(ids[5]))
    for kw in ({"readonly": True}, {"dim": 8, "verify": "none"}):
        with pytest.raises(KnowledgeGraphError, match=f"node {ids[5]} metadata field 'deep'"):
            KnowledgeGraph.open(path, **kw)


# ============================================================================ text in exports

# Every character XML 1.0 cannot hold, plus the ones it holds only with care.
_AWKWARD = "".join(chr(c) for c in range(32)) + "\ufffe\uffff<&>\"'ü"


def test_lone_surrogates_are_refused_on_input(tmp_path):
    with _store(tmp_path, dim=4) as kg:
        a = kg.add_node(np.ones(4))
        with pytest.raises(ValueError, match=r"metadata field 'name' holds a lone surrogate"):
            kg.add_node(np.ones(4), metadata={"name": "x\udc80"})
        with pytest.raises(ValueError, match="lone surrogate"):
            kg.add_or_update_node(np.ones(4), metadata={"k\ud800": 1})
        with pytest.raises(ValueError, match="node type .* lone surrogate"):
            kg.add_node(np.ones(4), type="t\udfff")
        with pytest.raises(ValueError, match="edge type .* lone surrogate"):
            kg.add_edge(a, a, "e\udc00")
        assert len(kg) == 1 and kg.num_edges() == 0


def test_exports_with_control_characters_read_back_with_networkx(tmp_path):
    import json

    metas = [{"text": _AWKWARD, _AWKWARD: i, "n": i} for i in range(3)]
    types = ["plain", "t" + _AWKWARD, "cr\r\nlf"]
    with _store(tmp_path, dim=4) as kg:
        ids = kg.add_nodes_batch(np.eye(4)[:3] + 0.1, types, metas)
        kg.add_edges_batch([(int(ids[0]), int(ids[1]), "e" + _AWKWARD, 0.5)])
        kg.to_graphml(tmp_path / "g.graphml")
        kg.to_json(tmp_path / "g.json")
    g = nx.read_graphml(tmp_path / "g.graphml")
    assert g.number_of_nodes() == 3 and g.number_of_edges() == 1
    for i, t, m in zip(ids, types, metas):
        node = g.nodes[f"n{i}"]
        assert json.loads(node["metadata"]) == m  # the metadata attribute is exact
        assert node["meta_n"] == m["n"]
        assert node["type"] == _xml_escaped(t)
    assert g.nodes[f"n{ids[2]}"]["type"] == "cr\r\nlf"  # CR survives XML end-of-line handling
    doc = json.loads((tmp_path / "g.json").read_text(encoding="utf-8"))
    assert [n["metadata"] for n in doc["nodes"]] == metas
    assert [n["type"] for n in doc["nodes"]] == types
    jg = nx.node_link_graph(
        doc, directed=True, multigraph=False, edges="edges", source="src", target="dst"
    )
    assert jg.nodes[int(ids[1])]["type"] == types[1]
    assert jg.edges[int(ids[0]), int(ids[1])]["type"] == "e" + _AWKWARD


def _xml_escaped(s):
    bad = set(range(0, 9)) | {11, 12} | set(range(14, 32)) | {0xFFFE, 0xFFFF}
    return "".join(f"\\u{ord(c):04x}" if ord(c) in bad else c for c in s)


def test_graphml_export_of_a_store_holding_a_lone_surrogate_still_works(tmp_path):
    import json

    path = tmp_path / "kg.sqlite"
    ids = _populated(path, n=3)
    # Written by an earlier version (or another client): JSON escapes of a lone surrogate.
    _tamper(path, "UPDATE nodes SET metadata = ? WHERE id = ?", '{"s": "a\\udc80b"}', int(ids[0]))
    with KnowledgeGraph.open(path, readonly=True) as kg:
        kg.to_graphml(tmp_path / "g.graphml")
    g = nx.read_graphml(tmp_path / "g.graphml")
    assert json.loads(g.nodes[f"n{ids[0]}"]["metadata"]) == {"s": "a\udc80b"}
    assert g.nodes[f"n{ids[0]}"]["meta_s"] == "a\\udc80b"


# ============================================================================ files we write


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_written_files_honour_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        with _store(tmp_path, dim=4) as kg:
            kg.add_nodes_batch(np.eye(4), "n", [{"expert": i} for i in range(4)])
            written = [
                tmp_path / "kg.sqlite",
                kg.backup(tmp_path / "copy.sqlite"),
                kg.checkpoint(),
                tmp_path / "g.json",
                tmp_path / "g.graphml",
                tmp_path / "g.png",
            ]
            kg.to_json(tmp_path / "g.json")
            kg.to_graphml(tmp_path / "g.graphml")
            kg.draw(tmp_path / "g.png")
    finally:
        os.umask(old)
    for p in written:
        assert oct(os.stat(p).st_mode & 0o777) == oct(0o666 & ~umask), p


def _dead_pid():
    import subprocess

    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_checkpoint_removes_crash_leftovers_and_keeps_foreign_files(tmp_path):
    import subprocess

    cdir = tmp_path / "kg.sqlite.checkpoints"
    cdir.mkdir()
    dead = _dead_pid()
    leftovers = [
        f".snapshot-00000002.sqlite.tmp-{dead}",
        f".snapshot-00000002.sqlite.tmp-{dead}-journal",  # what a kill during the copy leaves
        f".snapshot-00000003.sqlite.tmp-{dead}-0a1b2c3d",
        f".snapshot-00000003.sqlite.tmp-{dead}-0a1b2c3d-wal",
    ]
    for name in leftovers:
        (cdir / name).write_bytes(b"x")
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        busy = f".snapshot-00000004.sqlite.tmp-{sleeper.pid}-journal"  # a live writer's file
        foreign = ["notes.txt", "snapshot-abc.sqlite", ".snapshot-x.sqlite.tmp-12-journal"]
        for name in [busy] + foreign:
            (cdir / name).write_bytes(b"x")
        (cdir / "snapshot-00000009.sqlite").mkdir()  # not a file: never listed nor removed
        with _store(tmp_path, dim=4, keep_checkpoints=2) as kg:
            kg.add_node(np.ones(4))
            first = kg.checkpoint()
            assert os.path.basename(first) == "snapshot-00000010.sqlite"
        left = set(os.listdir(cdir))
        assert not left & set(leftovers)
        assert {busy, *foreign, "snapshot-00000009.sqlite"} <= left
    finally:
        sleeper.kill()
        sleeper.wait()


def test_snapshot_numbers_past_eight_digits_are_listed_and_rotated(tmp_path):
    cdir = tmp_path / "kg.sqlite.checkpoints"
    cdir.mkdir()
    _populated(cdir / "snapshot-99999999.sqlite", n=5)  # a stray snapshot with a high number
    with _store(tmp_path, dim=8, keep_checkpoints=2) as kg:
        kg.add_node(np.ones(8))
        names = [os.path.basename(kg.checkpoint()) for _ in range(3)]
        assert names == [f"snapshot-{n}.sqlite" for n in (100000000, 100000001, 100000002)]
        assert [os.path.basename(p) for p in kg.list_checkpoints()] == names[1:]
        assert sorted(os.listdir(cdir)) == names[1:]


# ============================================================================ read-only media


@pytest.fixture
def world_dir():
    """A folder an unprivileged user can reach (pytest's tmp_path may sit under a 0700 folder);
    made writable again before it is removed."""
    import shutil

    d = tempfile.mkdtemp(prefix="kg-ro-")
    os.chmod(d, 0o755)
    try:
        yield d
    finally:
        for root, dirs, _ in os.walk(d):
            for x in [root] + [os.path.join(root, n) for n in dirs]:
                os.chmod(x, 0o755)
        shutil.rmtree(d)


def _open_unprivileged(path, readonly=True):
    ctx = _forkserver()
    parent, child_end = ctx.Pipe()
    child = ctx.Process(target=worker.open_unprivileged, args=(str(path), readonly, child_end))
    child.start()
    try:
        assert parent.poll(60), "the child did not answer"
        return parent.recv()
    finally:
        child.join(60)


def _make_read_only(folder):
    for name in os.listdir(folder):
        os.chmod(os.path.join(folder, name), 0o444)
    os.chmod(folder, 0o555)


def test_cleanly_closed_store_on_read_only_media_opens_readonly(world_dir):
    path = os.path.join(world_dir, "kg.sqlite")
    ids = _populated(path, n=30, dim=worker.DIM)
    assert os.listdir(world_dir) == ["kg.sqlite"]
    _make_read_only(world_dir)
    assert _open_unprivileged(path) == ("ok", ids.tolist())
    kind, msg = _open_unprivileged(path, readonly=False)
    assert kind == "PermissionError"
    assert "for writing" in msg and "not writable" in msg and "readonly=True" in msg


def test_leftover_wal_on_read_only_media_names_the_real_cause(world_dir):
    path = os.path.join(world_dir, "kg.sqlite")
    ctx = _forkserver()
    child = ctx.Process(target=worker.write_and_die, args=(path,))
    child.start()
    child.join(60)
    assert child.exitcode == -signal.SIGKILL
    assert os.path.getsize(path + "-wal") > 0
    os.remove(path + "-shm")  # e.g. copied to read-only media without it
    _make_read_only(world_dir)
    kind, msg = _open_unprivileged(path)
    assert kind == "PermissionError"
    assert "-wal" in msg and "not writable" in msg and "not at fault" in msg
    assert "not a valid knowledge-graph store" not in msg


# ============================================================================ ivfpq training


def _ivfpq_params():
    return {"train_min": 1000, "nlist": 8, "nbits": 4}


def _trained(kg):
    inner = faiss_downcast(kg._index._index.index)
    return kg._index.approximate and inner.is_trained and type(inner).__name__ == "IndexIVFPQ"


def faiss_downcast(index):
    import faiss

    return faiss.downcast_index(index)


def test_ivfpq_is_trained_on_open_with_a_log_line_before_any_search(tmp_path, caplog, capsys):
    import logging

    path = tmp_path / "kg.sqlite"
    _populated(path, n=1200, dim=16)
    caplog.set_level(logging.INFO, logger="moe_framework.knowledge_graph")
    with KnowledgeGraph.open(
        path, readonly=True, index_type="ivfpq", index_params=_ivfpq_params(), progress=True
    ) as kg:
        assert _trained(kg)
        assert "training the ivfpq index on 1200 of 1200 vectors" in caplog.text
        assert "ivfpq index built in" in caplog.text
        assert "ivfpq index" in capsys.readouterr().err  # the progress bar
        kg.search(np.ones(16), 3)


def test_ivfpq_trains_in_the_write_that_reaches_train_min_not_in_a_search(
    tmp_path, caplog, monkeypatch
):
    import logging

    caplog.set_level(logging.INFO, logger="moe_framework.knowledge_graph")
    rng = _rng(0)
    with _store(tmp_path, dim=16, index_type="ivfpq", index_params=_ivfpq_params()) as kg:
        kg.add_nodes_batch(rng.standard_normal((900, 16)))
        assert not kg._index.approximate and "training" not in caplog.text
        kg.add_nodes_batch(rng.standard_normal((200, 16)))  # 1100 >= train_min
        assert _trained(kg) and "training the ivfpq index on 1100" in caplog.text

        def no_rebuild(*a):
            raise AssertionError("a search rebuilt the index")

        monkeypatch.setattr(kg, "_rebuild_index", no_rebuild)
        scores, ids = kg.search(rng.standard_normal((2, 16)), 5)
        assert (ids >= 0).all()


def test_store_creation_that_fails_leaves_no_file_behind(tmp_path, monkeypatch):
    from moe_framework.kg import schema

    def broken(*args):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(schema, "init_schema", broken)
    with pytest.raises(OSError, match="simulated"):
        KnowledgeGraph.open(tmp_path / "kg.sqlite", dim=4)
    assert os.listdir(tmp_path) == []
    monkeypatch.undo()
    with KnowledgeGraph.open(tmp_path / "kg.sqlite", dim=4) as kg:  # and creating works again
        assert len(kg) == 0
