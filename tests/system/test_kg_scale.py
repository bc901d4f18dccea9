"""The knowledge graph's batch paths (issue 19): the vectorised merge rule against a one-by-one
float64 reference, batched plain inserts, index choice from N and dim, index parameters derived
from N, and index builds that happen (and are logged) at build time, never in a search."""

import logging
import pathlib
import re
import tempfile

import numpy as np
import pytest

from moe_framework.kg import index as kg_index
from moe_framework.kg import merge_plan
from moe_framework.knowledge_graph import KnowledgeGraph


def _unit(x):
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _reference_filing(existing, reports, metas, threshold, rate):
    """The merge rule one report at a time in float64: nodes are ``[raw, meta, merges]`` in id
    order (ties to the lower id); returns the nodes and ``(action, node index, similarity)``."""
    nodes = [[np.asarray(e, np.float64), {}, 1] for e in existing]
    out = []
    for r, m in zip(reports.astype(np.float64), metas):
        best, best_s = None, -np.inf
        for k, node in enumerate(nodes):
            s = float(_unit(node[0]) @ _unit(r))
            if s > best_s:
                best, best_s = k, s
        if best is not None and best_s > threshold:
            node = nodes[best]
            node[0] = (1 - rate) * node[0] + rate * r
            node[1] = {**node[1], **m}
            node[2] += 1
            out.append(("merged", best, best_s))
        else:
            nodes.append([r.copy(), dict(m), 1])
            out.append(("inserted", len(nodes) - 1, None if best is None else best_s))
    return nodes, out


def _clustered(rng, n, dim, n_centers, noise):
    centers = _unit(rng.standard_normal((n_centers, dim)))
    which = rng.integers(0, n_centers, n)
    x = centers[which] + noise * rng.standard_normal((n, dim))
    return (x * rng.uniform(0.5, 3.0, (n, 1))).astype(np.float32)  # norms vary: EMA weights them


def _scrambled_candidates(original):
    """``search_candidates`` whose approximate scores say nothing: zeros, columns reversed, the
    first candidate repeated (a stale entry) — the merge rule must rely on its confirmation."""

    def search_candidates(self, queries, k):
        s, i = original(self, queries, k)
        i = np.concatenate([i[:, ::-1], i[:, :1]], 1)
        return np.zeros(i.shape, np.float32), i

    return search_candidates


@pytest.mark.parametrize(
    "path, candidates",
    # 1 candidate: every moved candidate forces a wider search.
    [("index", 8), ("index", 1), ("bank", 8), ("bank", 1), ("ann", 200), ("ann_scrambled", 200)],
)
# Ranked alternatives per report: 0 scores every eligible row each time, 2 runs out of them often.
@pytest.mark.parametrize("top", [0, 2, 16])
def test_batch_merge_rule_matches_one_by_one_reference(
    tmp_path, seed, monkeypatch, candidates, path, top
):
    """Exact search (flat index, device bank): the one-by-one decisions. Approximate index
    (IVF with one list, as many candidates as nodes, so each report's best node is among its
    candidates): the same decisions and similarities, because candidates are confirmed on the
    stored vectors; scrambling their approximate scores changes nothing."""
    monkeypatch.setattr(merge_plan, "_K", candidates)
    monkeypatch.setattr(merge_plan, "_K_ANN", candidates)
    monkeypatch.setattr(merge_plan, "_MV_BLOCK", 16)  # several moved-node blocks per batch
    monkeypatch.setattr(merge_plan, "_TOP", top)
    monkeypatch.setattr(merge_plan, "_GEMM_ELEMENTS", 1)  # causal blocks of 64 reports
    if path == "ann_scrambled":
        monkeypatch.setattr(
            kg_index.VectorIndex,
            "search_candidates",
            _scrambled_candidates(kg_index.VectorIndex.search_candidates),
        )
    rng = np.random.default_rng(seed)
    dim, thr, rate = 24, 0.9, 0.3
    # Tight clusters (cosine ~0.99 inside, ~0 +- 0.2 across): decisions are far from the
    # threshold, so float32 and float64 agree; reports of a cluster merge into its first node.
    existing = _clustered(rng, 7, dim, 7, 0.02)
    reports = _clustered(rng, 150, dim, 12, 0.02)
    reports[40] = reports[3]  # an exact repeat inside a batch
    metas = [{"r": j, "even": j % 2 == 0} for j in range(len(reports))]
    nodes, expected = _reference_filing(existing, reports, metas, thr, rate)
    ann = path.startswith("ann")
    with KnowledgeGraph.open(
        tmp_path / "kg.sqlite",
        dim=dim,
        merge_threshold=thr,
        ema_rate=rate,
        index_type="ivf" if ann else "flat",
        index_params={"train_min": 7} if ann else None,
    ) as kg:
        ids = list(kg.add_nodes_batch(existing))
        assert kg._index.approximate == ann
        if path == "bank":
            kg.device_bank("cpu")
        got = []
        for lo, hi in ((0, 1), (1, 1), (1, 60), (60, 61), (61, 150)):  # sizes 1, 0, 59, 1, 89
            got += kg.add_or_update_batch(
                reports[lo:hi], "r", metas[lo:hi], [{"b": lo}] * (hi - lo)
            )
        assert len(got) == len(expected)
        for j, (res, (action, k, sim)) in enumerate(zip(got, expected)):
            if action == "inserted" and k == len(ids):
                ids.append(res.node_id)
            assert (res.action, res.node_id) == (action, ids[k]), j
            if sim is None:
                assert res.similarity is None
            else:
                assert res.similarity == pytest.approx(sim, abs=1e-5), j
        assert ids == sorted(ids) and len(kg) == len(nodes)
        for k, (raw, meta, merges) in enumerate(nodes):
            node = kg.get_node(ids[k])
            np.testing.assert_allclose(node.embedding, raw, rtol=1e-5, atol=1e-6)
            assert node.merge_count == merges
            assert node.metadata == meta
        assert sum(len(kg.get_provenance(i)) for i in ids) == len(reports)
        # The index and bank follow every move: each node is its own best match.
        scores, found = kg.search(np.stack([n[0] for n in nodes]).astype(np.float32), 1)
        assert list(found[:, 0]) == ids
        np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)


