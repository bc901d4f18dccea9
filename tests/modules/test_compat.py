"""moe_framework.compat: the original design guide's class names and config keys."""

import os
import re

import pytest
import torch

from moe_framework import compat
from moe_framework.compat import (
    GUIDE_CONFIG_KEYS,
    BaseExpert,
    ExpertConstellation,
    FullyOptimizedMoESystem,
    LibrarianCurator,
    SupervisorGating,
)
from moe_framework.config import MoEConfig
from moe_framework.constellation import MoELayer
from moe_framework.experts import ExpertBank
from moe_framework.knowledge_graph import KnowledgeGraph
from moe_framework.librarian import Librarian
from moe_framework.supervisor import Supervisor
from moe_framework.system import MixtureOfExpertsSystem

DOC = os.path.join(os.path.dirname(__file__), "..", "..", "docs", "compat.md")


# ---------------------------------------------------------------------------------------------
# config keys


@pytest.mark.parametrize(
    "guide, field, value",
    [
        ({"hidden_dim": 48}, "d_hidden", 48),
        ({"top_k_experts": 3}, "k", 3),
        ({"expert_specializations": [f"s{i}" for i in range(8)]}, "specialisation_names",
         tuple(f"s{i}" for i in range(8))),
        ({"gating_type": "topk"}, "strategy", "topk"),
        ({"gating_type": "noisy_topk"}, "strategy", "noisy_topk"),
        ({"gating_type": "grouped_sigmoid"}, "strategy", "grouped_sigmoid"),
        ({"load_balance_weight": 0.05}, "load_balance_coef", 0.05),
        ({"use_amp": True}, "amp_dtype", "bf16"),
        ({"use_amp": False}, "amp_dtype", "none"),
        ({"use_compile": True}, "compile_mode", "default"),
        ({"use_compile": False}, "compile_mode", "none"),
        ({"use_cuda_graph": True}, "cuda_graphs", True),
        ({"use_cuda_graph": False}, "cuda_graphs", False),
        ({"use_gradient_checkpointing": True}, "gradient_checkpointing", True),
    ],
)  # fmt: skip
def test_guide_config_key_sets_the_matching_field(guide, field, value):
    cfg = MoEConfig.from_dict({"num_experts": 8, **guide})
    assert getattr(cfg, field) == value
    assert not set(cfg.to_dict()) & set(GUIDE_CONFIG_KEYS)  # saved in our names
    assert MoEConfig.from_json(cfg.to_json()) == cfg


def test_guide_dense_gating_routes_every_token_to_every_expert():
    cfg = MoEConfig.from_dict({"num_experts": 6, "gating_type": "dense"})
    assert (cfg.strategy, cfg.k) == ("topk", 6)
    assert (
        MoEConfig.from_dict({"num_experts": 6, "top_k_experts": 6, "gating_type": "dense"}).k == 6
    )
    with pytest.raises(ValueError, match="gating_type='dense'.*all num_experts=6.*k .* is 3"):
        MoEConfig.from_dict({"num_experts": 6, "top_k_experts": 3, "gating_type": "dense"})


@pytest.mark.parametrize(
    "key, why",
    [
        ("max_kg_nodes", "no node limit"),
        ("kg_checkpoint_dir", "kg_path \\+ '.checkpoints'"),
        ("kg_save_interval", "kg_checkpoint_interval"),
    ],
)
def test_guide_config_key_without_equivalent_is_refused_saying_why(key, why):
    with pytest.raises(
        ValueError, match=f"{key} \\(a key of the design guide\\) has no equivalent"
    ):
        MoEConfig.from_dict({key: 100})
    with pytest.raises(ValueError, match=why):
        MoEConfig.from_dict({key: 100})


