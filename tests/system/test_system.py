import json
import os
import sqlite3
import subprocess
import sys
import textwrap

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
        k=2,
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
    cfg = _cfg(input_dim=None, vocab_size=20, output_dim=20)
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
        # (the experts a CheckpointedExperts wraps are its .inner)
        def counting(*a, _f=block.moe.experts.inner.forward):
            calls.append(1)
            return _f(*a)

        monkeypatch.setattr(block.moe.experts.inner, "forward", counting)
    grads = []
    for model in (plain, ckpt):
        model.train()
        out = model(x)
        (F.cross_entropy(out.output, y) + out.aux_loss).backward()
        named = model.named_parameters()
        grads.append({n.replace(".inner.", "."): p.grad.clone() for n, p in named})
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


def _expected_top_tokens(outs, E, r):
    """Per layer, per expert: the r (position in the token stream, weight) of highest weight
    over all forwards, ties to the earlier position (a plain-Python reference)."""
    per = {}
    seen = 0
    for routing in outs:
        T = routing[0].ids.shape[0]
        for layer, info in enumerate(routing):
            for t in range(T):
                for j in range(info.ids.shape[1]):
                    e = int(info.ids[t, j])
                    if e >= 0:
                        per.setdefault((layer, e), []).append(
                            (-float(info.weights[t, j]), seen + t)
                        )
        seen += T
    return {key: [p for _, p in sorted(v)[:r]] for key, v in per.items()}


def test_system_consolidation_files_each_experts_top_tokens_of_the_interval(tmp_path, seed):
    model = MixtureOfExpertsSystem(_cfg(tmp_path))
    model.eval()
    outs = []
    with torch.no_grad():
        for n in (8, 20, 5):
            outs.append(model(torch.randn(n, 12)).routing)
    want = _expected_top_tokens(outs, 4, 4)
    for layer, pending in enumerate(model.pending_reports()):
        for e in range(4):
            got = [int(t) for t in pending.top_tokens[e] if t >= 0]
            assert got == want.get((layer, e), []), (layer, e)
    model.consolidate()
    nodes = list(model.knowledge_graph.iter_nodes())
    assert nodes
    for node in nodes:
        m = node.metadata
        assert m["top_tokens"] and m["top_tokens"] == want[(m["layer"], m["expert"])]
    # the next interval starts from an empty stream
    assert (model.pending_reports()[0].top_tokens == -1).all()
    model.close()


def test_system_top_tokens_are_collected_inside_a_fullgraph_compiled_forward(seed):
    model = MixtureOfExpertsSystem(_cfg()).eval()
    x = torch.randn(6, 12)
    with torch.no_grad():
        for _ in range(2):
            model(x)
    expected = [p.top_tokens.clone() for p in model.pending_reports()]
    model.report_top_weight.fill_(-1.0)
    model.report_top_index.fill_(-1)
    model.report_seen.zero_()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        for _ in range(2):
            compiled(x)
    for want, got in zip(expected, model.pending_reports()):
        assert (want >= 0).any() and torch.equal(want, got.top_tokens)


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
    cfg = _cfg(tmp_path, consolidation_interval=1, kg_checkpoint_interval=2, kg_keep_checkpoints=2)
    model = MixtureOfExpertsSystem(cfg)
    x, y = _task(32)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(6):
        model.training_step((x, y), opt)
    assert len(model.knowledge_graph.list_checkpoints()) == 2
    model.close()


def test_system_bias_update_moves_selection_bias(seed):
    model = MixtureOfExpertsSystem(_cfg(bias_update_rate=0.01, load_balance_coef=0.0))
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


# ------------------------------------------------------------------------------------------------
# save / load under hostile use: other spellings of the live store, planted files


def _trained(tmp_path, steps=2, **kw):
    model = MixtureOfExpertsSystem(_cfg(tmp_path, **kw))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(steps):
        model.training_step(_task(32), opt)
    model.consolidate()
    return model


