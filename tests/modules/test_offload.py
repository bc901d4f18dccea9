"""OffloadedExperts: bitwise equal to the resident layer, cache policy, prefetch, metrics, storage
files, errors, and a prefetch thread that never hangs a process (issue 16, part B)."""

import copy
import json
import os
import random
import subprocess
import sys
import threading
import time

import pytest
import torch
from torch import nn

import moe_framework
from moe_framework import ExpertBank, MixtureOfExpertsSystem, MoEConfig, MoELayer
from moe_framework.experts import CheckpointedExperts
from moe_framework.offload import (
    OffloadedExperts,
    PrefetchWorker,
    _NextLayerPlanner,
    close_offloaded,
    offload_experts,
    offload_metrics,
)
from moe_framework.offload_storage import DiskExpertStorage, write_expert_file

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# The folder holding the moe_framework under test (the installed wheel under `make test`, the
# in-place build otherwise): the child process must import the same one.
PKG_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(moe_framework.__file__)))


class _Stack(nn.Module):
    def __init__(self, layers):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x):
        for layer in self.layers:
            x = x + layer(x)[0]
        return x


def _offsets(counts, dropped=0):
    off = torch.zeros(len(counts) + 1, dtype=torch.long)
    off[1:] = torch.tensor(counts, dtype=torch.long).cumsum(0)
    return off, int(off[-1]) + dropped


def _wait_idle(module, timeout=10.0):
    # The prefetch thread has nothing left in flight or queued for these caches.
    end = time.monotonic() + timeout
    mods = [m for m in module.modules() if isinstance(m, OffloadedExperts)]
    while time.monotonic() < end:
        busy = any(1 in m._cache.state for m in mods)
        if not busy and all(m.worker is None or m.worker._q.empty() for m in mods):
            return
        time.sleep(0.005)
    raise AssertionError("prefetch did not finish")


@pytest.mark.parametrize("prefetch", [True, False])
def test_offloaded_stack_is_bitwise_equal_to_the_resident_one(tmp_path, seed, prefetch):
    rng = random.Random(seed)
    E = rng.choice([5, 8, 11])
    d, h = rng.choice([7, 16]), rng.choice([9, 24])
    dtype = rng.choice([torch.float32, torch.bfloat16])
    kw = dict(
        d_model=d,
        d_hidden=h,
        num_experts=E,
        k=rng.choice([1, 2, 3]),
        activation=rng.choice(["swiglu", "gelu"]),
        bias=rng.random() < 0.5,
        layout=rng.choice(["in_out", "out_in"]),
        dtype=dtype,
    )
    ref = _Stack([MoELayer.build(**kw) for _ in range(3)]).eval()
    off = copy.deepcopy(ref)
    slots = rng.randint(1, E - 1)
    policy = rng.choice(["lru", "lfu"])
    offload_experts(off, cache_slots=slots, storage=tmp_path, policy=policy, prefetch=prefetch)
    try:
        assert all(isinstance(layer.experts, OffloadedExperts) for layer in off.layers)
        assert sorted(os.listdir(tmp_path)) == [f"experts_{i}.safetensors" for i in range(3)]
        assert not list(off.parameters()) or all(
            "experts" not in n for n, _ in off.named_parameters()
        )
        with torch.no_grad():
            for T in (rng.randint(1, 9), 1, 0, rng.randint(10, 40)):
                x = torch.randn(T, d, dtype=dtype)
                assert torch.equal(off(x), ref(x)), (T, kw, slots, policy)
        m = offload_metrics(off)
        assert m["requests"] == m["hits"] + m["inflight_waits"] + m["misses"] > 0
        # every load copies one expert's bytes, counted from the bank's own shapes
        bank = ref.layers[0].experts
        per_expert = sum(p[0].numel() * p.element_size() for p in bank.parameters())
        assert m["bytes_moved"] == m["loads"] * per_expert
        assert 0.0 <= m["hit_rate"] <= 1.0 and m["stall_s"] >= 0.0
        assert m["prefetch_error"] is None if "prefetch_error" in m else True
        if not prefetch:
            assert m["prefetch_loads"] == 0 and m["loads"] == m["misses"]
    finally:
        close_offloaded(off)


