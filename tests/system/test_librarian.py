"""Librarian: dedup + filing of MoE draft reports into the knowledge graph."""

from typing import NamedTuple

import numpy as np
import pytest
import torch

from moe_framework.knowledge_graph import KnowledgeGraph
from moe_framework.librarian import Librarian


class Reports(NamedTuple):
    """Same fields as constellation.DraftReports (the librarian accepts any such object)."""

    mean_output: torch.Tensor
    confidence: torch.Tensor
    token_count: torch.Tensor
    top_tokens: torch.Tensor


def _unit(x):
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _naive_dedup(emb, threshold):
    u = _unit(emb)
    keep, rep = [], []
    for j in range(len(u)):
        sims = u[:j] @ u[j]
        if j and sims.max() > threshold:
            keep.append(False)
            rep.append(int(np.argmax(sims)))
        else:
            keep.append(True)
            rep.append(j)
    return np.array(keep), np.array(rep)


def _reports(rng, E=12, d=32, device="cpu"):
    centers = rng.standard_normal((E, d))
    mean = centers.copy()
    mean[1] = centers[0] + 1e-3 * rng.standard_normal(d)  # duplicate of expert 0
    mean[2] = centers[0] + 1e-3 * rng.standard_normal(d)  # duplicate of 0 (and of 1)
    mean[7] = centers[5] + 1e-3 * rng.standard_normal(d)  # duplicate of expert 5
    mean[4] = 0.0  # a dead expert: routed tokens, zero output
    count = rng.integers(1, 100, E)
    count[3] = 0  # saw no token this window
    top = np.full((E, 4), -1)
    for e in range(E):
        top[e, : min(4, count[e])] = rng.permutation(1000)[: min(4, count[e])]
    return Reports(
        torch.tensor(mean, dtype=torch.float32, device=device),
        torch.tensor(rng.uniform(0, 1, E), dtype=torch.float32, device=device),
        torch.tensor(count, dtype=torch.int64, device=device),
        torch.tensor(top, dtype=torch.int64, device=device),
    )


def _file_and_check(tmp_path, seed, device):
    rng = np.random.default_rng(seed)
    reports = _reports(rng, device=device)
    with KnowledgeGraph.open(tmp_path / "kg.sqlite", dim=32, merge_threshold=0.9) as kg:
        lib = Librarian(kg, dedup_threshold=0.99, similarity_edge_threshold=0.2, neighbors=5)
        names = [f"e{i}" for i in range(12)]
        s = lib.file_reports(reports, layer=3, step=10, expert_names=names)

        mean = reports.mean_output.cpu().numpy()
        count = reports.token_count.cpu().numpy()
        active = [e for e in range(12) if count[e] > 0 and mean[e].any()]
        keep, rep = _naive_dedup(mean[active], 0.99)
        kept = [active[j] for j in np.nonzero(keep)[0]]
        assert (s.skipped_empty, s.skipped_zero) == (1, 1)
        assert s.duplicates_dropped == int((~keep).sum()) == 3
        assert s.filed == s.inserted == len(kept) and s.merged == 0
        assert len(kg) == len(kept)
        assert s.node_ids[3] == -1 and s.node_ids[4] == -1
        assert s.node_ids[1] == s.node_ids[2] == s.node_ids[0]
        assert s.node_ids[7] == s.node_ids[5]
        for e in kept:
            node = kg.get_node(s.node_ids[e])
            assert node.embedding.tobytes() == mean[e].tobytes()
            top = reports.top_tokens[e].cpu().tolist()
            assert node.metadata == {
                "expert": e,
                "expert_name": f"e{e}",
                "layer": 3,
                "step": 10,
                "confidence": pytest.approx(float(reports.confidence[e])),
                "token_count": int(count[e]),
                "top_tokens": [t for t in top if t >= 0],
            }
            assert node.type == "expert_report"
        # Dropped duplicates are provenance of their representative's node, embedding kept bitwise.
        prov = kg.get_provenance(s.node_ids[0])
        assert [p["action"] for p in prov] == ["insert", "duplicate", "duplicate"]
        assert [p["metadata"]["expert"] for p in prov] == [0, 1, 2]
        assert prov[1]["embedding"].tobytes() == mean[1].tobytes()
        assert prov[1]["similarity"] == pytest.approx(
            float(_unit(mean[1]) @ _unit(mean[0])), abs=1e-5
        )
        # Similarity edges: each filed node -> its top-5 other nodes with cosine > 0.2.
        ids = [s.node_ids[e] for e in kept]
        u = _unit(mean[kept])
        sims = u @ u.T
        expected = set()
        for a in range(len(kept)):
            order = [b for b in np.argsort(-sims[a], kind="stable") if b != a][:5]
            expected |= {(ids[a], ids[b]) for b in order if sims[a, b] > 0.2}
        got = {(src, dst) for src, dst, t, w in kg.edges() if t == "similar"}
        assert got == expected
        assert s.edges_added == len(expected)
        for src, dst, _, w in kg.edges():
            a, b = ids.index(src), ids.index(dst)
            assert w == pytest.approx(sims[a, b], abs=1e-5)
        # The same reports again: every one merges into the node it created.
        s2 = lib.file_reports(reports, layer=3, step=20)
        assert s2.merged == s2.filed == len(kept) and s2.inserted == 0
        assert s2.node_ids == s.node_ids
        assert len(kg) == len(kept)
        assert kg.get_node(s.node_ids[0]).merge_count == 2
        assert kg.get_node(s.node_ids[0]).metadata["step"] == 20