def _read_st(path):
    data = open(path, "rb").read()
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def _write_st(path, header, body):
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw + body)


def _edit_header(path, fn):
    header, body = _read_st(path)
    fn(header)
    _write_st(path, header, body)


def _fill_rows(kg, batches=40, rows=100):
    import numpy as np

    rng = np.random.default_rng(0)
    meta = {"blob": "x" * 2048}
    for _ in range(batches):
        kg.add_nodes_batch(
            rng.standard_normal((rows, kg.dim)).astype("float32"), "n", [meta] * rows
        )


def _check_store(path, at_least):
    from moe_framework.knowledge_graph import KnowledgeGraph

    con = sqlite3.connect(path)
    assert con.execute("PRAGMA quick_check").fetchone()[0] == "ok"
    con.close()
    with KnowledgeGraph.open(path, readonly=True) as kg:
        nodes = list(kg.iter_nodes())
        assert len(nodes) == len(kg) >= at_least
        for n in nodes:
            assert kg.get_node(n.id).metadata == n.metadata


def test_system_save_into_its_own_directory_through_a_symlink_keeps_the_live_store(tmp_path, seed):
    # The reproducer: load through runs/latest -> ckpt-1, save through runs/ckpt-1.
    runs = tmp_path / "runs"
    model = _trained(tmp_path)
    model.save(runs / "ckpt-1")
    model.close()
    os.symlink("ckpt-1", runs / "latest")
    m2 = MixtureOfExpertsSystem.load(runs / "latest")
    before = len(m2.knowledge_graph)
    inode = os.stat(runs / "ckpt-1" / "knowledge.sqlite").st_ino
    m2.save(runs / "ckpt-1")  # the same directory, another spelling: nothing copied over it
    assert os.stat(runs / "ckpt-1" / "knowledge.sqlite").st_ino == inode
    _fill_rows(m2.knowledge_graph)
    m2.close()
    _check_store(runs / "ckpt-1" / "knowledge.sqlite", before + 4000)
    again = MixtureOfExpertsSystem.load(runs / "ckpt-1")
    assert len(again.knowledge_graph) == before + 4000
    again.close()


def test_system_save_into_its_own_directory_folds_the_wal_into_the_store(tmp_path, seed):
    model = _trained(tmp_path)
    model.save(tmp_path / "m")
    model.close()
    m2 = MixtureOfExpertsSystem.load(tmp_path / "m")
    _fill_rows(m2.knowledge_graph, batches=2)
    n = len(m2.knowledge_graph)
    m2.save(tmp_path / "m")
    # While the writer stays open, the store file alone (no WAL beside it) holds every row.
    copy = tmp_path / "alone.sqlite"
    copy.write_bytes((tmp_path / "m" / "knowledge.sqlite").read_bytes())
    _check_store(copy, n)
    m2.close()


def test_system_save_into_a_directory_holding_a_hard_link_of_the_store(tmp_path, seed):
    model = _trained(tmp_path)
    store = model.knowledge_graph.path
    (tmp_path / "linked").mkdir()
    os.link(store, tmp_path / "linked" / "knowledge.sqlite")
    before = len(model.knowledge_graph)
    model.save(tmp_path / "linked")
    _fill_rows(model.knowledge_graph)
    model.close()
    _check_store(store, before + 4000)


def test_system_save_replaces_a_symlinked_destination_instead_of_writing_through_it(tmp_path, seed):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    (tmp_path / "out").mkdir()
    os.symlink(victim, tmp_path / "out" / "knowledge.sqlite")
    model = _trained(tmp_path)
    model.save(tmp_path / "out")
    model.close()
    assert victim.read_text() == "keep me"
    assert not os.path.islink(tmp_path / "out" / "knowledge.sqlite")
    _check_store(tmp_path / "out" / "knowledge.sqlite", 1)