def test_offloaded_experts_direct_call_dropped_rows_noncontiguous_and_host_storage(seed):
    E, d, h = 6, 10, 12
    bank = ExpertBank(d_model=d, d_hidden=h, num_experts=E, bias=True)
    off = OffloadedExperts.from_bank(bank, cache_slots=2, storage="host")
    counts = [3, 0, 5, 1, 0, 4]
    offsets, M = _offsets(counts, dropped=3)
    x = torch.randn(d, M).t()  # non-contiguous [M, d]
    with torch.no_grad():
        want = bank(x.contiguous(), offsets)
        got = off(x, offsets)
        assert torch.equal(got, want)
        assert torch.equal(got[M - 3 :], torch.zeros(3, d))
        # zero rows and no routed expert: zeros, nothing loaded
        empty = off(torch.randn(0, d), torch.zeros(E + 1, dtype=torch.long))
    assert empty.shape == (0, d)
    m = off.metrics()
    # 4 active experts through 2 slots: two groups, each expert loaded once
    assert m["requests"] == 4 and m["misses"] == 4 and m["loads"] == 4
    assert len(off.cached_experts()) == 2


def _simulate(policy, slots, sequence):
    # Plain model of the policies: LRU evicts the least recently used; LFU the least used so far
    # (uses counted since the start), ties to the least recently used.
    cache, last, freq, hits = [], {}, {}, 0
    for t, e in enumerate(sequence):
        freq[e] = freq.get(e, 0) + 1
        if e in cache:
            hits += 1
        else:
            if len(cache) == slots:
                key = (lambda c: (freq[c], last[c])) if policy == "lfu" else (lambda c: last[c])
                cache.remove(min(cache, key=key))
            cache.append(e)
        last[e] = t
    return sorted(cache), hits


@pytest.mark.parametrize("policy", ["lru", "lfu"])
def test_cache_policy_matches_a_plain_model_of_it(seed, policy):
    rng = random.Random(seed)
    E, slots = 7, 3
    bank = ExpertBank(d_model=4, d_hidden=5, num_experts=E)
    off = OffloadedExperts.from_bank(bank, cache_slots=slots, storage="host", policy=policy)
    sequence = [rng.choice([0, 0, 0, 1, 1, 2, 3, 4, 5, 6]) for _ in range(60)]
    x = torch.randn(1, 4)
    with torch.no_grad():
        for e in sequence:
            counts = [0] * E
            counts[e] = 1
            off(x, _offsets(counts)[0])
    want_cache, want_hits = _simulate(policy, slots, sequence)
    assert off.cached_experts() == want_cache
    m = off.metrics()
    assert (m["hits"], m["misses"], m["requests"]) == (want_hits, 60 - want_hits, 60)


def test_prefetch_loads_ahead_and_the_forward_then_hits(tmp_path, seed):
    E = 8
    bank = ExpertBank(d_model=6, d_hidden=7, num_experts=E)
    worker = PrefetchWorker()
    try:
        path = write_expert_file(bank, tmp_path / "e.safetensors")
        off = OffloadedExperts.open(path, cache_slots=4, worker=worker)
        off.prefetch([5, 2, 5, 7])
        _wait_idle(off)
        assert off.cached_experts() == [2, 5, 7]
        counts = [0] * E
        counts[2], counts[5], counts[7] = 2, 1, 3
        offsets, M = _offsets(counts)
        x = torch.randn(M, 6)
        with torch.no_grad():
            assert torch.equal(off(x, offsets), bank(x, offsets))
        m = off.metrics()
        assert (m["hits"], m["misses"], m["prefetch_loads"]) == (3, 0, 3)
        with pytest.raises(ValueError, match=r"expert ids must be in \[0, 8\), got 8"):
            off.prefetch([8])
    finally:
        worker.close()
    assert not worker.alive
    off.close()
    counts = [0] * E
    counts[0] = 1
    with torch.no_grad(), pytest.raises(RuntimeError, match="e.safetensors is closed"):
        off(torch.randn(1, 6), _offsets(counts)[0])


