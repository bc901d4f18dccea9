import dataclasses
import json
import os
import subprocess
import sys
import warnings

import pytest

from moe_framework.config import (
    ACTIVATIONS,
    AMP_DTYPES,
    COMPILE_MODES,
    INDEX_TYPES,
    RENAMED_FIELDS,
    ROUTING_STRATEGIES,
    MoEConfig,
)


def test_config_defaults_are_valid_and_json_round_trips():
    cfg = MoEConfig(input_dim=64, specialisation_names=[f"e{i}" for i in range(8)])
    back = MoEConfig.from_json(cfg.to_json())
    assert back == cfg
    assert back.specialisation_names == tuple(f"e{i}" for i in range(8))
    assert json.loads(cfg.to_json())["format"] == "moe_framework.MoEConfig/1"


def test_config_json_file_round_trip_keeps_every_field(tmp_path):
    cfg = MoEConfig(
        d_model=32,
        d_hidden=48,
        num_layers=3,
        vocab_size=100,
        output_dim=100,
        num_experts=16,
        k=4,
        activation="gelu",
        num_shared_experts=1,
        strategy="grouped_sigmoid",
        n_group=4,
        topk_group=2,
        routed_scaling_factor=2.5,
        bias_update_rate=1e-3,
        capacity_factor=1.25,
        kg_path=str(tmp_path / "kg.sqlite"),
        consolidation_interval=10,
        kg_checkpoint_interval=100,
        compile_mode="max-autotune",
        amp_dtype="bf16",
        gradient_checkpointing=True,
        grad_clip_norm=None,
        track_stats=True,
    )
    path = tmp_path / "config.json"
    cfg.to_json(path)
    back = MoEConfig.from_json(path)
    assert back == cfg
    for f in dataclasses.fields(MoEConfig):
        assert getattr(back, f.name) == getattr(cfg, f.name), f.name


def test_config_from_json_rejects_unknown_keys():
    d = json.loads(MoEConfig().to_json())
    d["num_expertz"] = 4
    with pytest.raises(ValueError, match="unknown field.*num_expertz"):
        MoEConfig.from_json(json.dumps(d))


def test_config_from_json_rejects_foreign_format_and_bad_json():
    d = json.loads(MoEConfig().to_json())
    d["format"] = "something/else"
    with pytest.raises(ValueError, match="format"):
        MoEConfig.from_dict(d)
    with pytest.raises(ValueError, match="not valid JSON"):
        MoEConfig.from_json("{not json")


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(k=9, num_experts=8), "k must be"),
        (dict(k=0), "k must be"),
        (dict(strategy="switch", k=2), "k must be"),
        (dict(num_experts=8, n_group=3), "n_group"),
        (dict(num_experts=8, n_group=2, topk_group=3), "topk_group"),
        (dict(num_experts=8, n_group=4, topk_group=1, k=3), "k must be"),
        (dict(strategy="expert_choice", bias_update_rate=0.01), "bias_update_rate"),
        (dict(strategy="expert_choice", n_group=2), "n_group"),
        (dict(strategy="expert_choice", causal=True), "expert_choice"),
        (dict(strategy="topk", noise_eps=0.1), "noise_eps"),
        (dict(specialisation_names=["a", "b"]), "specialisation_names"),
        (dict(num_experts=2, k=1, specialisation_names=["a", "a"]), "specialisation_names"),
        (dict(consolidation_interval=5), "kg_path"),
        (dict(kg_checkpoint_interval=5), "kg_path"),
        (dict(cuda_graphs=True, compile_mode="reduce-overhead"), "cuda_graphs"),
        (dict(input_dim=4, vocab_size=10), "input_dim"),
        (dict(activation="relu"), "activation"),
        (dict(strategy="hash"), "strategy"),
        (dict(compile_mode="fast"), "compile_mode"),
        (dict(amp_dtype="fp8"), "amp_dtype"),
        (dict(kg_index_type="annoy"), "kg_index_type"),
        (dict(temperature=0.0), "temperature"),
        (dict(capacity_factor=0.0), "capacity_factor"),
        (dict(capacity_factor=float("nan")), "capacity_factor"),
        (dict(jitter_eps=1.0), "jitter_eps"),
        (dict(load_balance_coef=-1.0), "load_balance_coef"),
        (dict(z_loss_coef=float("inf")), "z_loss_coef"),
        (dict(dedup_threshold=0.0), "dedup_threshold"),
        (dict(dedup_threshold=1.5), "dedup_threshold"),
        (dict(kg_merge_threshold=-0.1), "kg_merge_threshold"),
        (dict(kg_keep_checkpoints=0), "kg_keep_checkpoints"),
        (dict(grad_clip_norm=0.0), "grad_clip_norm"),
        (dict(dropout=1.0), "dropout"),
        (dict(d_model=0), "d_model"),
        (dict(d_hidden=2.5), "d_hidden"),
        (dict(num_layers=True), "num_layers"),
        (dict(max_batch_size=0), "max_batch_size"),
        (dict(max_seq_len=0), "max_seq_len"),
        (dict(max_seq_len=True), "max_seq_len"),
        (dict(track_stats="yes"), "track_stats"),
        (dict(specialisation_names="abcdefgh"), "specialisation_names"),
        (dict(num_experts=(1 << 16) + 1, k=1), "num_experts"),
        (dict(d_model=(1 << 16) + 1), "d_model"),
        (dict(d_hidden=(1 << 18) + 1), "d_hidden"),
        (dict(num_layers=1025), "num_layers"),
        (dict(vocab_size=(1 << 24) + 1), "vocab_size"),
        (dict(num_shared_experts=-1), "num_shared_experts"),
        (dict(cuda_graphs="yes"), "cuda_graphs"),
        (dict(kg_path=3), "kg_path"),
    ],
)
def test_config_rejects_invalid_value_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        MoEConfig(**kwargs)