def test_system_save_refuses_to_write_weights_over_the_live_store(tmp_path, seed):
    model = _trained(tmp_path)
    (tmp_path / "out").mkdir()
    os.symlink(model.knowledge_graph.path, tmp_path / "out" / "model.safetensors")
    with pytest.raises(ValueError, match="would overwrite the live knowledge-graph store"):
        model.save(tmp_path / "out")
    _check_store(model.knowledge_graph.path, 1)
    model.close()


def test_system_save_honours_the_umask_and_leaves_no_temporary_files(tmp_path, seed):
    model = _trained(tmp_path)
    for umask, mode in ((0o022, 0o644), (0o077, 0o600), (0o002, 0o664)):
        old = os.umask(umask)
        try:
            model.save(tmp_path / f"m{umask:o}")
        finally:
            os.umask(old)
        folder = tmp_path / f"m{umask:o}"
        for name in ("model.safetensors", "config.json"):
            assert os.stat(folder / name).st_mode & 0o777 == mode, (name, oct(umask))
        assert sorted(os.listdir(folder)) == [
            "config.json",
            "knowledge.sqlite",
            "model.safetensors",
        ]
    model.close()


def test_system_crash_while_saving_weights_leaves_the_previous_save_loadable(
    tmp_path, seed, monkeypatch
):
    import safetensors.torch

    model = _trained(tmp_path, steps=1)
    model.save(tmp_path / "m")
    ref = open(tmp_path / "m" / "model.safetensors", "rb").read()

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    model.step = 7
    with pytest.raises(OSError, match="disk full"):
        model.save(tmp_path / "m")
    model.close()
    assert open(tmp_path / "m" / "model.safetensors", "rb").read() == ref
    assert sorted(os.listdir(tmp_path / "m")) == [
        "config.json",
        "knowledge.sqlite",
        "model.safetensors",
    ]
    MixtureOfExpertsSystem.load(tmp_path / "m").close()


def test_system_load_reads_a_directory_saved_by_the_previous_version(tmp_path, seed):
    # Exactly what save() wrote before: safetensors' save_file, and a config.json holding the
    # since-removed max_seq_len (and no track_stats).
    from safetensors.torch import save_file

    model = _trained(tmp_path)
    folder = tmp_path / "old"
    folder.mkdir()
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"), metadata={
        "format": "moe_framework.MixtureOfExpertsSystem/1", "step": "2"})  # fmt: skip
    old = model.config.to_dict()
    del old["track_stats"]
    old["max_seq_len"] = 1
    (folder / "config.json").write_text(json.dumps(old, indent=2, sort_keys=True))
    model.knowledge_graph.backup(folder / "knowledge.sqlite")
    with pytest.warns(DeprecationWarning, match="max_seq_len"):
        loaded = MixtureOfExpertsSystem.load(folder)
    assert loaded.step == 2
    x = torch.randn(5, 12)
    model.eval()
    loaded.eval()
    with torch.no_grad():
        assert torch.equal(loaded(x).output, model(x).output)
    assert len(loaded.knowledge_graph) == len(model.knowledge_graph)
    loaded.close()
    model.close()


def test_system_load_of_a_bf16_saved_model_gives_float32_weights(tmp_path, seed):
    model = MixtureOfExpertsSystem(_cfg()).to(torch.bfloat16)
    model.save(tmp_path / "m")
    loaded = MixtureOfExpertsSystem.load(tmp_path / "m")
    w = loaded.head.weight
    assert w.dtype == torch.float32 and torch.equal(w, model.head.weight.float())


@pytest.mark.parametrize("name", ["knowledge.sqlite", "model.safetensors", "config.json"])
def test_system_load_refuses_a_symlink_leaving_the_model_directory(tmp_path, seed, name):
    model = _trained(tmp_path)
    model.save(tmp_path / "m")
    model.close()
    outside = tmp_path / f"outside-{name}"
    os.replace(tmp_path / "m" / name, outside)
    os.symlink(outside, tmp_path / "m" / name)
    with pytest.raises(ValueError, match="outside the model directory"):
        MixtureOfExpertsSystem.load(tmp_path / "m")


