"""The names of every choice-valued setting, defined once.

:class:`~moe_framework.config.MoEConfig` validates against these tuples and the modules it
configures (``Supervisor``, ``ExpertBank``, ``KnowledgeGraph``, ``MixtureOfExpertsSystem``) accept
exactly them, so a value the config lets through is never refused later by a module (a test pins
that). Add a choice here, then teach the module that implements it.
"""

from __future__ import annotations

__all__ = [
    "ACTIVATIONS",
    "AMP_DTYPES",
    "ATTENTION_SCORES",
    "COMPILE_MODES",
    "INDEX_TYPES",
    "LAYOUTS",
    "LOAD_BALANCE_SCOPES",
    "STRATEGIES",
]

# Expert feed-forward activation (ExpertBank, DenseFFN, MoELayer ``activation=``).
ACTIVATIONS = ("swiglu", "gelu")
# Expert weight layout (ExpertBank ``layout=``): [E, in, out] or [E, out, in] (Hugging Face).
LAYOUTS = ("in_out", "out_in")
# Routing strategies (Supervisor ``strategy=``); docs/routing.md describes each.
STRATEGIES = (
    "topk",
    "topk_then_softmax",
    "switch",
    "noisy_topk",
    "grouped_sigmoid",
    "expert_choice",
    "attention",
)
# Over what the load-balancing loss averages (Supervisor ``load_balance_scope=``).
LOAD_BALANCE_SCOPES = ("batch", "sequence")
# Score of the attention router (Supervisor ``attention_score=``).
ATTENTION_SCORES = ("cosine", "dot")
# Knowledge-graph search index (KnowledgeGraph ``index_type=``).
INDEX_TYPES = ("flat", "hnsw", "ivfpq", "ivf", "auto")
# torch.compile mode of MixtureOfExpertsSystem.compiled / predict; "none" runs eagerly.
COMPILE_MODES = ("none", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# Autocast dtype of training_step; "none" trains in float32.
AMP_DTYPES = ("none", "bf16", "fp16")