def test_config_unknown_constructor_argument_is_an_error():
    with pytest.raises(TypeError):
        MoEConfig(num_expertz=4)


def test_config_replace_validates_the_copy():
    cfg = MoEConfig(num_experts=8, k=2)
    assert cfg.replace(k=4).k == 4
    assert cfg.k == 2
    with pytest.raises(ValueError, match="k must be"):
        cfg.replace(k=16)


def test_config_expert_names_default_and_given():
    assert MoEConfig(num_experts=3, k=1).expert_names == ("expert_0", "expert_1", "expert_2")
    names = ("a", "b", "c")
    assert MoEConfig(num_experts=3, k=1, specialisation_names=names).expert_names == names


def test_config_choices_match_the_modules_they_configure():
    from moe_framework.supervisor import STRATEGIES

    assert set(ROUTING_STRATEGIES) == set(STRATEGIES)
    from moe_framework.kg.index import INDEX_TYPES as KG_INDEX_TYPES

    assert set(INDEX_TYPES) == set(KG_INDEX_TYPES)
    assert "none" in COMPILE_MODES and "none" in AMP_DTYPES
    assert "swiglu" in ACTIVATIONS


def test_config_choices_are_the_ones_options_defines_and_every_module_accepts_them():
    import torch

    from moe_framework import options, training
    from moe_framework.experts import ExpertBank
    from moe_framework.kg.index import INDEX_TYPES as KG_INDEX_TYPES
    from moe_framework.kg.index import VectorIndex
    from moe_framework.supervisor import Supervisor

    # one definition: the config's tuples are options.py's, not copies
    assert ACTIVATIONS is options.ACTIVATIONS and ROUTING_STRATEGIES is options.STRATEGIES
    assert INDEX_TYPES is options.INDEX_TYPES and KG_INDEX_TYPES is options.INDEX_TYPES
    assert COMPILE_MODES is options.COMPILE_MODES and AMP_DTYPES is options.AMP_DTYPES
    for strategy in ROUTING_STRATEGIES:
        k = 1 if strategy == "switch" else 2
        MoEConfig(strategy=strategy, k=k)
        Supervisor(8, 4, k, strategy=strategy)
    for activation in ACTIVATIONS:
        MoEConfig(activation=activation)
        ExpertBank(num_experts=2, d_model=4, d_hidden=4, activation=activation)
    for index_type in INDEX_TYPES:
        MoEConfig(kg_index_type=index_type)
        VectorIndex.check_params(index_type, None)
    for amp in AMP_DTYPES:
        MoEConfig(amp_dtype=amp)
        with training.autocast(amp, torch.device("cpu")):
            pass


# ---------------------------------------------------------------------------------------------
# one vocabulary: the modules' argument names, old names still accepted

# a valid value for each renamed field (the defaults would not show that the value moved)
_OLD_VALUES = {
    "top_k": 1,
    "routing_strategy": "noisy_topk",
    "router_temperature": 0.5,
    "router_jitter": 0.01,
    "router_noise_eps": 0.05,
    "num_groups": 2,
    "topk_groups": 2,
    "aux_loss_weight": 0.5,
    "z_loss_weight": 0.25,
    "kg_snapshots_kept": 7,
}
# what each value needs around it to be valid
_CONTEXT = {"router_noise_eps": {"strategy": "noisy_topk"}, "topk_groups": {"n_group": 2}}