def test_system_load_refuses_a_planted_wal_symlink_beside_the_store(tmp_path, seed):
    model = _trained(tmp_path)
    model.save(tmp_path / "m")
    model.close()
    os.symlink(tmp_path / "elsewhere-wal", tmp_path / "m" / "knowledge.sqlite-wal")  # dangling
    with pytest.raises(ValueError, match="knowledge.sqlite-wal is a symlink.*outside"):
        MixtureOfExpertsSystem.load(tmp_path / "m")


def test_system_load_follows_symlinks_that_stay_inside_the_directory(tmp_path, seed):
    model = _trained(tmp_path)
    model.save(tmp_path / "m")
    model.close()
    sub = tmp_path / "m" / "blobs"
    sub.mkdir()
    for name in ("knowledge.sqlite", "model.safetensors", "config.json"):
        os.replace(tmp_path / "m" / name, sub / name)
        os.symlink(os.path.join("blobs", name), tmp_path / "m" / name)
    loaded = MixtureOfExpertsSystem.load(tmp_path / "m")
    assert len(loaded.knowledge_graph) > 0
    loaded.close()


def test_system_load_refuses_a_changed_dtype_in_the_weights_header(tmp_path):
    MixtureOfExpertsSystem(_cfg()).save(tmp_path)

    def to_i32(header):
        header["head.weight"]["dtype"] = "I32"  # same size: safetensors would reinterpret bits

    _edit_header(tmp_path / "model.safetensors", to_i32)
    with pytest.raises(ValueError, match="'head.weight' has dtype 'I32', expected a floating"):
        MixtureOfExpertsSystem.load(tmp_path)


def test_system_load_refuses_an_integer_buffer_saved_as_float(tmp_path):
    MixtureOfExpertsSystem(_cfg()).save(tmp_path)
    name = "blocks.0.moe.supervisor.load_accumulator"

    def to_f64(header):
        header[name]["dtype"] = "F64"

    _edit_header(tmp_path / "model.safetensors", to_f64)
    with pytest.raises(ValueError, match=f"'{name}' has dtype 'F64', expected 'I64'"):
        MixtureOfExpertsSystem.load(tmp_path)


def test_system_load_refuses_weights_whose_shape_disagrees_with_the_config(tmp_path):
    MixtureOfExpertsSystem(_cfg()).save(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["d_hidden"] = 32
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="config.json implies"):
        MixtureOfExpertsSystem.load(tmp_path)


@pytest.mark.parametrize("cut", ["truncate", "pad", "overlap"])
def test_system_load_refuses_weights_data_that_does_not_match_the_header(tmp_path, cut):
    MixtureOfExpertsSystem(_cfg()).save(tmp_path)
    path = tmp_path / "model.safetensors"
    header, body = _read_st(path)
    if cut == "truncate":
        body, match = body[:-4], "holds"
    elif cut == "pad":
        body, match = body + b"\0" * 4, "holds"
    else:
        first = min((v for k, v in header.items() if k != "__metadata__"),
                    key=lambda v: v["data_offsets"][0])  # fmt: skip
        second = min((v for k, v in header.items() if k != "__metadata__" and v is not first),
                     key=lambda v: v["data_offsets"][0])  # fmt: skip
        second["data_offsets"] = [o - 4 for o in second["data_offsets"]]
        match = "no gap or overlap"
    _write_st(path, header, body)
    with pytest.raises(ValueError, match=match):
        MixtureOfExpertsSystem.load(tmp_path)


def test_system_load_refuses_nan_weights_unless_allowed(tmp_path):
    MixtureOfExpertsSystem(_cfg()).save(tmp_path)
    path = tmp_path / "model.safetensors"
    header, body = _read_st(path)
    begin = header["head.weight"]["data_offsets"][0]
    body = body[:begin] + torch.tensor([float("nan")]).numpy().tobytes() + body[begin + 4 :]
    _write_st(path, header, body)
    with pytest.raises(ValueError, match="'head.weight'.*NaN or Inf.*allow_nonfinite=True"):
        MixtureOfExpertsSystem.load(tmp_path)
    loaded = MixtureOfExpertsSystem.load(tmp_path, allow_nonfinite=True)
    assert torch.isnan(loaded.head.weight.reshape(-1)[0])