def test_router_hook_prefetches_this_layer_and_predicts_the_next(tmp_path, seed):
    torch.manual_seed(seed)
    E = 8
    layers = [MoELayer.build(d_model=8, d_hidden=8, num_experts=E, k=2) for _ in range(2)]
    model = _Stack(layers)
    offload_experts(
        model,
        cache_slots=E,
        storage=tmp_path,
        prefetch_next=3,
        prefetch_threshold=0.0,
        prefetch=True,
    )
    off0, off1 = (layer.experts for layer in layers)
    x = torch.randn(16, 8)
    try:
        with torch.no_grad():
            d0 = layers[0].supervisor(x)  # the router alone: its hook prefetches its picks
        _wait_idle(model)
        picked = sorted(set(d0.ids[d0.ids >= 0].tolist()))
        assert off0.cached_experts() == picked
        m0 = off0.metrics()
        assert (m0["prefetch_loads"], m0["requests"]) == (len(picked), 0)
        assert off1.cached_experts() == []  # nothing is known about layer 1 yet

        with torch.no_grad():
            model(x)  # the planner sees which layer-1 experts these tokens went to
            d1 = layers[1].supervisor(x + layers[0](x)[0])
        assert off0.metrics()["misses"] == 0  # every expert of layer 0 came from the prefetch
        calls = []
        off1.prefetch = calls.append  # record what layer 0's hook asks of layer 1
        x2 = torch.randn(4, 8)
        with torch.no_grad():
            d2 = layers[0].supervisor(x2)
        # a predicted expert is one that tokens of x2's layer-0 experts went to in layer 1
        now = set(d2.ids.flatten().tolist())
        reachable = {
            b for t in range(16) if now & set(d0.ids[t].tolist()) for b in d1.ids[t].tolist()
        }
        assert calls and len(calls[-1]) == min(3, len(reachable))
        assert set(calls[-1]) <= reachable
    finally:
        close_offloaded(model)


def test_next_layer_planner_learns_transitions_then_predicts_them():
    E = 6
    mods = [
        OffloadedExperts.from_bank(
            ExpertBank(d_model=2, d_hidden=2, num_experts=E), cache_slots=2, storage="host"
        )
        for _ in range(2)
    ]
    planner = _NextLayerPlanner(mods, [2, 2], threshold=0.5)
    # tokens routed to expert a in layer 0 go to (a + 1) % E and (a + 3) % E in layer 1
    for _ in range(3):
        ids0 = torch.randint(0, E, (32, 1), dtype=torch.int32)
        planner.observe(0, ids0)
        planner.observe(1, torch.cat([(ids0 + 1) % E, (ids0 + 3) % E], 1))
    pred = planner.observe(0, torch.tensor([[4], [-1]], dtype=torch.int32))
    assert sorted(pred) == [1, 5]
    assert planner.observe(1, torch.tensor([[1, 5], [0, 0]])) is None  # last layer
    # a flat table (every expert equally likely next) passes no expert over the threshold
    flat = _NextLayerPlanner(mods, [2, 2], threshold=0.5)
    for a in range(E):
        flat.observe(0, torch.full((E, 1), a, dtype=torch.int32))
        flat.observe(1, torch.arange(E, dtype=torch.int32).unsqueeze(1))
    assert flat.observe(0, torch.tensor([[2]], dtype=torch.int32)) is None
    # ... until the batch is large enough that each expert is likely used by one of its tokens
    assert len(flat.observe(0, torch.full((12, 1), 2, dtype=torch.int32))) == 2


def test_offloaded_system_matches_the_resident_system(tmp_path, seed):
    cfg = MoEConfig(
        d_model=12, num_experts=8, k=2, num_layers=2, d_hidden=16, output_dim=3, kg_path=None
    )
    torch.manual_seed(seed)
    ref = MixtureOfExpertsSystem(cfg).eval()
    off = copy.deepcopy(ref)
    offload_experts(off, cache_slots=2, storage=tmp_path)
    try:
        x = torch.randn(2, 5, 12)
        with torch.no_grad():
            assert torch.equal(off(x).output, ref(x).output)
            assert torch.equal(off(x).output, ref(x).output)
        with pytest.raises(RuntimeError, match=r"blocks.0.moe.experts\) has no state dict"):
            off.save(tmp_path / "saved")
    finally:
        close_offloaded(off)
        ref.close()
        off.close()