def test_config_fields_are_named_like_the_module_arguments_they_set():
    import inspect

    from moe_framework.moe_layer import MoELayer
    from moe_framework.supervisor import Supervisor

    fields = {f.name for f in dataclasses.fields(MoEConfig)}
    routing = {
        "k", "strategy", "temperature", "capacity_factor", "load_balance_coef", "z_loss_coef",
        "bias_update_rate", "n_group", "topk_group", "routed_scaling_factor", "noise_eps",
        "jitter_eps", "causal", "track_stats",
    }  # fmt: skip
    assert routing <= set(inspect.signature(Supervisor).parameters) and routing <= fields
    layer = {"d_model", "d_hidden", "num_experts", "k", "activation", "num_shared_experts"}
    assert layer <= set(inspect.signature(MoELayer.build).parameters) and layer <= fields
    assert not fields & set(RENAMED_FIELDS)
    # help(MoEConfig) shows the current names only
    assert not set(inspect.signature(MoEConfig).parameters) & set(RENAMED_FIELDS)


@pytest.mark.parametrize("old", sorted(_OLD_VALUES))
def test_config_old_field_name_as_keyword_warns_naming_the_new_field(old):
    new = RENAMED_FIELDS[old]
    value = _OLD_VALUES[old]
    ctx = dict(num_experts=8, **_CONTEXT.get(old, {}))
    with pytest.warns(FutureWarning, match=f"{old} -> {new}"):
        cfg = MoEConfig(**ctx, **{old: value})
    assert getattr(cfg, new) == value
    assert cfg == MoEConfig(**ctx, **{new: value})
    assert old not in cfg.to_dict() and cfg.to_dict()[new] == value


@pytest.mark.parametrize("old", sorted(_OLD_VALUES))
def test_config_old_field_name_in_a_dict_or_json_warns_naming_the_new_field(old):
    new = RENAMED_FIELDS[old]
    d = {"num_experts": 8, **_CONTEXT.get(old, {}), old: _OLD_VALUES[old]}
    with pytest.warns(DeprecationWarning, match=f"{old} -> {new}.*saving the config again"):
        cfg = MoEConfig.from_dict(d)
    assert getattr(cfg, new) == _OLD_VALUES[old]
    with pytest.warns(DeprecationWarning, match=f"{old} -> {new}"):
        assert MoEConfig.from_json(json.dumps(d)) == cfg


def test_config_giving_both_the_old_and_the_new_name_is_an_error():
    with pytest.raises(ValueError, match="both 'top_k' .*and 'k'"):
        MoEConfig(top_k=2, k=2)
    with pytest.raises(ValueError, match="both 'aux_loss_weight' .*and 'load_balance_coef'"):
        MoEConfig.from_dict({"aux_loss_weight": 0.1, "load_balance_coef": 0.1})
    with pytest.raises(ValueError, match="both 'num_groups'"):
        MoEConfig().replace(num_groups=2, n_group=2)


def test_config_saved_by_the_previous_version_loads_with_its_values_under_the_new_names(tmp_path):
    path = os.path.join(
        os.path.dirname(__file__), "..", "data", "golden", "system_v1", "config.json"
    )
    with pytest.warns(DeprecationWarning, match="top_k -> k") as record:
        cfg = MoEConfig.from_json(path)
    renamed = [w for w in record if "renamed field" in str(w.message)]
    assert len(renamed) == 1  # one line for all the old names
    for old, new in RENAMED_FIELDS.items():
        assert f"{old} -> {new}" in str(renamed[0].message), old
    with open(path) as f:
        old = json.load(f)
    assert cfg.k == old["top_k"] == 2 and cfg.strategy == old["routing_strategy"]
    assert cfg.load_balance_coef == old["aux_loss_weight"]
    assert cfg.z_loss_coef == old["z_loss_weight"]
    assert cfg.kg_keep_checkpoints == old["kg_snapshots_kept"]
    # written back in the new names only, and read back without any warning
    cfg.to_json(tmp_path / "config.json")
    saved = json.loads((tmp_path / "config.json").read_text())
    assert not set(saved) & set(RENAMED_FIELDS)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert MoEConfig.from_json(tmp_path / "config.json") == cfg


def test_config_old_names_read_and_set_as_deprecated_attributes():
    cfg = MoEConfig(num_experts=8, k=4)
    with pytest.warns(DeprecationWarning, match="MoEConfig.top_k is deprecated: read MoEConfig.k"):
        assert cfg.top_k == 4
    with pytest.warns(DeprecationWarning, match="set MoEConfig.strategy"):
        cfg.routing_strategy = "switch"
    assert cfg.strategy == "switch"