@pytest.mark.parametrize("step", ["-5", "1.5", "abc", "", " 3", "9" * 40])
def test_system_load_refuses_a_step_that_is_not_a_non_negative_integer(tmp_path, step):
    MixtureOfExpertsSystem(_cfg()).save(tmp_path)

    def set_step(header):
        header["__metadata__"]["step"] = step

    _edit_header(tmp_path / "model.safetensors", set_step)
    with pytest.raises(ValueError, match="'step' must be a non-negative integer"):
        MixtureOfExpertsSystem.load(tmp_path)


def test_system_load_refuses_a_model_state_above_max_parameters(tmp_path):
    MixtureOfExpertsSystem(_cfg()).save(tmp_path)
    with pytest.raises(ValueError, match="pass a larger max_parameters"):
        MixtureOfExpertsSystem.load(tmp_path, max_parameters=100)
    MixtureOfExpertsSystem.load(tmp_path, max_parameters=10**6)


def test_system_load_refuses_a_missing_directory_or_file_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        MixtureOfExpertsSystem.load(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        MixtureOfExpertsSystem.load(tmp_path)


def _run_load(directory, timeout=120):
    """load() in a subprocess (a regression must not hang or bloat the suite); prints the error
    and the peak RSS growth in MB."""
    code = textwrap.dedent(
        """
        import resource, sys
        from moe_framework.system import MixtureOfExpertsSystem
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        try:
            MixtureOfExpertsSystem.load(sys.argv[1])
            print("LOADED")
        except (ValueError, OSError) as e:
            print("ERROR", type(e).__name__, e)
        grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
        print("RSS_GROWTH_MB", grown)
        """
    )
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", code, str(directory)], capture_output=True,
                         text=True, timeout=timeout, env=env)  # fmt: skip
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_system_load_compares_the_header_with_the_config_before_allocating(tmp_path):
    # A ~60 KB weights file with a config of 512 experts x 512 x 1024 (2 layers: 1.6e9 parameters,
    # 6.4 GB): refused from the header alone, without building the model.
    MixtureOfExpertsSystem(_cfg()).save(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg.update(num_experts=512, d_model=512, d_hidden=1024)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    out = _run_load(tmp_path)
    assert "ERROR ValueError" in out and "config.json implies" in out, out
    grown = float(out.split("RSS_GROWTH_MB")[1])
    assert grown < 200, out


@pytest.mark.parametrize("name", ["model.safetensors", "config.json", "knowledge.sqlite"])
def test_system_load_refuses_a_fifo_instead_of_hanging(tmp_path, seed, name):
    model = _trained(tmp_path)
    model.save(tmp_path / "m")
    model.close()
    os.remove(tmp_path / "m" / name)
    os.mkfifo(tmp_path / "m" / name)
    out = _run_load(tmp_path / "m", timeout=60)
    assert "ERROR ValueError" in out, out
    assert "not a regular file" in out or "is a FIFO, expected a regular file" in out, out


def test_routing_option_of_another_strategy_is_ignored_with_a_warning():
    # The flat config carries every strategy's options; expert choice has no scaling factor.
    cfg = MoEConfig(
        input_dim=6, output_dim=3, d_model=8, d_hidden=8, num_experts=4, k=2,
        strategy="expert_choice", capacity_factor=1.0, routed_scaling_factor=2.5,
    )  # fmt: skip
    with pytest.warns(UserWarning, match="routed_scaling_factor=2.5 does not apply"):
        system = MixtureOfExpertsSystem(cfg)
    assert system.routers()[0].strategy == "expert_choice"
    out = system(torch.randn(5, 6))
    assert out.output.shape == (5, 3)
