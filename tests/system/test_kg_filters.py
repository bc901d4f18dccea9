"""KnowledgeGraph.find_similar_nodes(types=..., where=...) and iter_nodes filters: the store
returns exactly the top_k best nodes that pass, on either of its two search paths."""

import sqlite3
from fractions import Fraction

import numpy as np
import pytest
import torch

from moe_framework.kg import KnowledgeGraph, KnowledgeGraphError
from moe_framework.kg import search as kg_search

# The two ways a filtered search finds its hits: widening an index search, or scoring every node
# the filter lets through. Forcing each one shows both give the brute-force answer.
PATHS = {
    "widen": lambda n_nodes: 10**12,
    "exact": lambda n_nodes: 0,
    "default": kg_search._widening_limit,
}


@pytest.fixture(params=sorted(PATHS))
def search_path(request, monkeypatch):
    monkeypatch.setattr(kg_search, "_widening_limit", PATHS[request.param])
    return request.param


def _unit(x):
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


# ---------------------------------------------------------------- reference (independent of kg)


def _canon(v):
    """A value that compares equal exactly when two parsed JSON values are equal under the
    documented rules (numbers by exact value, booleans apart from numbers)."""
    if isinstance(v, bool):
        return ("bool", v)
    if isinstance(v, (int, float)):
        return ("num", Fraction(v))
    if isinstance(v, str):
        return ("str", v)
    if v is None:
        return ("null",)
    if isinstance(v, (list, tuple)):
        return ("list", tuple(_canon(x) for x in v))
    return ("dict", tuple(sorted((k, _canon(x)) for k, x in v.items())))


def _passes(node_type, meta, types, where):
    if types is not None:
        allowed = {types} if isinstance(types, str) else set(types)
        if node_type not in allowed:
            return False
    return all(k in meta and _canon(meta[k]) == _canon(v) for k, v in (where or {}).items())


def _brute_force(nodes, query, top_k, types, where, threshold):
    """[(id, cosine)] of the best top_k passing nodes, float64 cosines, ties to the lower id."""
    q = _unit(query)
    scored = [
        (i, float(_unit(emb) @ q))
        for i, (t, emb, meta) in nodes.items()
        if _passes(t, meta, types, where)
    ]
    if threshold is not None:
        scored = [h for h in scored if h[1] >= threshold]
    scored.sort(key=lambda h: (-h[1], h[0]))
    return scored[:top_k]


def _assert_same_hits(got, want, tol=1e-5):
    assert len(got) == len(want), (got, want)
    ref = np.array([s for _, s in want])
    np.testing.assert_allclose([h.score for h in got], ref, atol=tol)
    for pos, (h, (wid, ws)) in enumerate(zip(got, want)):
        near = np.abs(ref - ws) <= tol
        if near.sum() == 1:  # no near-tie: the id is determined
            assert h.id == wid, (pos, got, want)