def test_batch_merge_rule_into_empty_store_and_bad_metadata_rolls_back(tmp_path, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((5, 8)).astype(np.float32)
    with KnowledgeGraph.open(tmp_path / "kg.sqlite", dim=8, merge_threshold=0.99) as kg:
        res = kg.add_or_update_batch(x)
        assert [r.action for r in res] == ["inserted"] * 5 and res[0].similarity is None
        assert all(r.similarity is not None for r in res[1:])
        before = len(kg)
        with pytest.raises(ValueError, match="metadata"):
            kg.add_or_update_batch(x, metadatas=[{}, {}, {"bad": float("nan")}, {}, {}])
        assert len(kg) == before
        assert sum(len(kg.get_provenance(i)) for i in kg.node_ids()) == 5


def test_add_nodes_batch_stores_exact_rows_metadata_and_provenance(tmp_path, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((37, 12)).astype(np.float32)[:, ::1]
    xs = np.asfortranarray(x)  # non-contiguous input
    metas = [{"i": i, "s": "é" * (i % 3)} if i % 4 else {} for i in range(37)]
    provs = [None if i % 3 else {"src": i} for i in range(37)]
    with KnowledgeGraph.open(tmp_path / "kg.sqlite", dim=12) as kg:
        ids = kg.add_nodes_batch(xs, ["a", "b"] * 18 + ["a"], metas, provs)
        assert list(ids) == list(range(1, 38))
        for i, nid in enumerate(ids):
            node = kg.get_node(int(nid))
            np.testing.assert_array_equal(node.embedding, x[i])
            assert node.metadata == metas[i] and node.type == ("a", "b")[i % 2]
            prov = kg.get_provenance(int(nid))
            assert [p["source"] for p in prov] == ([] if provs[i] is None else [provs[i]])
        assert len(kg.add_nodes_batch(np.zeros((0, 12), np.float32))) == 0
        with pytest.raises(ValueError, match="metadata"):
            kg.add_nodes_batch(x[:2], "a", [{}, {"k\ud800": 1}])
        with pytest.raises(ValueError, match="node type"):
            kg.add_nodes_batch(x[:2], ["a", ""])
        assert len(kg) == 37


# ============================================================================ ivf / auto index


def test_ivf_shape_and_auto_choice_follow_n():
    assert kg_index.ivf_shape(1_000_000, 384) == (1000, 16)
    assert kg_index.ivf_shape(10_000_000, 384) == (3162, 49)
    assert kg_index.ivf_shape(100, 8) == (16, 16)
    assert kg_index.ivf_shape(10**6, 8, nlist=50) == (50, 16)
    train_min = kg_index.DEFAULT_PARAMS["auto"]["train_min"]
    assert kg_index.choose_index(train_min - 1, 384) == "flat"
    assert kg_index.choose_index(train_min, 384) == "ivf"


def test_merge_candidates_probe_merge_nprobe_lists(seed):
    import faiss

    assert [kg_index.merge_nprobe(p) for p in (4, 16, 49, 100)] == [4, 8, 24, 50]
    rng = np.random.default_rng(seed)
    x = _unit(_clustered(rng, 2000, 16, 40, 0.1)).astype(np.float32)
    ids = np.arange(1, 2001, dtype=np.int64)
    q = x[rng.choice(2000, 7, replace=False)]
    for params, probed in (({}, 8), ({"merge_nprobe": 3}, 3), ({"nprobe": 5}, 5)):
        idx = kg_index.VectorIndex(
            16, "ivf", {"train_min": 1000, "nlist": 40, "nprobe": 16, **params}
        )
        idx.rebuild(ids, x)
        faiss.cvar.indexIVF_stats.reset()
        s, i = idx.search_candidates(q, 4)
        assert faiss.cvar.indexIVF_stats.nlist == 7 * probed
        assert i.shape == (7, 4) and (i > 0).all()
        # Each query's own vector is stored: it is its first candidate.
        np.testing.assert_allclose(s[:, 0], 1.0, atol=0.02)
    with pytest.raises(ValueError, match="merge_nprobe"):
        kg_index.VectorIndex(16, "hnsw", {"merge_nprobe": 3})


@pytest.mark.parametrize("nprobe", [1, 3, 40])
def test_search_by_lists_matches_faiss_ivf_search(seed, nprobe):
    import faiss

    from moe_framework.kg.ivf_batch import search_by_lists

    rng = np.random.default_rng(seed)
    x = _unit(_clustered(rng, 3000, 24, 30, 0.2)).astype(np.float32)
    idx = kg_index.VectorIndex(24, "ivf", {"train_min": 1000, "nlist": 40})
    idx.rebuild(np.arange(5, 3005, dtype=np.int64), x)
    idx.update(np.array([7, 9]), x[[300, 301]])  # stale entries: ids 7 and 9 twice
    q = _unit(np.concatenate([x[:90], rng.standard_normal((7, 24))])).astype(np.float32)
    s, i = search_by_lists(idx._index, q, 6, nprobe)
    ref_s, ref_i = idx._index.search(q, 6, params=faiss.SearchParametersIVF(nprobe=nprobe))
    np.testing.assert_allclose(s, ref_s, atol=1e-5)
    # Same entries wherever the scores leave no doubt (no near-tie at the k-th place).
    ref_s7, _ = idx._index.search(q, 7, params=faiss.SearchParametersIVF(nprobe=nprobe))
    clear = ref_s7[:, 5] - ref_s7[:, 6] > 1e-4
    assert clear.mean() > 0.5
    for a, b in zip(i[clear], ref_i[clear]):
        assert sorted(a) == sorted(b)
    empty = search_by_lists(idx._index, q[:0], 6, nprobe)
    assert empty[0].shape == (0, 6) and empty[1].shape == (0, 6)


@pytest.mark.parametrize("index_type", ["ivf", "auto"])
def test_ivf_trains_in_the_write_that_reaches_train_min_never_in_a_search(
    tmp_path, seed, caplog, index_type
):
    rng = np.random.default_rng(seed)
    dim, n = 24, 3000
    x = _clustered(rng, n, dim, 60, 0.15)
    q = _clustered(rng, 40, dim, 60, 0.15)
    params = {"train_min": 2000, "regrow": 1.4}
    caplog.set_level(logging.INFO, logger="moe_framework.knowledge_graph")
    path = tmp_path / "kg.sqlite"
    with KnowledgeGraph.open(
        path, dim=dim, index_type=index_type, index_params=params, merge_threshold=0.9999
    ) as kg:
        kg.add_nodes_batch(x[:1999])
        assert not kg._index.approximate  # exact below train_min
        assert "training" not in caplog.text
        kg.add_nodes_batch(x[1999:2100])  # reaches train_min: trains here
        assert kg._index.approximate and "training the" in caplog.text
        assert "nlist=46" in caplog.text  # round(sqrt(2100)) lists, derived from N
        caplog.clear()
        kg.add_or_update_batch(
            x[2100:]
        )  # no merges; outgrows 1.4 x 2100 nodes: retrained, larger nlist
        assert len(kg) == n and "nlist=55" in caplog.text
        caplog.clear()
        scores, ids = kg.search(q, 10)
        assert "training" not in caplog.text
    # Recall@10 against a brute force, and every score an exact cosine of the stored vector.
    u = _unit(x)
    truth = np.argsort(-(_unit(q) @ u.T), axis=1)[:, :10] + 1
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, truth)])
    assert recall >= 0.95
    np.testing.assert_allclose(
        scores, np.einsum("qd,qkd->qk", _unit(q), u[ids - 1]), rtol=1e-5, atol=1e-5
    )
    # Reopening builds (and logs) the index at open, with a progress bar when asked.
    caplog.clear()
    with KnowledgeGraph.open(
        path, readonly=True, index_type=index_type, index_params=params, progress=True
    ) as kg:
        assert kg._index.approximate and "index built in" in caplog.text
        caplog.clear()
        kg.find_similar_nodes(q[0], top_k=3)
        assert "training" not in caplog.text