def test_config_replace_accepts_an_old_name_with_a_warning():
    with pytest.warns(FutureWarning, match="top_k -> k"):
        assert MoEConfig(num_experts=8).replace(top_k=3).k == 3


def test_config_track_stats_turns_tracking_on_in_every_layer():
    from moe_framework.system import MixtureOfExpertsSystem

    cfg = MoEConfig(input_dim=8, d_model=8, d_hidden=8, num_experts=4, k=2, track_stats=True)
    assert MoEConfig.from_json(cfg.to_json()).track_stats is True
    model = MixtureOfExpertsSystem(cfg)
    import torch

    model(torch.randn(5, 8))
    for block in model.blocks:
        assert block.moe.supervisor.track_stats is True
        assert block.moe.routing_stats()["tokens"] == 5


def test_config_from_an_older_version_with_max_seq_len_loads_with_a_deprecation_warning():
    old = json.loads(MoEConfig().to_json())
    old["max_seq_len"] = 1  # every config written before the field was removed has it
    with pytest.warns(DeprecationWarning, match="max_seq_len=1 is deprecated and ignored"):
        cfg = MoEConfig.from_json(json.dumps(old))
    assert cfg == MoEConfig()
    assert "max_seq_len" not in cfg.to_dict()
    old["max_seq_len"] = 16  # someone set it expecting a limit: they are told it is not one
    with pytest.warns(FutureWarning, match="sequences of any length run"):
        MoEConfig.from_dict(old)
    with pytest.warns(FutureWarning, match="max_seq_len"):
        MoEConfig(max_seq_len=16)


def test_config_without_max_seq_len_warns_nothing():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        MoEConfig.from_json(MoEConfig().to_json())


def test_config_deeply_nested_json_is_a_value_error_naming_the_field():
    text = '{"d_model": ' + "[" * 100_000 + "]" * 100_000 + "}"
    with pytest.raises(ValueError, match="field 'd_model' is nested deeper"):
        MoEConfig.from_json(text)
    with pytest.raises(ValueError, match="the document is nested deeper"):
        MoEConfig.from_json("[" * 100_000 + "]" * 100_000)


def test_config_deeply_nested_value_is_a_value_error_naming_the_field():
    deep: list = []
    for _ in range(100_000):
        deep = [deep]
    with pytest.raises(ValueError, match="d_model must be an int"):
        MoEConfig.from_dict({"d_model": deep})
    with pytest.raises(ValueError, match="specialisation_names"):
        MoEConfig(specialisation_names=deep)


def test_config_from_json_refuses_a_fifo_instead_of_hanging(tmp_path):
    fifo = tmp_path / "config.json"
    os.mkfifo(fifo)
    code = (
        "import sys\n"
        "from moe_framework.config import MoEConfig\n"
        "try:\n"
        "    MoEConfig.from_json(sys.argv[1])\n"
        "except ValueError as e:\n"
        "    print(e)\n"
    )
    # A subprocess with a timeout, so a regression cannot hang the suite.
    out = subprocess.run(
        [sys.executable, "-c", code, str(fifo)], capture_output=True, text=True, timeout=60
    )
    assert "is a FIFO, expected a regular file" in out.stdout, out.stderr


def test_config_from_json_refuses_a_directory_and_an_oversized_file(tmp_path):
    with pytest.raises(ValueError, match="is a directory"):
        MoEConfig.from_json(tmp_path)
    big = tmp_path / "big.json"
    big.write_bytes(b" " * (16 << 20) + b"{}")
    with pytest.raises(ValueError, match="larger than"):
        MoEConfig.from_json(big)


def test_config_to_json_writes_atomically_with_the_umask(tmp_path):
    path = tmp_path / "config.json"
    old = os.umask(0o022)
    try:
        MoEConfig().to_json(path)
    finally:
        os.umask(old)
    assert os.stat(path).st_mode & 0o777 == 0o644
    assert os.listdir(tmp_path) == ["config.json"]  # no temporary file left behind
    assert MoEConfig.from_json(path) == MoEConfig()


def test_demo_config_tracks_routing_statistics_in_every_layer(tmp_path):
    import torch

    from moe_framework.demo import demo_config
    from moe_framework.system import MixtureOfExpertsSystem

    cfg = demo_config(str(tmp_path), tiny=True, steps_per_epoch=5, seed=0)
    model = MixtureOfExpertsSystem(cfg.replace(kg_path=None, consolidation_interval=0))
    model(torch.randn(3, cfg.input_dim))
    assert all(block.moe.routing_stats()["tokens"] == 3 for block in model.blocks)