def _assert_approximate_hits(got, want, nodes, query, types, where):
    """An approximate index may miss a few of the true top-k (HNSW's graph search is not
    exhaustive), but every hit it returns must pass the filter, carry its exact cosine, come in
    order, and the misses must be few."""
    assert len(got) <= len(want), (got, want)
    q = _unit(query)
    for h in got:
        t, emb, meta = nodes[h.id]
        assert _passes(t, meta, types, where), h
        assert abs(h.score - float(_unit(emb) @ q)) <= 1e-5, h
    assert [h.score for h in got] == sorted((h.score for h in got), reverse=True)
    missed = len({i for i, _ in want} - {h.id for h in got})
    assert missed <= max(1, len(want) // 20), (missed, got, want)


# ---------------------------------------------------------------- random stores

_NAMES = ["north", "east", "x\ny", 'q"uote\\', "é", "\U0001f600", "", "nul\x00char"]


def _random_meta(rng):
    meta = {}
    if rng.random() < 0.8:
        layer = int(rng.integers(0, 3))
        meta["layer"] = float(layer) if rng.random() < 0.2 else layer
    if rng.random() < 0.6:
        meta["flag"] = bool(rng.random() < 0.5) if rng.random() < 0.7 else int(rng.integers(0, 2))
    if rng.random() < 0.7:
        meta["name"] = _NAMES[int(rng.integers(0, len(_NAMES)))]
    if rng.random() < 0.3:
        meta["tags"] = [int(x) for x in rng.integers(0, 2, size=int(rng.integers(0, 3)))]
    if rng.random() < 0.2:
        meta["none"] = None
    return meta


def _random_filter(rng, nodes):
    types = None
    if rng.random() < 0.5:
        k = int(rng.integers(1, 3))
        types = list(rng.choice(["a", "b", "c", "zz"], size=k, replace=False))
        if k == 1 and rng.random() < 0.5:
            types = types[0]
    where = {}
    if rng.random() < 0.8 and nodes:
        # Keys and values seen in the store (so some nodes pass), sometimes with another type.
        _, _, meta = nodes[list(nodes)[int(rng.integers(0, len(nodes)))]]
        for key in list(meta)[: int(rng.integers(1, 3))]:
            value = meta[key]
            if isinstance(value, bool) and rng.random() < 0.3:
                value = int(value)
            elif isinstance(value, int) and not isinstance(value, bool) and rng.random() < 0.3:
                value = float(value)
            elif isinstance(value, list) and rng.random() < 0.5:
                value = tuple(value)
            where[key] = value
    return types, where


@pytest.mark.parametrize("index_type", ["flat", "hnsw"])
def test_filtered_search_returns_the_brute_force_top_k_on_random_stores(
    tmp_path, seed, search_path, index_type
):
    rng = np.random.default_rng(seed)
    dim = 8
    for trial in range(6):
        n = int(rng.integers(1, 160))
        path = tmp_path / f"kg{trial}.sqlite"
        with KnowledgeGraph.open(path, dim=dim, index_type=index_type) as kg:
            emb = rng.standard_normal((n, dim)).astype(np.float32)
            types = [str(t) for t in rng.choice(["a", "b", "c"], size=n)]
            metas = [_random_meta(rng) for _ in range(n)]
            ids = kg.add_nodes_batch(emb, types, metas)
            nodes = {int(i): (t, e, m) for i, t, e, m in zip(ids, types, emb, metas)}
            for _ in range(8):
                want_types, where = _random_filter(rng, nodes)
                query = rng.standard_normal(dim)
                top_k = int(rng.integers(0, n + 3))
                threshold = None
                if rng.random() < 0.3:
                    cos = np.sort(_unit(emb) @ _unit(query))
                    gaps = np.diff(cos)
                    if len(gaps) and gaps.max() > 1e-3:
                        j = int(np.argmax(gaps))
                        threshold = float((cos[j] + cos[j + 1]) / 2)
                got = kg.find_similar_nodes(query, top_k, threshold, types=want_types, where=where)
                want = _brute_force(nodes, query, top_k, want_types, where, threshold)
                if index_type == "flat":
                    _assert_same_hits(got, want)
                else:
                    _assert_approximate_hits(got, want, nodes, query, want_types, where)
                for h in got:
                    assert (h.type, h.metadata) == (nodes[h.id][0], nodes[h.id][2])


def test_filtered_search_breaks_exact_ties_towards_lower_ids(tmp_path, search_path):
    with KnowledgeGraph.open(tmp_path / "kg.sqlite", dim=4) as kg:
        e = np.ones((60, 4), np.float32)
        ids = kg.add_nodes_batch(e, ["a", "b", "c"] * 20, [{"i": i} for i in range(60)])
        hits = kg.find_similar_nodes(np.ones(4), 5, types="b")
        assert [h.id for h in hits] == [int(i) for i in ids[1::3][:5]]
        assert len({h.score for h in hits}) == 1


def test_filtered_search_with_a_filter_that_passes_everything_equals_the_unfiltered_search(
    tmp_path, seed, search_path
):
    rng = np.random.default_rng(seed)
    with KnowledgeGraph.open(tmp_path / "kg.sqlite", dim=8) as kg:
        kg.add_nodes_batch(rng.standard_normal((200, 8)), ["a", "b"] * 100)
        q = rng.standard_normal(8)
        plain = kg.find_similar_nodes(q, 7)
        filtered = kg.find_similar_nodes(q, 7, types=("a", "b"))
        assert [h.id for h in filtered] == [h.id for h in plain]
        np.testing.assert_allclose([h.score for h in filtered], [h.score for h in plain], 1e-6)


# ---------------------------------------------------------------- equality of JSON values

_VALUES = {
    "int": {"v": 1},
    "float": {"v": 1.0},
    "true": {"v": True},
    "str1": {"v": "1"},
    "null": {"v": None},
    "missing": {},
    "list": {"v": [1, 2]},
    "dict": {"v": {"a": 1}},
    "half": {"v": 1.5},
    "big": {"v": 2**60},
    "huge": {"v": 10**20},
    "nul": {"v": "x\x00y"},
    "nul_other": {"v": "x"},
    "escapes": {"v": 'a"b\\c\n\t'},
    "emoji": {"v": "\U0001f600"},
    "nul_key": {"k\x00ey": 1},
    "nested": {"v": [{"a": [1.0, None]}]},
}

_CASES = [
    ({"v": 1}, {"int", "float"}),
    ({"v": 1.0}, {"int", "float"}),
    ({"v": True}, {"true"}),
    ({"v": "1"}, {"str1"}),
    ({"v": None}, {"null"}),
    ({"v": [1, 2]}, {"list"}),
    ({"v": (1, 2)}, {"list"}),
    ({"v": {"a": 1}}, {"dict"}),
    ({"v": 1.5}, {"half"}),
    ({"v": 2**60}, {"big"}),
    ({"v": 1e20}, {"huge"}),
    ({"v": 10**20}, {"huge"}),
    ({"v": "x\x00y"}, {"nul"}),
    ({"v": 'a"b\\c\n\t'}, {"escapes"}),
    ({"v": "\U0001f600"}, {"emoji"}),
    ({"k\x00ey": 1}, {"nul_key"}),
    ({"v": [{"a": [1, None]}]}, {"nested"}),
    ({"v": 2}, set()),
    ({"v": False}, set()),
    ({"v": 1, "w": 1}, set()),
]


@pytest.fixture
def value_store(tmp_path):
    with KnowledgeGraph.open(tmp_path / "kg.sqlite", dim=4) as kg:
        rng = np.random.default_rng(0)
        ids = kg.add_nodes_batch(
            rng.standard_normal((len(_VALUES), 4)), "n", list(_VALUES.values())
        )
        yield kg, dict(zip(ids.tolist(), _VALUES))


@pytest.mark.parametrize("where, names", _CASES, ids=[repr(c[0]) for c in _CASES])
def test_where_compares_json_values_on_every_path(value_store, where, names, search_path):
    kg, name_of = value_store
    hits = kg.find_similar_nodes(np.ones(4), top_k=100, where=where)
    assert {name_of[h.id] for h in hits} == names
    assert {name_of[n.id] for n in kg.iter_nodes(where=where)} == names


def test_types_take_a_single_str_a_sequence_or_nothing(tmp_path, search_path):
    with KnowledgeGraph.open(tmp_path / "kg.sqlite", dim=4) as kg:
        rng = np.random.default_rng(1)
        ids = kg.add_nodes_batch(rng.standard_normal((6, 4)), ["report", "expert_report"] * 3)
        reports = {int(i) for i in ids[1::2]}
        q = np.ones(4)
        # A str is one type, not a set of characters or substrings.
        assert {h.id for h in kg.find_similar_nodes(q, 10, types="expert_report")} == reports
        assert {h.id for h in kg.find_similar_nodes(q, 10, types=["expert_report"])} == reports
        assert {n.id for n in kg.iter_nodes(types={"expert_report"})} == reports
        assert kg.find_similar_nodes(q, 10, types=[]) == []
        assert list(kg.iter_nodes(types=())) == []
        assert len(kg.find_similar_nodes(q, 10, types=None, where={})) == 6


def test_filters_too_long_for_one_sql_statement_still_apply_in_full(tmp_path, search_path):
    with KnowledgeGraph.open(tmp_path / "kg.sqlite", dim=4) as kg:
        full = {f"k{i}": i + 0.5 for i in range(150)}  # 3 bound values per key in SQL
        almost = {**full, "k149": 0}
        ids = kg.add_nodes_batch(np.eye(4)[:3], ["t7", "t7", "other"], [full, almost, full])
        many_types = [f"t{i}" for i in range(300)]
        hits = kg.find_similar_nodes(np.ones(4), 10, types=many_types, where=full)
        assert [h.id for h in hits] == [int(ids[0])]
        assert [n.id for n in kg.iter_nodes(types=many_types, where=full)] == [int(ids[0])]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"types": 3}, "find_similar_nodes: types must be a str or a sequence of str, got int"),
        ({"types": ["a", ""]}, "find_similar_nodes: types must hold non-empty str"),
        ({"types": ["\udc80"]}, "lone surrogate"),
        ({"where": [("a", 1)]}, "find_similar_nodes: where must be a dict .* got list"),
        ({"where": {1: "a"}}, "find_similar_nodes: where keys must be str"),
        ({"where": {"a": float("nan")}}, "find_similar_nodes: where must be JSON-serialisable"),
        ({"where": {"a": object()}}, "find_similar_nodes: where must be JSON-serialisable"),
        ({"where": {"a": "\udc80"}}, "find_similar_nodes: where field 'a' holds a lone"),
        ({"top_k": -1}, "find_similar_nodes: top_k must be a non-negative int, got -1"),
        ({"top_k": True}, "find_similar_nodes: top_k must be a non-negative int"),
        ({"threshold": float("nan")}, "threshold"),
        ({"query": np.ones((2, 4))}, r"query must be one embedding \[4\], got 2 rows"),
        ({"query": np.ones(5)}, r"query must have shape \[n, 4\] or \[4\], got \[5\]"),
    ],
)
def test_find_similar_nodes_refuses_bad_arguments_naming_them(tmp_path, kwargs, match):
    with KnowledgeGraph.open(tmp_path / "kg.sqlite", dim=4) as kg:
        kg.add_node(np.ones(4), "a", {"a": 1})
        args = {"query": np.ones(4), "top_k": 3, **kwargs}
        with pytest.raises(ValueError, match=match):
            kg.find_similar_nodes(args.pop("query"), args.pop("top_k"), **args)