def test_ivf_after_merges_serves_current_embeddings(tmp_path, seed):
    rng = np.random.default_rng(seed)
    dim = 16
    x = _clustered(rng, 600, dim, 30, 0.2)
    params = {"train_min": 500}
    with KnowledgeGraph.open(
        tmp_path / "kg.sqlite", dim=dim, index_type="ivf", index_params=params, merge_threshold=0.97
    ) as kg:
        kg.add_nodes_batch(x)
        target = 17
        moved = kg.get_node(target).embedding
        res = kg.add_or_update_batch(np.stack([moved * 1.0001, moved * 2.0]))
        assert [r.node_id for r in res] == [target, target]
        now = kg.get_node(target).embedding
        scores, ids = kg.search(now, 1)
        assert ids[0, 0] == target and scores[0, 0] == pytest.approx(1.0, abs=1e-5)


def test_scale_doc_example_runs(tmp_path, monkeypatch):
    doc = pathlib.Path(__file__).resolve().parents[2] / "docs" / "knowledge_graph_scale.md"
    (block,) = re.findall(r"```python\n(.*?)```", doc.read_text(), flags=re.S)
    monkeypatch.setattr(tempfile, "mkdtemp", lambda: str(tmp_path))
    ns: dict = {}
    exec(compile(block, str(doc), "exec"), ns)
    assert len(ns["results"]) == 1000 and 0 < ns["merged"] < 1000
    assert list(ns["ids"][:, 0]) == [1, 2, 3]


