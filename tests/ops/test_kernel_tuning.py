"""The CPU kernels' run-time knobs (ops tuning_names / tuning_get / tuning_set) and the kernel
auto-tuner's cache (moe_framework.kernel_tuning): every knob value computes what the plain-PyTorch
reference does; bad names and values are refused with clear errors; a cache is applied only when
it was written for this machine and library version, otherwise ignored with a warning."""

from __future__ import annotations

import json
import random

import pytest
import torch
from conftest import TOLERANCES

from moe_framework import cli, kernel_tuning, ops
from moe_framework.ops import reference
from moe_framework.ops import tuning as knobs


@pytest.fixture(autouse=True)
def _defaults():
    knobs.reset_tuning()
    yield
    knobs.reset_tuning()


def test_knobs_start_at_their_defaults_and_set_returns_the_previous_value():
    names = knobs.tuning_names()
    assert "gg_blas_rows_fp32" in names and "sim_query_block" in names
    assert knobs.tuning_values() == knobs.tuning_values(initial=True)
    assert knobs.get_tuning("gg_row_tile") == 64
    assert knobs.set_tuning("gg_row_tile", 32) == 64
    assert knobs.get_tuning("gg_row_tile") == 32
    assert knobs.get_tuning("gg_row_tile", initial=True) == 64
    assert knobs.set_tuning("gg_row_tile", None) == 32
    assert knobs.get_tuning("gg_row_tile") == 64


def test_bad_knob_names_and_values_are_refused_with_the_expected_range():
    with pytest.raises(RuntimeError, match="unknown knob name 'nope'.*gg_row_tile"):
        knobs.get_tuning("nope")
    with pytest.raises(RuntimeError, match=r"gg_row_tile must be in \[8, 512\], got 4"):
        knobs.set_tuning("gg_row_tile", 4)
    with pytest.raises(TypeError, match="int or None"):
        knobs.set_tuning("gg_row_tile", 3.5)
    assert knobs.get_tuning("gg_row_tile") == 64


GG_SETTINGS = [
    {"gg_blas_rows_fp32": 1},
    {"gg_blas_rows_fp32": 1 << 40, "gg_stream_rows": 0},
    {"gg_stream_rows": 64, "gg_row_tile": 8},
    {"gg_row_tile": 512, "gg_max_col_block": 48, "gg_tiles_per_thread": 1},
    {"gg_blas_rows_bf16": 1},
    {"gg_blas_rows_bf16": 1 << 40, "gg_tiles_per_thread": 64},
]


@pytest.mark.parametrize(
    "settings", GG_SETTINGS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items())
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_gemm_matches_the_reference_under_every_knob_setting(settings, dtype, seed):
    rng = random.Random(seed)
    E, K, N = rng.randint(1, 5), rng.randint(1, 70), rng.randint(1, 150)
    sizes = [rng.choice([0, 1, 3, 9, 40, 130]) for _ in range(E)]
    off = torch.tensor([0] + sizes).cumsum(0)
    a = torch.randn(int(off[-1]) + 2, K).to(dtype)
    trans_b = rng.random() < 0.5
    b = torch.randn(E, N, K).to(dtype) if trans_b else torch.randn(E, K, N).to(dtype)
    if rng.random() < 0.5:  # non-contiguous b
        b = b.transpose(1, 2).contiguous().transpose(1, 2)
    for name, value in settings.items():
        knobs.set_tuning(name, value)
    out = ops.grouped_gemm(a, b, off, trans_b)
    ref = reference.grouped_gemm_ref(a, b, off, trans_b)
    torch.testing.assert_close(out, ref, **TOLERANCES["gemm"][dtype])


SIM_SETTINGS = [
    {"sim_query_block": 16, "sim_bank_block_bytes": 4096},
    {"sim_tasks_per_thread": 1, "sim_min_task_work": 1},
    {"sim_query_block": 4096, "sim_tasks_per_thread": 64, "sim_min_task_work": 1 << 40},
]


@pytest.mark.parametrize("settings", SIM_SETTINGS, ids=lambda s: ",".join(s))
def test_kg_search_and_dedup_match_the_reference_under_every_knob_setting(settings, seed):
    rng = random.Random(seed)
    q, n, d, k = rng.choice([1, 3, 40]), rng.randint(1, 600), rng.randint(1, 40), rng.randint(1, 7)
    queries, bank = torch.randn(q, d), torch.randn(n, d)
    nv = rng.randint(0, n)
    # dedup: planted near-copies (cosine ~1) among random rows of d = 64 (cosines ~0 +- 0.13),
    # so no pair lies near the 0.9 threshold.
    base = torch.randn(rng.randint(1, 150), 64)
    emb = torch.cat([base, base[torch.randint(0, base.shape[0], (40,))] + 1e-3])
    for name, value in settings.items():
        knobs.set_tuning(name, value)
    scores, ids = ops.kg_search(queries, bank, k, torch.tensor(nv))
    want_scores, _ = reference.kg_search_ref(queries, bank, k, nv)
    torch.testing.assert_close(scores, want_scores, **TOLERANCES["gemm"][torch.float32])
    # each id is a valid row whose cosine is its score (ids may differ from the reference's
    # only between rows of equal score within rounding)
    found = ids >= 0
    assert torch.equal(found, want_scores > -float("inf"))
    rows = torch.nn.functional.normalize(bank[ids.clamp_min(0)], dim=-1)
    cos = (rows * torch.nn.functional.normalize(queries, dim=-1)[:, None]).sum(-1)
    torch.testing.assert_close(cos[found], scores[found], rtol=1e-4, atol=1e-5)
    assert bool((ids[found] < nv).all())
    keep, rep = ops.dedup(emb, 0.9)
    assert torch.equal(keep, reference.dedup_ref(emb, 0.9)[0])
    # a removed row's representative is an earlier near-copy (copies tie within rounding)
    unit = torch.nn.functional.normalize(emb, dim=-1)
    j = torch.arange(emb.shape[0])
    assert torch.equal(rep[keep], j[keep])
    assert bool((rep[~keep] < j[~keep]).all())
    assert bool(((unit[rep] * unit).sum(-1)[~keep] > 0.9).all())


