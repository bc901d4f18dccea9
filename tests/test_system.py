import os
import sqlite3

import pytest
import torch
import torch.nn.functional as F

from moe_framework.config import MoEConfig
from moe_framework.system import MixtureOfExpertsSystem


def _cfg(tmp_path=None, **kw):
    base = dict(
        input_dim=12,
        d_model=16,
        d_hidden=24,
        num_layers=2,
        num_experts=4,
        top_k=2,
        output_dim=3,
        max_batch_size=32,
    )
    if tmp_path is not None:
        base["kg_path"] = str(tmp_path / "kg.sqlite")
    base.update(kw)
    return MoEConfig(**base)


def _task(n=96, seed=0):
    # A learnable task: the class is decided by which of three fixed directions x is closest to.
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(3, 12, generator=g) * 2
    y = torch.randint(0, 3, (n,), generator=g)
    x = centers[y] + 0.5 * torch.randn(n, 12, generator=g)
    return x, y


def test_system_training_reduces_loss_and_frees_gradients(seed):
    model = MixtureOfExpertsSystem(_cfg())
    x, y = _task()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    first = model.training_step((x, y), opt, F.cross_entropy)
    for _ in range(30):
        last = model.training_step((x, y), opt, F.cross_entropy)
    assert last.task_loss < 0.5 * first.task_loss
    assert all(p.grad is None for p in model.parameters())
    assert last.loss == pytest.approx(last.task_loss + last.aux_loss, rel=1e-5)
    assert first.aux_loss > 0  # aux + z losses are on by default and were added
    load = last.stats["load"]
    assert len(load) == 2 and all(sum(layer) == 96 * 2 for layer in load)
    assert model.step == 31


def test_system_training_step_accepts_token_ids_and_per_position_targets(seed):
    cfg = _cfg(input_dim=None, vocab_size=20, output_dim=20, max_seq_len=6)
    model = MixtureOfExpertsSystem(cfg)
    ids = torch.randint(0, 20, (4, 6))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    r0 = model.training_step({"inputs": ids, "targets": ids}, opt)
    for _ in range(20):
        r = model.training_step({"inputs": ids, "targets": ids}, opt)
    assert r.task_loss < r0.task_loss
    assert model(ids).output.shape == (4, 6, 20)


def test_system_bf16_autocast_on_cpu_trains(seed):
    model = MixtureOfExpertsSystem(_cfg(amp_dtype="bf16"))
    with model._autocast(torch.device("cpu")):
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16
        assert torch.is_autocast_enabled("cpu")
    x, y = _task()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    first = model.training_step((x, y), opt)
    for _ in range(20):
        last = model.training_step((x, y), opt)
    assert last.task_loss < first.task_loss
    # float16 on CPU also runs in bfloat16 (CPU autocast has no fast float16 path).
    fp16 = MixtureOfExpertsSystem(_cfg(amp_dtype="fp16"))
    with fp16._autocast(torch.device("cpu")):
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16
    assert fp16._grad_scaler(torch.device("cpu")) is None


def test_system_clips_gradients_to_configured_norm(seed):
    model = MixtureOfExpertsSystem(_cfg(grad_clip_norm=1e-3))
    x, y = _task()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    r = model.training_step((x, y), opt)
    assert r.grad_norm is not None and r.grad_norm > 1e-3
    # SGD step size is lr * clipped grad: the total update norm is the clip norm.
    sq = sum(float((p.detach() - before[n]).pow(2).sum()) for n, p in model.named_parameters())
    assert sq**0.5 == pytest.approx(1e-3, rel=1e-3)


def test_system_gradient_checkpointing_recomputes_experts_with_same_gradients(seed, monkeypatch):
    x, y = _task(32)
    plain = MixtureOfExpertsSystem(_cfg())
    ckpt = MixtureOfExpertsSystem(_cfg(gradient_checkpointing=True))
    ckpt.load_state_dict(plain.state_dict())
    calls = []
    for block in ckpt.blocks:
        # (module hooks are silenced during checkpoint recomputation: count forward calls)
        def counting(*a, _f=block.moe.experts.forward):
            calls.append(1)
            return _f(*a)

        monkeypatch.setattr(block.moe.experts, "forward", counting)
    grads = []
    for model in (plain, ckpt):
        model.train()
        out = model(x)
        (F.cross_entropy(out.output, y) + out.aux_loss).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    # Each expert bank ran twice: forward, then recomputed in backward.
    assert len(calls) == 2 * len(ckpt.blocks)
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], msg=n)