@pytest.mark.parametrize("shape", [(0, 7), (1, 384), (513, 33), (1100, 384)])
def test_normalize_is_the_float64_quotient_rounded_once(seed, shape):
    """``schema.normalize`` divides block by block; the bits must be those of the whole-array
    float64 quotient, for rows of norms from 1e-20 to 1e20 and non-contiguous input."""
    from moe_framework.kg import schema

    rng = np.random.default_rng(seed)
    x = rng.standard_normal((shape[0], 2 * shape[1])) * rng.uniform(-20, 20, (shape[0], 1))
    x = (x * 10.0 ** rng.uniform(-20, 20, (shape[0], 1))).astype(np.float32)[:, ::2]
    norms = schema.row_norms(x)  # float64 (its own test: the norms of a float64 copy)
    np.testing.assert_allclose(norms, np.linalg.norm(x.astype(np.float64), axis=1), rtol=1e-12)
    expect = (x.astype(np.float64) / norms[:, None]).astype(np.float32)
    got = schema.normalize(x)
    assert got.dtype == np.float32 and got.flags.c_contiguous
    np.testing.assert_array_equal(got.view(np.uint32), expect.view(np.uint32))


def test_distinct_candidates_keep_the_first_k_distinct_ids_in_order(seed):
    """``merge_plan._distinct`` (stale index entries): per row, the first k distinct ids >= 0 in
    the row's order with their scores, padded with -inf / -1; checked against a Python loop."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(-1, 6, (200, 9))
    scores = -np.sort(rng.standard_normal((200, 9)), axis=1).astype(np.float32)
    for k in (1, 4, 9):
        s, i = merge_plan._distinct(scores, ids, k)
        assert s.shape == i.shape == (200, k)
        for r in range(200):
            seen, want = set(), []
            for c in range(9):
                if ids[r, c] >= 0 and ids[r, c] not in seen:
                    seen.add(ids[r, c])
                    want.append((scores[r, c], ids[r, c]))
            want = (want + [(-np.inf, -1)] * k)[:k]
            assert list(i[r]) == [w[1] for w in want]
            assert list(s[r]) == [w[0] for w in want]