# ---------------------------------------------------------------------- the cache


def _cache(tmp_path, **changes):
    data = {"format": kernel_tuning.CACHE_FORMAT, "key": kernel_tuning.cache_key()}
    data["knobs"] = {"gg_row_tile": 32, "sim_query_block": 128}
    data.update(changes)
    path = tmp_path / "tuning.json"
    path.write_text(json.dumps(data))
    return str(path)


def test_a_cache_for_this_machine_is_applied_and_other_knobs_keep_their_defaults(tmp_path):
    knobs.set_tuning("gg_stream_rows", 3)  # not in the cache: back to the default
    assert kernel_tuning.apply_cache(_cache(tmp_path)) == {
        "gg_row_tile": 32,
        "sim_query_block": 128,
    }
    assert knobs.get_tuning("gg_row_tile") == 32 and knobs.get_tuning("sim_query_block") == 128
    assert knobs.get_tuning("gg_stream_rows") == 8


def _key_with(**changes):
    return {**kernel_tuning.cache_key(), **changes}


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(key=_key_with(cpu="Another CPU 9000")), "foreign.*cpu="),
        (dict(key=_key_with(isa=["avx2", "fma", "avx512f", "amx_tile"])), "foreign.*isa="),
        (dict(key=_key_with(gpu="A GPU", gpu_count=7)), "foreign.*gpu_count=7"),
        (dict(key=_key_with(moe_framework="0.0.0-old")), "stale.*moe_framework="),
        (dict(key=_key_with(torch="1.0")), "stale.*torch="),
        (dict(key=_key_with(knobs=["gg_row_tile"])), "stale.*knobs="),
        (dict(format=99), "not a format-1"),
        (dict(knobs={"gg_row_tile": "32"}), "malformed"),
        (dict(knobs={"no_such_knob": 3}), "malformed"),
        (dict(knobs={"gg_row_tile": 3}), r"bad value.*\[8, 512\]"),
    ],
)
def test_a_stale_foreign_or_broken_cache_is_ignored_with_a_warning(tmp_path, changes, message):
    knobs.set_tuning("gg_row_tile", 16)  # whatever was set stays
    with pytest.warns(UserWarning, match=message):
        assert kernel_tuning.apply_cache(_cache(tmp_path, **changes)) is None
    assert knobs.get_tuning("gg_row_tile") == 16


def test_an_unreadable_cache_warns_and_a_missing_one_is_silent(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.warns(UserWarning, match="cannot read"):
        assert kernel_tuning.apply_cache(str(bad)) is None
    assert kernel_tuning.apply_cache(str(tmp_path / "missing.json")) is None


def test_import_time_loading_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(kernel_tuning.ENV_CACHE, _cache(tmp_path))
    kernel_tuning.load_at_import()
    assert knobs.get_tuning("gg_row_tile") == 32
    knobs.reset_tuning()
    monkeypatch.setenv(kernel_tuning.ENV_CACHE, "off")
    kernel_tuning.load_at_import()
    assert knobs.get_tuning("gg_row_tile") == 64


def test_tune_kernels_command_writes_a_cache_that_loads(tmp_path, monkeypatch, capsys):
    tiny = kernel_tuning.Bucket
    monkeypatch.setattr(
        kernel_tuning,
        "gg_buckets",
        lambda quick: (
            [tiny("gg", "float32", r, 16, 32, 2) for r in (2, 8)]
            + [tiny("gg", "bfloat16", 4, 16, 32, 2)]
        ),
    )
    monkeypatch.setattr(
        kernel_tuning, "sim_buckets", lambda quick: [tiny("sim", "float32", 1, 8, 64)]
    )
    monkeypatch.setattr(
        kernel_tuning,
        "TILE_CANDIDATES",
        {"gg_row_tile": (32, 64), "sim_query_block": (128, 256)},
    )
    out = tmp_path / "cache.json"
    assert cli.main(["tune-kernels", "--quick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "geometric-mean speedup" in printed and "kg_search" in printed
    cache = json.loads(out.read_text())
    assert cache["key"] == kernel_tuning.cache_key()
    assert {r["bucket"] for r in cache["gain"]["buckets"]} >= {"gg float32 E2 rows2 K16 N32"}
    assert all(r["speedup"] > 0 for r in cache["gain"]["buckets"])
    assert set(cache["knobs"]) <= set(knobs.tuning_names())
    assert knobs.tuning_values() == knobs.tuning_values(initial=True)  # the tuner restores them
    assert kernel_tuning.apply_cache(str(out)) == cache["knobs"]