def test_system_forward_compiles_fullgraph_without_graph_breaks(seed):
    model = MixtureOfExpertsSystem(_cfg()).eval()
    x = torch.randn(8, 12)
    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        expected = model(x).output
        torch.testing.assert_close(compiled(x).output, expected)


def test_system_training_forward_compiles_fullgraph_and_collects_reports(seed):
    model = MixtureOfExpertsSystem(_cfg()).train()
    x, y = _task(16)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    out = compiled(x)
    (F.cross_entropy(out.output, y) + out.aux_loss).backward()
    assert all(p.grad is not None for p in model.head.parameters())
    # The reports were added into the device accumulators inside the compiled graph.
    assert int(model.report_tokens.sum()) == 2 * 16 * 2


def test_system_predict_matches_eval_forward(seed):
    model = MixtureOfExpertsSystem(_cfg())
    x = torch.randn(5, 12)
    model.eval()
    with torch.no_grad():
        ref = model(x).output
    torch.testing.assert_close(model.predict(x), ref)


def test_system_predict_uses_configured_compile_mode_inductor(seed):
    # The one test that runs the default inductor backend (slow to compile on small CPUs).
    model = MixtureOfExpertsSystem(_cfg(compile_mode="default"))
    x = torch.randn(6, 12)
    model.eval()
    with torch.no_grad():
        ref = model(x).output
    out = model.predict(x)
    assert model._compiled is not None and model._compiled[0] == "default"
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    assert model.compiled() is model._compiled[1]  # cached


def test_system_forward_rejects_wrong_input_width():
    model = MixtureOfExpertsSystem(_cfg())
    with pytest.raises(ValueError, match=r"\[\.\.\., 12\]"):
        model(torch.randn(4, 7))


def test_system_save_load_gives_identical_outputs(tmp_path, seed):
    model = MixtureOfExpertsSystem(_cfg(tmp_path, consolidation_interval=2))
    x, y = _task()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(4):
        model.training_step((x, y), opt)
    model.eval()
    with torch.no_grad():
        ref = model(x)
    model.save(tmp_path / "saved")
    model.close()
    files = sorted(os.listdir(tmp_path / "saved"))
    assert files == ["config.json", "knowledge.sqlite", "model.safetensors"]
    # No pickle anywhere: safetensors (JSON header), JSON, SQLite.
    with open(tmp_path / "saved" / "knowledge.sqlite", "rb") as f:
        assert f.read(16) == b"SQLite format 3\x00"
    with open(tmp_path / "saved" / "model.safetensors", "rb") as f:
        f.read(8)
        assert f.read(1) == b"{"

    loaded = MixtureOfExpertsSystem.load(tmp_path / "saved")
    assert loaded.config == model.config.replace(
        kg_path=str(tmp_path / "saved" / "knowledge.sqlite")
    )
    assert loaded.step == 4
    loaded.eval()
    with torch.no_grad():
        out = loaded(x)
    assert torch.equal(out.output, ref.output)
    for a, b in zip(out.routing, ref.routing):
        assert torch.equal(a.ids, b.ids)
    assert len(loaded.knowledge_graph) > 0
    loaded.close()