def test_file_reports_dedups_skips_files_and_links(tmp_path, seed):
    _file_and_check(tmp_path, seed, "cpu")


@pytest.mark.cuda
def test_file_reports_accepts_device_tensors(tmp_path, seed):
    _file_and_check(tmp_path, seed, "cuda")


def test_file_reports_with_nothing_to_file(tmp_path):
    with KnowledgeGraph.open(tmp_path / "kg.sqlite", dim=4) as kg:
        lib = Librarian(kg)
        r = Reports(
            torch.zeros(3, 4),
            torch.zeros(3),
            torch.zeros(3, dtype=torch.int64),
            torch.full((3, 2), -1),
        )
        s = lib.file_reports(r)
        assert (s.filed, s.skipped_empty, s.node_ids) == (0, 3, [-1, -1, -1])
        assert len(kg) == 0


def test_bad_reports_are_refused_with_clear_errors(tmp_path):
    with KnowledgeGraph.open(tmp_path / "kg.sqlite", dim=4) as kg:
        lib = Librarian(kg)
        ok = Reports(
            torch.ones(2, 4),
            torch.ones(2),
            torch.ones(2, dtype=torch.int64),
            torch.zeros(2, 1, dtype=torch.int64),
        )
        with pytest.raises(ValueError, match="d=5, the graph has dim=4"):
            lib.file_reports(ok._replace(mean_output=torch.ones(2, 5)))
        with pytest.raises(ValueError, match="expert 1 mean_output has NaN"):
            lib.file_reports(ok._replace(mean_output=torch.tensor([[1.0] * 4, [float("nan")] * 4])))
        with pytest.raises(ValueError, match="token_count must be an integer"):
            lib.file_reports(ok._replace(token_count=torch.ones(2)))
        with pytest.raises(ValueError, match=r"confidence and token_count must be \[2\]"):
            lib.file_reports(ok._replace(confidence=torch.ones(3)))
        with pytest.raises(ValueError, match="missing"):
            lib.file_reports(object())
        with pytest.raises(ValueError, match="expert_names has 1 names for 2"):
            lib.file_reports(ok, expert_names=["a"])
        assert len(kg) == 0
        with pytest.raises(ValueError, match="dedup_threshold"):
            Librarian(kg, dedup_threshold=2.0)


def test_maybe_file_reports_files_every_n_steps(tmp_path, seed):
    rng = np.random.default_rng(seed)
    with KnowledgeGraph.open(tmp_path / "kg.sqlite", dim=32) as kg:
        lib = Librarian(kg, every_n_steps=3)
        reports = _reports(rng)
        filed = [lib.maybe_file_reports(reports, step=s) is not None for s in range(7)]
        assert filed == [True, False, False, True, False, False, True]


def test_librarian_files_the_reports_of_a_real_moe_layer(tmp_path, seed):
    from moe_framework.constellation import DraftReports, MoELayer

    layer = MoELayer.build(d_model=16, d_hidden=32, num_experts=8, k=2)
    x = torch.randn(3, 20, 16)
    with torch.no_grad():
        _, info = layer(x)
    reports = info.reports
    assert isinstance(reports, DraftReports)
    count = reports.token_count.numpy()
    with KnowledgeGraph.open(tmp_path / "kg.sqlite", dim=16) as kg:
        s = Librarian(kg, dedup_threshold=0.999).file_reports(reports, layer=0, step=1)
        assert s.filed + s.duplicates_dropped + s.skipped_empty + s.skipped_zero == 8
        assert s.skipped_empty == int((count == 0).sum())
        mean = reports.mean_output.numpy()
        for e in range(8):  # every report with tokens is in the graph, as a node or provenance
            if count[e] == 0:
                assert s.node_ids[e] == -1
                continue
            rows = [p for p in kg.get_provenance(s.node_ids[e]) if p["metadata"]["expert"] == e]
            assert len(rows) == 1 and rows[0]["metadata"]["token_count"] == int(count[e])
            assert rows[0]["embedding"].tobytes() == mean[e].tobytes()
        assert sum(int(c) for c in count) == 3 * 20 * 2  # dropless: every slot is counted