@pytest.mark.parametrize(
    "d, match",
    [
        ({"hidden_dim": 32, "d_hidden": 32}, "both 'hidden_dim' .*'d_hidden'"),
        ({"top_k_experts": 2, "k": 2}, "both 'top_k_experts' .*'k'"),
        ({"use_amp": True, "amp_dtype": "bf16"}, "both 'use_amp'"),
        ({"use_amp": "yes"}, "use_amp .* must be a bool, got 'yes'"),
        ({"use_compile": 1}, "use_compile .* must be a bool, got 1"),
        ({"gating_type": "learned"}, "gating_type .* must be one of .*'dense'.*got 'learned'"),
        ({"hidden_dim": 0}, "d_hidden must be >= 1"),
    ],
)
def test_guide_config_bad_or_conflicting_keys_are_clear_errors(d, match):
    with pytest.raises(ValueError, match=match):
        MoEConfig.from_dict(d)


def test_guide_config_written_as_in_the_guide_builds_and_trains_a_system():
    guide = {
        "input_dim": 12,
        "hidden_dim": 24,
        "output_dim": 3,
        "num_experts": 4,
        "top_k_experts": 2,
        "expert_specializations": ["north", "east", "south", "west"],
        "gating_type": "topk",
        "load_balance_weight": 0.01,
        "dedup_threshold": 0.85,
        "use_compile": False,
        "use_cuda_graph": False,
        "use_amp": True,
        "use_gradient_checkpointing": True,
        "max_batch_size": 32,
    }
    model = FullyOptimizedMoESystem(guide)
    assert isinstance(model, MixtureOfExpertsSystem)
    assert model.config.expert_names == ("north", "east", "south", "west")
    x, y = torch.randn(16, 12), torch.randint(0, 3, (16,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    r = model.training_step((x, y), opt)
    assert r.task_loss > 0 and sum(r.stats["load"][0]) == 16 * 2
    assert model.predict(x).shape == (16, 3)


# ---------------------------------------------------------------------------------------------
# classes


def test_supervisor_gating_is_a_supervisor_with_the_guide_arguments():
    gate = SupervisorGating(input_dim=16, num_experts=4, top_k=3)
    assert isinstance(gate, Supervisor) and gate.k == 3 and gate.num_experts == 4
    decision = gate(torch.randn(10, 16))
    assert decision.ids.shape == (10, 3) and decision.weights.shape == (10, 3)
    assert SupervisorGating(16, 8).k == 3  # the guide's default
    noisy = SupervisorGating(16, 4, 2, strategy="noisy_topk")
    assert noisy.strategy == "noisy_topk"
    with pytest.raises(ValueError, match="k must be in"):
        SupervisorGating(16, 2, top_k=3)


def test_base_expert_is_a_one_expert_bank_applied_to_every_row():
    torch.manual_seed(0)
    expert = BaseExpert(expert_id=3, input_dim=8, hidden_dim=16, output_dim=8, specialization="a")
    assert isinstance(expert, ExpertBank) and expert.num_experts == 1
    assert (expert.expert_id, expert.specialization) == (3, "a")
    bank = ExpertBank(num_experts=1, d_model=8, d_hidden=16)
    assert expert.state_dict().keys() == bank.state_dict().keys()
    x = torch.randn(2, 5, 8, requires_grad=True)
    y = expert(x)
    assert y.shape == (2, 5, 8)
    rows = x.detach().reshape(10, 8)
    ref = expert(rows, torch.tensor([0, 10]))  # the Experts protocol form
    torch.testing.assert_close(y.detach().reshape(10, 8), ref.detach(), rtol=0, atol=0)
    y.sum().backward()
    assert x.grad is not None and expert.w_out.grad is not None


def test_base_expert_rejects_what_it_cannot_be():
    with pytest.raises(ValueError, match="output_dim must be None or input_dim=8.*got 4"):
        BaseExpert(0, 8, 16, output_dim=4)
    with pytest.raises(ValueError, match=r"x must be \[..., 8\], got \(3, 4\)"):
        BaseExpert(0, 8, 16)(torch.randn(3, 4))
    with pytest.raises(ValueError, match="specialization must be None or a str"):
        BaseExpert(0, 8, 16, specialization=5)


def test_expert_constellation_from_sizes_is_a_working_moe_layer():
    layer = ExpertConstellation(d_model=8, d_hidden=16, num_experts=4, k=2)
    assert isinstance(layer, MoELayer)
    y, info = layer(torch.randn(6, 8))
    assert y.shape == (6, 8) and info.ids.shape == (6, 2)
    assert info.reports.mean_output.shape == (4, 8)  # the guide's draft reports, as tensors
    with pytest.raises(ValueError, match="d_hidden is required"):
        ExpertConstellation(d_model=8, num_experts=4)


def test_expert_constellation_of_guide_experts_routes_with_their_weights():
    torch.manual_seed(0)
    experts = [BaseExpert(i, 8, 16, specialization=f"s{i}") for i in range(4)]
    gate = SupervisorGating(8, 4, top_k=2)
    layer = ExpertConstellation(experts, gate)
    assert isinstance(layer, MoELayer) and layer.supervisor is gate
    x = torch.randn(12, 8)
    with torch.no_grad():
        y, info = layer(x)
        expected = torch.zeros_like(x)
        for t in range(12):
            for j in range(2):
                e = int(info.ids[t, j])
                expected[t] += info.weights[t, j] * experts[e](x[t : t + 1])[0]
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)


def test_expert_constellation_refuses_experts_that_do_not_fit_together():
    gate = SupervisorGating(8, 2, top_k=1)
    with pytest.raises(ValueError, match=r"experts\[1\] is .*'d_hidden': 32"):
        ExpertConstellation([BaseExpert(0, 8, 16), BaseExpert(1, 8, 32)], gate)
    with pytest.raises(ValueError, match="supervisor routes to 2 experts, got 3 experts"):
        ExpertConstellation([BaseExpert(i, 8, 16) for i in range(3)], gate)
    with pytest.raises(ValueError, match="non-empty list of BaseExpert"):
        ExpertConstellation([torch.nn.Linear(8, 8)], gate)
    with pytest.raises(ValueError, match="supervisor must be a router"):
        ExpertConstellation([BaseExpert(0, 8, 16)], None)
    with pytest.raises(ValueError, match="not both"):
        ExpertConstellation([BaseExpert(0, 8, 16)], gate, d_model=8)


def test_librarian_curator_is_a_librarian_filing_into_a_knowledge_graph(tmp_path):
    with KnowledgeGraph.open(tmp_path / "kg.sqlite", dim=8) as kg:
        librarian = LibrarianCurator(kg)
        assert isinstance(librarian, Librarian) and librarian.dedup_threshold == 0.85
        assert LibrarianCurator(kg, similarity_threshold=0.9).dedup_threshold == 0.9
    with pytest.raises(ValueError, match=r"KnowledgeGraph\.open\(path, dim=embedding_dim\)"):
        LibrarianCurator(512)


def test_fully_optimized_moe_system_is_a_mixture_of_experts_system():
    cfg = MoEConfig(input_dim=6, d_model=8, d_hidden=8, num_experts=4, output_dim=2)
    model = FullyOptimizedMoESystem(cfg)
    assert type(model) is MixtureOfExpertsSystem and model.config == cfg
    assert model(torch.randn(3, 6)).output.shape == (3, 2)
    with pytest.raises(ValueError, match="config must be a MoEConfig or a dict, got str"):
        FullyOptimizedMoESystem("config.json")


def test_compat_table_in_the_docs_lists_every_name_and_key():
    with open(DOC) as f:
        doc = f.read()
    names = [n for n in compat.__all__ if n[0].isupper() and n != "GUIDE_CONFIG_KEYS"]
    for name in names + list(GUIDE_CONFIG_KEYS):
        assert re.search(rf"^\| `{name}`", doc, re.M), f"{name} missing from docs/compat.md"
