"""Issue 17 item 4: MemoryBankRouter against a plain-PyTorch reference of its retrieval-biased
logits, the centroid memory it files through the librarian, and graph safety (compiled forward
keeps working as the knowledge graph grows, n_valid on the device)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from moe_framework.kg import KnowledgeGraph
from moe_framework.librarian import Librarian
from moe_framework.routing import MemoryBankRouter, TopKRouter

D, E, K = 6, 4, 2


def _graph(tmp_path, n=9, layer=0, seed=0):
    g = KnowledgeGraph.create(str(tmp_path / "mem.sqlite"), dim=D)
    rng = np.random.default_rng(seed)
    emb = rng.standard_normal((n, D)).astype(np.float32)
    metas = [{"expert": int(i % E), "layer": layer} for i in range(n)]
    g.add_nodes_batch(emb, "routing_memory", metas)
    # nodes the router must ignore: another type, another layer, an expert out of range
    g.add_nodes_batch(rng.standard_normal((3, D)).astype(np.float32), "expert_report",
                      [{"expert": 1, "layer": layer}] * 3)  # fmt: skip
    g.add_nodes_batch(rng.standard_normal((2, D)).astype(np.float32), "routing_memory",
                      [{"expert": 2, "layer": layer + 1}, {"expert": 99, "layer": layer}])  # fmt: skip
    return g


def _reference_logits(router, graph, x, layer=0):
    """gate(x) + scale * sum_j a_j onehot(expert_j) + memory_gate(sum_j a_j m_j) by the
    definition: the memory_k nearest nodes by cosine, those of this router's memory voting."""
    nodes = list(graph.iter_nodes())
    emb = torch.tensor(np.stack([n.embedding for n in nodes]), dtype=torch.float64)
    unit = emb / emb.norm(dim=1, keepdim=True)
    ok = torch.tensor([
        n.type == "routing_memory" and n.metadata.get("layer") == layer
        and 0 <= n.metadata.get("expert", -1) < E for n in nodes
    ])  # fmt: skip
    expert = torch.tensor([n.metadata.get("expert", 0) if o else 0 for n, o in zip(nodes, ok)])
    xd = x.double()
    cos = F.normalize(xd, dim=1) @ unit.t()
    top = torch.topk(cos, min(router.memory_k, len(nodes)), dim=1)
    out = xd @ router.gate.weight.double().t()
    for t in range(x.shape[0]):
        idx = [int(i) for i in top.indices[t] if ok[int(i)]]
        if not idx:
            continue
        c = cos[t, idx]
        a = torch.softmax(c / router.memory_temperature, dim=0)
        prior = torch.zeros(E, dtype=torch.float64)
        for w, i in zip(a, idx):
            prior[expert[i]] += w
        neighbour = (a[:, None] * unit[idx]).sum(0)
        out[t] += router.memory_scale.double() * prior
        out[t] += router.memory_gate.weight.double() @ neighbour
    return out


def test_without_memory_it_routes_as_topk(seed):
    r = MemoryBankRouter(D, E, K)
    plain = TopKRouter(D, E, K)
    plain.gate.weight.data.copy_(r.gate.weight)
    x = torch.randn(10, D)
    a, b = r(x), plain(x)
    assert torch.equal(a.ids, b.ids) and torch.equal(a.weights, b.weights)


def test_retrieval_biased_logits_match_the_reference(seed, tmp_path):
    g = _graph(tmp_path, seed=seed % 1000)
    r = MemoryBankRouter(D, E, K, memory_k=5, memory_temperature=0.2, memory_scale=2.0)
    torch.nn.init.normal_(r.memory_gate.weight)
    r.attach_memory(g, layer=0)
    x = torch.randn(13, 2 * D)[:, ::2]
    dec = r(x)
    torch.testing.assert_close(
        dec.logits.double(), _reference_logits(r, g, x), rtol=1e-5, atol=1e-5
    )
    assert r(torch.randn(0, D)).ids.shape == (0, K)  # zero tokens
    # gradients reach the memory scale and gate (retrieval itself is not differentiable)
    (dec.weights * torch.randn_like(dec.weights)).sum().backward()
    assert r.memory_scale.grad is not None and r.memory_gate.weight.grad.abs().sum() > 0
    g.close()