def test_iter_nodes_refuses_a_bad_filter_when_called(tmp_path):
    with KnowledgeGraph.open(tmp_path / "kg.sqlite", dim=4) as kg:
        with pytest.raises(ValueError, match="iter_nodes: where must be a dict"):
            kg.iter_nodes(where="layer=1")  # before any iteration


# ---------------------------------------------------------------- readonly handles, bad stores


def test_readonly_filtered_search_covers_the_nodes_its_index_holds(tmp_path, search_path):
    path = tmp_path / "kg.sqlite"
    with KnowledgeGraph.open(path, dim=4) as writer:
        writer.add_nodes_batch(-np.eye(4), "a", [{"layer": 1}] * 4)
        with KnowledgeGraph.open(path, readonly=True) as reader:
            late = int(writer.add_node(np.ones(4), "a", {"layer": 1}))  # the best match
            hits = reader.find_similar_nodes(np.ones(4), 10, where={"layer": 1})
            plain = reader.find_similar_nodes(np.ones(4), 10)
            assert late not in {h.id for h in hits} | {h.id for h in plain}
            assert len(hits) == len(plain) == 4
            assert late in {n.id for n in reader.iter_nodes(where={"layer": 1})}  # SQL reads do
        assert late in {h.id for h in writer.find_similar_nodes(np.ones(4), 1, where={"layer": 1})}


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '"a string"'])
def test_filtered_search_names_a_node_whose_metadata_was_broken_after_open(
    tmp_path, text, search_path
):
    path = tmp_path / "kg.sqlite"
    with KnowledgeGraph.open(path, dim=4) as kg:
        ids = kg.add_nodes_batch(np.eye(4), "a", [{"layer": 1}] * 4)
        raw = sqlite3.connect(path)
        raw.execute("UPDATE nodes SET metadata = ? WHERE id = ?", (text, int(ids[2])))
        raw.commit()
        raw.close()
        with pytest.raises(KnowledgeGraphError, match=f"node {ids[2]} metadata"):
            kg.find_similar_nodes(np.ones(4), 10, where={"layer": 1})


