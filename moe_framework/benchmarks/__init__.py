"""The benchmark suite, shipped with the package: ``python -m moe_framework bench`` runs every
``bench_*`` module here (``--quick`` by default), ``python -m moe_framework.benchmarks.<name>`` one.

Nothing here is imported by ``import moe_framework``: the benchmarks pull in their own baselines
(transformers, faiss index sweeps) and measure the machine, which an import must never do.
"""