def test_system_load_rejects_a_foreign_weights_file(tmp_path):
    from safetensors.torch import save_file

    model = MixtureOfExpertsSystem(_cfg())
    model.save(tmp_path)
    save_file({"w": torch.zeros(2)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="not a saved system"):
        MixtureOfExpertsSystem.load(tmp_path)


def test_system_consolidation_writes_expert_nodes_and_survives_reopen(tmp_path, seed):
    from moe_framework.knowledge_graph import KnowledgeGraph

    cfg = _cfg(tmp_path, consolidation_interval=3, specialisation_names=["a", "b", "c", "d"])
    model = MixtureOfExpertsSystem(cfg)
    x, y = _task()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    flags = [model.training_step((x, y), opt).stats["consolidated"] for _ in range(6)]
    assert flags == [False, False, True, False, False, True]
    # The accumulators were drained by the last consolidation.
    assert int(model.report_tokens.sum()) == 0
    nodes = {n.id: n for n in model.knowledge_graph.iter_nodes()}
    assert nodes
    keys = {(n.metadata["layer"], n.metadata["expert"]) for n in nodes.values()}
    assert {layer for layer, _ in keys} == {0, 1}
    assert all(0 <= e < 4 for _, e in keys)
    model.close()

    with KnowledgeGraph.open(cfg.kg_path, readonly=True) as kg:
        again = {n.id: n for n in kg.iter_nodes()}
    assert again.keys() == nodes.keys()
    for i in nodes:
        assert again[i].metadata == nodes[i].metadata
        assert (again[i].embedding == nodes[i].embedding).all()


def test_system_consolidated_embedding_is_token_weighted_mean_of_reports(tmp_path, seed):
    model = MixtureOfExpertsSystem(_cfg(tmp_path))
    model.eval()
    xs = [torch.randn(8, 12), torch.randn(20, 12)]
    outs = []
    with torch.no_grad():
        for x in xs:
            outs.append(model(x).routing[0].reports)
    n = sum(r.token_count.double() for r in outs)
    expected = sum(r.mean_output.double() * r.token_count.double()[:, None] for r in outs)
    expected = expected / n.clamp_min(1)[:, None]
    pending = model.pending_reports()[0]
    torch.testing.assert_close(pending.mean_output.double(), expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(pending.token_count, n.long())


def test_system_query_knowledge_graph_returns_similarity_and_metadata(tmp_path, seed):
    model = MixtureOfExpertsSystem(_cfg(tmp_path))
    x, y = _task()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.training_step((x, y), opt)
    model.consolidate()
    hits = model.query_knowledge_graph(x[y == 0], top_k=3, from_inputs=True)
    assert 1 <= len(hits) <= 3
    sims = [h["similarity"] for h in hits]
    assert sims == sorted(sims, reverse=True) and all(-1.0 <= s <= 1.0 + 1e-6 for s in sims)
    assert all({"id", "similarity", "type", "metadata"} <= set(h) for h in hits)
    # A stored node's own embedding finds itself first with cosine 1.
    node = next(iter(model.knowledge_graph.iter_nodes()))
    best = model.query_knowledge_graph(torch.from_numpy(node.embedding), top_k=1)[0]
    assert best["id"] == node.id and best["similarity"] == pytest.approx(1.0, abs=1e-5)
    many = model.query_knowledge_graph(torch.randn(2, 16), top_k=2)
    assert len(many) == 2
    with pytest.raises(ValueError, match="d_model=16"):
        model.query_knowledge_graph(torch.randn(12))
    model.close()


def test_system_knowledge_graph_needs_kg_path():
    model = MixtureOfExpertsSystem(_cfg())
    with pytest.raises(ValueError, match="kg_path"):
        model.consolidate()


def test_system_kg_checkpoint_interval_takes_snapshots(tmp_path, seed):
    cfg = _cfg(tmp_path, consolidation_interval=1, kg_checkpoint_interval=2, kg_snapshots_kept=2)
    model = MixtureOfExpertsSystem(cfg)
    x, y = _task(32)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(6):
        model.training_step((x, y), opt)
    assert len(model.knowledge_graph.list_checkpoints()) == 2
    model.close()


def test_system_bias_update_moves_selection_bias(seed):
    model = MixtureOfExpertsSystem(_cfg(bias_update_rate=0.01, aux_loss_weight=0.0))
    x, y = _task()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    model.training_step((x, y), opt)
    bias = model.blocks[0].moe.supervisor.selection_bias
    assert bias.abs().sum() > 0


def test_system_can_be_captured_with_sqlite_reader_while_open(tmp_path, seed):
    # save() copies the live store through SQLite's backup API while the writer holds it open.
    model = MixtureOfExpertsSystem(_cfg(tmp_path))
    model.training_step(_task(16), torch.optim.SGD(model.parameters(), lr=0.1))
    model.consolidate()
    model.save(tmp_path / "copy")
    con = sqlite3.connect(tmp_path / "copy" / "knowledge.sqlite")
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    con.close()
    model.close()


@pytest.mark.cuda
def test_system_fp16_training_step_on_cuda_uses_grad_scaler(seed):
    model = MixtureOfExpertsSystem(_cfg(amp_dtype="fp16")).cuda()
    x, y = (t.cuda() for t in _task())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    first = model.training_step((x, y), opt)
    for _ in range(20):
        last = model.training_step((x, y), opt)
    assert model._scaler is not None
    assert last.task_loss < first.task_loss


@pytest.mark.cuda
def test_system_predict_with_cuda_graphs_matches_eager(seed):
    model = MixtureOfExpertsSystem(_cfg(cuda_graphs=True)).cuda().eval()
    x = torch.randn(8, 12, device="cuda")
    with torch.no_grad():
        ref = model(x).output
    torch.testing.assert_close(model.predict(x), ref)
    x2 = torch.randn(8, 12, device="cuda")
    with torch.no_grad():
        ref2 = model(x2).output
    torch.testing.assert_close(model.predict(x2), ref2)