def test_selective_filter_on_a_large_store_parses_only_nodes_that_may_pass(
    tmp_path, seed, monkeypatch
):
    # 30k nodes, 3 pass: SQLite narrows the rows, so Python parses a handful of metadata objects
    # (a filter applied to index hits in Python would parse them all).
    from moe_framework.kg import schema

    rng = np.random.default_rng(seed)
    with KnowledgeGraph.open(tmp_path / "kg.sqlite", dim=8) as kg:
        n = 30000
        metas = [{"expert": i % 1000} for i in range(n)]
        for j in (5, 17000, 29999):
            metas[j] = {"expert": -1}
        kg.add_nodes_batch(rng.standard_normal((n, 8)), "r", metas)
        parsed = []
        loads_json = schema.loads_json
        monkeypatch.setattr(schema, "loads_json", lambda *a: parsed.append(1) or loads_json(*a))
        hits = kg.find_similar_nodes(rng.standard_normal(8), 10, where={"expert": -1})
        assert [h.metadata for h in hits] == [{"expert": -1}] * 3
        assert len(parsed) <= 6  # the 3 passing nodes, seen by each of the two ways at most


# ---------------------------------------------------------------- system


def test_system_query_knowledge_graph_filters_in_the_store(tmp_path):
    from moe_framework.config import MoEConfig
    from moe_framework.system import MixtureOfExpertsSystem

    cfg = MoEConfig(
        input_dim=4, d_model=8, d_hidden=8, num_layers=1, num_experts=2, top_k=1, output_dim=2,
        kg_path=str(tmp_path / "kg.sqlite"),
    )  # fmt: skip
    with MixtureOfExpertsSystem(cfg) as model:
        kg = model.knowledge_graph
        q = np.ones(8, np.float32)
        kg.add_node(q, "report", {"layer": 0})  # "report" is a substring of "expert_report"
        kg.add_node(q + 0.1, "expert_report", {"layer": True})
        want = kg.add_node(q - 0.5, "expert_report", {"layer": 0})
        kg.add_node(-q, "expert_report", {"layer": 0})
        hits = model.query_knowledge_graph(
            torch.from_numpy(q), top_k=1, types="expert_report", where={"layer": 0}
        )
        assert [h["id"] for h in hits] == [want]