def test_mapped_file_pages_leave_the_resident_set_after_each_load(tmp_path, seed):
    E, d, h = 8, 64, 256
    bank = ExpertBank(d_model=d, d_hidden=h, num_experts=E)
    path = str(write_expert_file(bank, tmp_path / "big.safetensors"))
    off = OffloadedExperts.open(path, cache_slots=1)
    x = torch.randn(1, d)
    with torch.no_grad():
        for e in range(E):
            counts = [0] * E
            counts[e] = 1
            off(x, _offsets(counts)[0])
    rss_kb = 0
    with open("/proc/self/smaps") as f:
        inside = False
        for line in f:
            if "-" in line.split()[0] and len(line.split()) >= 5:
                inside = line.rstrip().endswith(path)
            elif inside and line.startswith("Rss:"):
                rss_kb += int(line.split()[1])
    file_kb = os.path.getsize(path) // 1024
    # 8 experts of 192 KiB went through the mapping; at most a page or two per expert stays
    assert file_kb > 1000 and rss_kb < 64, (rss_kb, file_kb)


def test_expert_file_is_plain_safetensors_and_bad_files_are_refused(tmp_path):
    from safetensors.torch import load_file

    bank = ExpertBank(d_model=3, d_hidden=4, num_experts=3, bias=True, layout="out_in")
    path = write_expert_file(bank, tmp_path / "x.safetensors")
    loaded = load_file(path)
    assert torch.equal(loaded["2.w_in"], bank.weight_in[2].detach())
    assert torch.equal(loaded["1.b_out"], bank.b_out[1].detach())
    st = DiskExpertStorage(path)
    assert st.config["layout"] == "out_in" and st.config["num_experts"] == 3
    st.close()

    raw = open(path, "rb").read()
    (tmp_path / "short.safetensors").write_bytes(raw[: len(raw) - 10])
    with pytest.raises(ValueError, match="does not fit its shape"):
        DiskExpertStorage(tmp_path / "short.safetensors")
    (tmp_path / "tiny").write_bytes(b"abc")
    with pytest.raises(ValueError, match="too short to be a safetensors file"):
        DiskExpertStorage(tmp_path / "tiny")
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not an offloaded-experts file"):
        DiskExpertStorage(tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="not a regular file"):
        DiskExpertStorage(tmp_path)
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    header["0.w_out"]["dtype"] = "F16"
    new = json.dumps(header).encode()
    (tmp_path / "dtype.safetensors").write_bytes(
        len(new).to_bytes(8, "little") + new + raw[8 + n :]
    )
    with pytest.raises(ValueError, match="'0.w_out' must have dtype F32"):
        DiskExpertStorage(tmp_path / "dtype.safetensors")


def test_clear_errors(tmp_path):
    bank = ExpertBank(d_model=4, d_hidden=4, num_experts=4)
    for slots in (0, 5, True, 1.5):
        with pytest.raises(ValueError, match="cache_slots must be"):
            offload_experts(bank, cache_slots=slots)
    with pytest.raises(ValueError, match="policy must be one of"):
        offload_experts(bank, cache_slots=2, policy="fifo")
    with pytest.raises(ValueError, match="storage must be"):
        offload_experts(bank, cache_slots=2, storage=3)
    with pytest.raises(ValueError, match="prefetch_next must be"):
        offload_experts(bank, cache_slots=2, prefetch_next=-1)
    layer = MoELayer.build(d_model=4, d_hidden=4, num_experts=4, k=2)
    with pytest.raises(ValueError, match="prefetch_threshold must be a number in"):
        offload_experts(layer, cache_slots=2, prefetch_threshold=1.5)
    with pytest.raises(ValueError, match="holding MoELayers, got Linear with none"):
        offload_experts(nn.Linear(2, 2), cache_slots=1)

    layer = MoELayer.build(d_model=4, d_hidden=4, num_experts=4, k=2, checkpoint_experts=True)
    assert isinstance(layer.experts, CheckpointedExperts)
    offload_experts(layer, cache_slots=2, prefetch=False)
    with pytest.raises(ValueError, match="layer 0's experts is already offloaded"):
        offload_experts(layer, cache_slots=2)
    layer.experts = nn.Linear(4, 4)
    layer.experts.num_experts = 4
    with pytest.raises(ValueError, match="must be an ExpertBank .*got Linear"):
        offload_experts(layer, cache_slots=2)

    off = OffloadedExperts.from_bank(bank, cache_slots=2)
    offsets = torch.tensor([0, 1, 1, 1, 1])
    with pytest.raises(
        ValueError, match=r"x_sorted must be torch.float32 on cpu .*got torch.float64"
    ):
        off(torch.randn(1, 4, dtype=torch.float64), offsets)
    with pytest.raises(ValueError, match=r"x_sorted must be \[M, 4\], got \(1, 3\)"):
        off(torch.randn(1, 3), offsets)
    with pytest.raises(ValueError, match=r"offsets must have shape \[5\], got \(4,\)"):
        off(torch.randn(1, 4), offsets[:4])
    with pytest.raises(ValueError, match="offsets must be non-decreasing"):
        off(torch.randn(1, 4), torch.tensor([0, 2, 1, 1, 1]))
    with pytest.raises(RuntimeError, match="inference-only"):
        off(torch.randn(1, 4, requires_grad=True), offsets)
    with pytest.raises(ValueError, match="bank must be an ExpertBank"):
        OffloadedExperts.from_bank(nn.Linear(2, 2), cache_slots=1)