def test_centroids_are_filed_by_the_librarian_and_vote_for_their_expert(seed, tmp_path):
    g = KnowledgeGraph.create(str(tmp_path / "mem.sqlite"), dim=D, merge_threshold=0.999)
    lib = Librarian(g, dedup_threshold=0.999, node_type="routing_memory")
    r = MemoryBankRouter(D, E, K).train()
    xs = [torch.randn(16, D) for _ in range(3)]
    sums, counts = torch.zeros(E, D), torch.zeros(E)
    for x in xs:
        first = r(x).ids[:, 0].long()
        for t in range(x.shape[0]):
            sums[first[t]] += x[t]
            counts[first[t]] += 1
    rep = r.memory_reports(clear=False)
    seen = counts > 0
    torch.testing.assert_close(rep.mean_output[seen], sums[seen] / counts[seen, None])
    assert torch.equal(rep.token_count, counts.long())
    summary = r.refresh_memory(lib, layer=3, step=7)
    assert summary.filed == int(seen.sum())
    assert float(r.centroid_count.sum()) == 0  # cleared
    # each filed centroid is its own nearest memory row and votes for its expert only
    r.eval()
    r.memory_temperature = 1e-3
    with torch.no_grad():
        prior, _, found = r.retrieve(rep.mean_output[seen])
    assert bool(found.all())
    assert torch.equal(prior.argmax(1), torch.nonzero(seen)[:, 0])
    nodes = list(g.iter_nodes(types=["routing_memory"]))
    assert {n.metadata["layer"] for n in nodes} == {3}
    g.close()


def test_compiled_forward_sees_memory_added_after_compilation(seed, tmp_path):
    g = _graph(tmp_path, n=3)
    r = MemoryBankRouter(D, E, K, memory_scale=50.0).eval()
    r.attach_memory(g, layer=0, capacity=64)
    compiled = torch.compile(r, fullgraph=True, backend="aot_eager")
    x = torch.randn(7, D)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x).logits, r(x).logits)
        # new memory rows: the tokens themselves, voting for expert 3 (in place: same tensors)
        g.add_nodes_batch(x.numpy(), "routing_memory", [{"expert": 3, "layer": 0}] * 7)
        r.attach_memory(g, layer=0, capacity=64)
        with torch.compiler.set_stance("fail_on_recompile"):  # same buffers, n_valid on device
            got = compiled(x)
        torch.testing.assert_close(got.logits, r(x).logits)
    assert bool((got.ids[:, 0] == 3).all())  # the neighbours' votes decide
    g.close()


def test_arguments_are_checked(tmp_path):
    with pytest.raises(ValueError, match="memory_k must be a positive int"):
        MemoryBankRouter(D, E, K, memory_k=0)
    with pytest.raises(ValueError, match="memory_temperature must be a float > 0"):
        MemoryBankRouter(D, E, K, memory_temperature=0.0)
    g = KnowledgeGraph.create(str(tmp_path / "g.sqlite"), dim=D + 1)
    with pytest.raises(ValueError, match="graph dim=7 must equal d_model=6"):
        MemoryBankRouter(D, E, K).attach_memory(g)
    g.close()


@pytest.mark.cuda
def test_memory_bank_router_on_cuda_matches_cpu(seed, tmp_path):
    g = _graph(tmp_path)
    r = MemoryBankRouter(D, E, K, memory_k=5)
    r.attach_memory(g, layer=0)
    x = torch.randn(9, D)
    want = r(x)
    r_cuda = MemoryBankRouter(D, E, K, memory_k=5).cuda()
    r_cuda.load_state_dict(r.state_dict())
    r_cuda.attach_memory(g, layer=0)  # a bank on the router's device
    got = r_cuda(x.cuda())
    torch.testing.assert_close(got.logits.cpu(), want.logits, rtol=1e-4, atol=1e-5)
    assert torch.equal(got.ids.cpu(), want.ids)
    g.close()