def test_concurrent_forwards_and_prefetches_stay_correct(seed):
    E = 6
    bank = ExpertBank(d_model=5, d_hidden=6, num_experts=E)
    worker = PrefetchWorker()
    off = OffloadedExperts.from_bank(bank, cache_slots=2, worker=worker)
    errors = []

    def run(s):
        g = torch.Generator().manual_seed(s)
        try:
            for _ in range(15):
                counts = torch.randint(0, 3, (E,), generator=g).tolist()
                offsets, M = _offsets(counts)
                x = torch.randn(M, 5, generator=g)
                off.prefetch(torch.randint(0, E, (3,), generator=g).tolist())
                with torch.no_grad():
                    if not torch.equal(off(x, offsets), bank(x, offsets)):
                        errors.append("mismatch")
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(repr(exc))

    threads = [threading.Thread(target=run, args=(seed + i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    worker.close()
    assert not errors and not any(t.is_alive() for t in threads)


_EXIT_SCRIPT = """
import sys, torch
sys.path.insert(0, {pkg_parent!r})
from moe_framework import MoELayer
from moe_framework.offload import offload_experts
torch.set_num_threads(1)
layers = torch.nn.Sequential(*[MoELayer.build(d_model=8, d_hidden=8, num_experts=8) for _ in range(2)])
offload_experts(layers, cache_slots=2, storage={folder!r}, prefetch=True)
with torch.no_grad():
    x = torch.randn(4, 8)
    for layer in layers:
        x = layer(x)[0]
# many queued prefetches, never closed: the interpreter must still exit at once
for _ in range(200):
    layers[0].experts.prefetch(range(8))
print("done", flush=True)
"""


def test_prefetch_thread_never_keeps_the_interpreter_alive(tmp_path):
    script = _EXIT_SCRIPT.format(pkg_parent=PKG_PARENT, folder=str(tmp_path))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "done"


def test_the_docs_example_runs():
    text = open(os.path.join(REPO, "docs", "offload.md")).read()
    block = text.split("```python\n", 1)[1].split("```", 1)[0]
    namespace: dict = {}
    exec(compile(block, "docs/offload.md", "exec"), namespace)
    assert namespace["stats"]["requests"] > 0


@pytest.mark.cuda
@pytest.mark.parametrize("storage", ["host", "disk"])
def test_cuda_offloaded_stack_is_bitwise_equal_to_the_resident_one(tmp_path, seed, storage):
    # Never run where this was written (no GPU): the side-stream path's first real check.
    E = 8
    ref = _Stack(
        [
            MoELayer.build(d_model=16, d_hidden=32, num_experts=E, k=2, device="cuda")
            for _ in range(3)
        ]
    ).eval()
    off = copy.deepcopy(ref)
    offload_experts(off, cache_slots=2, storage="host" if storage == "host" else tmp_path)
    try:
        assert off.layers[0].experts.storage.pinned == (storage == "host")
        with torch.no_grad():
            for T in (1, 7, 33):
                x = torch.randn(T, 16, device="cuda")
                assert torch.equal(off(x), ref(x))
        torch.cuda.synchronize()
        assert offload_metrics(off)["misses"] > 0
    finally:
        close_offloaded(off)
