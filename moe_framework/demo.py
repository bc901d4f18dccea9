"""The main job: ``python -m moe_framework demo`` (docs/demo.md).

Trains a small :class:`~moe_framework.system.MixtureOfExpertsSystem` on scikit-learn's digits
(1797 8x8 images of handwritten digits, shipped inside scikit-learn: no download) next to a dense
model with the same active parameters per token, then shows what the experts learned: test accuracy
of both, routing telemetry, which expert specialises in which digits, the experts' draft reports
consolidated into a knowledge graph, and a query answered from that graph. Everything lands in the
output folder: plots, the graph store, the model (safetensors + config JSON) and ``summary.json``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .config import MoEConfig
from .experts import ExpertBank
from .metrics import load_summary, specialisation
from .system import MixtureOfExpertsSystem

__all__ = ["run_demo", "check_demo_args", "DenseBaseline", "demo_config", "count_active_parameters"]

NUM_CLASSES = 10
# The seed also seeds scikit-learn's split (numpy's RandomState takes 0 .. 2**32 - 1).
MAX_SEED = 2**32 - 1
MAX_THREADS = 4096
# A demo, not a training run; also bounds the per-epoch history the demo keeps in memory.
MAX_EPOCHS = 10_000


# ====================================================================== models


class _SwiGLU(nn.Module):
    def __init__(self, d: int, h: int):
        super().__init__()
        self.w_in = nn.Linear(d, 2 * h, bias=False)
        self.w_out = nn.Linear(h, d, bias=False)

    def forward(self, x):
        g, u = self.w_in(x).chunk(2, dim=-1)
        return self.w_out(F.silu(g) * u)


class DenseBaseline(nn.Module):
    """The MoE system's architecture (same dropout) with each MoE layer replaced by one dense
    SwiGLU FFN of hidden width ``k * d_hidden``: the same parameters per token as the
    ``k`` experts a token activates (the router's ``d_model * num_experts`` weights are the
    only difference)."""

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        h = cfg.k * cfg.d_hidden + cfg.num_shared_experts * cfg.d_hidden
        assert cfg.input_dim is not None, "the dense baseline takes dense features (input_dim)"
        self.embed = nn.Linear(cfg.input_dim, cfg.d_model)
        self.norms = nn.ModuleList(nn.LayerNorm(cfg.d_model) for _ in range(cfg.num_layers))
        self.ffns = nn.ModuleList(_SwiGLU(cfg.d_model, h) for _ in range(cfg.num_layers))
        self.dropout = nn.Dropout(cfg.dropout)
        self.final_norm = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.output_dim)

    def forward(self, x):
        h = self.embed(x)
        for norm, ffn in zip(self.norms, self.ffns):
            h = h + self.dropout(ffn(norm(h)))
        return self.head(self.final_norm(h))


def count_active_parameters(model: nn.Module, cfg: Optional[MoEConfig] = None) -> dict:
    """``total`` parameters and ``active`` parameters per token. For a MoE system, only ``k``
    of the ``num_experts`` routed experts' weights are active for a token."""
    total = sum(p.numel() for p in model.parameters())
    if cfg is None or not isinstance(model, MixtureOfExpertsSystem):
        return {"total": total, "active": total}
    expert = sum(
        p.numel() for m in model.modules() if isinstance(m, ExpertBank) for p in m.parameters()
    )
    inactive = expert * (cfg.num_experts - cfg.k) // cfg.num_experts
    return {"total": total, "active": total - inactive}


def demo_config(out_dir: str, tiny: bool, steps_per_epoch: int, seed: int) -> MoEConfig:
    """The demo's model: 2 MoE layers of 8 SwiGLU experts, top-2, on 64-pixel inputs."""
    return MoEConfig(
        input_dim=64,
        output_dim=NUM_CLASSES,
        d_model=32 if tiny else 64,
        d_hidden=32 if tiny else 64,
        num_layers=2,
        # 1.4k training images: both models overfit without it (train loss ~0 by epoch 10).
        dropout=0.1,
        num_experts=4 if tiny else 8,
        k=2,
        activation="swiglu",
        strategy="topk",
        # every layer keeps routing telemetry: blocks[i].moe.routing_stats() after a run
        track_stats=True,
        load_balance_coef=1e-2,
        z_loss_coef=1e-3,
        dedup_threshold=0.98,
        # The librarian files the experts' reports once per epoch.
        consolidation_interval=steps_per_epoch,
        kg_path=os.path.join(out_dir, "knowledge.sqlite"),
        kg_merge_threshold=0.9,
        grad_clip_norm=1.0,
        max_batch_size=64,
        seed=seed,
    )


# ====================================================================== data


def load_digits_split(seed: int, tiny: bool):
    """Standardised digits split 80/20 (stratified): float32 tensors (x [N, 64], y [N])."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x = x.astype(np.float32)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.2, random_state=seed, stratify=y)
    if tiny:
        x_tr, y_tr, x_te, y_te = x_tr[:320], y_tr[:320], x_te[:160], y_te[:160]
    mean, std = x_tr.mean(0), x_tr.std(0) + 1e-3
    x_tr, x_te = (x_tr - mean) / std, (x_te - mean) / std
    t = torch.from_numpy
    return t(x_tr), t(y_tr.astype(np.int64)), t(x_te), t(y_te.astype(np.int64))


def _clear_store(path: str) -> None:
    """A fresh demo starts from an empty graph: remove an earlier run's store and snapshots."""
    for suffix in ("", "-wal", "-shm", ".lock"):
        if os.path.exists(path + suffix):
            os.remove(path + suffix)
    if os.path.isdir(path + ".checkpoints"):
        shutil.rmtree(path + ".checkpoints")


# ====================================================================== plots


def _plots(out_dir: str, load_history: np.ndarray, spec: list, names: list) -> list:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    L, _, E = load_history.shape
    fig, axes = plt.subplots(1, L, figsize=(5 * L, 3.6), squeeze=False)
    for layer in range(L):
        ax = axes[0, layer]
        share = load_history[layer] / np.maximum(load_history[layer].sum(1, keepdims=True), 1)
        for e in range(E):
            ax.plot(np.arange(1, share.shape[0] + 1), share[:, e], label=names[e])
        ax.axhline(1.0 / E, color="k", ls="--", lw=0.8)
        ax.set_title(f"layer {layer}: share of routed slots")
        ax.set_xlabel("epoch")
        ax.set_ylabel("fraction of slots")
    axes[0, -1].legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    path = os.path.join(out_dir, "expert_load.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)

    fig, axes = plt.subplots(1, L, figsize=(5 * L, 4.2), squeeze=False)
    for layer in range(L):
        ax = axes[0, layer]
        dist = np.asarray(spec[layer]["distribution"])  # [classes, E], rows sum to 1
        im = ax.imshow(dist, cmap="viridis", vmin=0, vmax=max(dist.max(), 1e-6), aspect="auto")
        ax.set_xticks(range(E))
        ax.set_xticklabels([str(e) for e in range(E)])
        ax.set_yticks(range(NUM_CLASSES))
        ax.set_xlabel("expert")
        ax.set_ylabel("digit")
        ax.set_title(f"layer {layer}: P(expert | digit), test set")
        fig.colorbar(im, ax=ax, fraction=0.046, label="P(expert | digit)")
    fig.tight_layout()
    path = os.path.join(out_dir, "specialisation.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)
    return written


def _top_digits(spec_layer: dict) -> list:
    """Per expert: (its most frequent digit, P(digit | expert)) on the test set, or None if the
    expert got no slots."""
    counts = np.asarray(spec_layer["counts"], dtype=np.float64)  # [classes, E]
    out = []
    for e in range(counts.shape[1]):
        total = counts[:, e].sum()
        d = int(np.argmax(counts[:, e]))  # ties: the lower digit
        out.append((d, float(counts[d, e] / total)) if total > 0 else None)
    return out


def graph_layout(nodes: list, num_layers: int, num_experts: int) -> dict:
    """Positions ``{node id: (x, y)}`` of the demo's knowledge graph, one column per layer.

    nodes: the store's nodes. An expert-report node (metadata ``layer``, ``expert``) goes to its
    layer's column, in its expert's row, oldest to newest (``step``, then id) from left to right;
    ``digit`` nodes form a last column spanning the same height. Other nodes are left out.
    """
    groups: dict = {}
    digits = []
    for n in nodes:
        m = n.metadata
        if n.type == "digit" and isinstance(m.get("digit"), int):
            digits.append((m["digit"], n.id))
        elif isinstance(m.get("layer"), int) and isinstance(m.get("expert"), int):
            if 0 <= m["layer"] < num_layers and 0 <= m["expert"] < num_experts:
                key = (m["layer"], m["expert"])
                groups.setdefault(key, []).append((m.get("step", 0), n.id))
    pos = {}
    for (layer, e), members in groups.items():
        members.sort()
        n = len(members)
        gap = min(0.3, 1.8 / max(n - 1, 1))
        for j, (_, nid) in enumerate(members):
            # newest at the right edge of the column, nearest the digits
            pos[nid] = (3.0 * layer + 0.9 - gap * (n - 1 - j), -float(e))
    span = max(num_experts - 1, 1)
    digits.sort()
    for j, (_, nid) in enumerate(digits):
        pos[nid] = (3.0 * num_layers + 0.5, -span * j / max(len(digits) - 1, 1))
    return pos


def draw_knowledge_graph(kg, path: str, spec: list, names: list) -> list:
    """Draw the demo's knowledge graph to ``path`` (PNG) with :func:`graph_layout`; returns the
    texts written on the figure (title, column heads, node labels, caption).

    spec: per layer, the test set's specialisation (``counts`` [digits, experts]), which labels
    each expert row with its most frequent digit. Node size: reports merged into the node.
    Lines: ``routes_to`` (digit -> expert, width P(expert | digit)) and the librarian's
    ``similar`` links.
    """
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    L, E = len(spec), len(names)
    nodes = {n.id: n for n in kg.iter_nodes()}
    pos = graph_layout(list(nodes.values()), L, E)
    cmap = colormaps["tab10" if E <= 10 else "tab20"]
    fig = Figure(figsize=(4.2 * (L + 1), max(5.0, 0.62 * E + 2.6)), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0.02, 0.17, 0.96, 0.73))
    ax.set_axis_off()
    texts = []

    def text(x, y, s, **kw):
        ax.text(x, y, s, **kw)
        texts.append(s)

    # edges first, under the nodes
    top_expert: dict = {}  # digit node -> (P(expert | digit), expert) of its strongest edge
    for src, dst, etype, w in kg.edges():
        if src not in pos or dst not in pos:
            continue
        (x0, y0), (x1, y1) = pos[src], pos[dst]
        if etype == "routes_to":
            if w < 0.05:
                continue
            e = nodes[dst].metadata.get("expert", 0)
            ax.plot(
                [x0, x1], [y0, y1], color=cmap(e % cmap.N), lw=0.5 + 5 * w, alpha=0.25 + 0.6 * w
            )
            top_expert[src] = max(top_expert.get(src, (0.0, -1)), (w, e))
        else:
            ax.plot([x0, x1], [y0, y1], color="0.5", lw=0.5, ls=":", alpha=0.5)

    for layer_e, members in _by_group(nodes, pos).items():
        layer, e = layer_e
        xs = [pos[n.id][0] for n in members]
        ys = [pos[n.id][1] for n in members]
        sizes = [25 + 35 * np.sqrt(max(n.merge_count, 1)) for n in members]
        alphas = np.linspace(0.3, 1.0, len(members)) if len(members) > 1 else [1.0]
        for x, y, sz, a in zip(xs, ys, sizes, alphas):
            ax.scatter([x], [y], s=sz, color=cmap(e % cmap.N), alpha=a, edgecolors="k", lw=0.4)
        top = _top_digits(spec[layer])[e] if layer < len(spec) else None
        label = names[e] + (f": top digit {top[0]} ({top[1]:.0%})" if top else ": unused")
        text(3.0 * layer - 0.95, -e + 0.28, label, fontsize=7, ha="left", va="bottom")

    for nid, (x, y) in pos.items():
        if nodes[nid].type != "digit":
            continue
        d = nodes[nid].metadata["digit"]
        ax.scatter([x], [y], s=260, marker="s", color="white", edgecolors="k", lw=0.8, zorder=3)
        ax.text(x, y, str(d), fontsize=9, ha="center", va="center", zorder=4)
        if nid in top_expert:
            w, e = top_expert[nid]
            text(x + 0.3, y, f"top: {names[e]}, P={w:.2f}", fontsize=7, va="center")

    top_y = 0.9
    for layer in range(L):
        text(3.0 * layer, top_y, f"layer {layer} experts", fontsize=10, ha="center", weight="bold")
    text(3.0 * L + 0.5, top_y, "digits", fontsize=10, ha="center", weight="bold")
    ax.set_xlim(-1.2, 3.0 * L + 2.4)
    ax.set_ylim(-(E - 1) - 0.6, top_y + 0.5)

    title = f"knowledge graph: {len(nodes)} nodes, {len(kg.edges())} edges"
    fig.suptitle(title, fontsize=12)
    texts.append(title)
    caption = (
        "Each row is one expert's knowledge nodes, oldest (faded) to newest (right); its label is "
        "the digit most of its test slots carry, with P(digit | expert).\n"
        "Node size: reports merged into the node. Coloured lines: digit \u2192 last-layer expert, "
        "width = P(expert | digit) on the test set (under 5% not drawn); "
        "beside each digit: its top expert and that P.\n"
        "Dotted lines: the librarian's 'similar' links between knowledge nodes."
    )
    fig.text(0.02, 0.02, caption, fontsize=8, va="bottom", ha="left", wrap=True)
    texts.append(caption)
    fig.legend(
        handles=[
            Line2D([], [], color="0.3", lw=3, label="routes_to: digit \u2192 expert (width: P)"),
            Line2D([], [], color="0.45", lw=0.8, ls=":", label="similar (librarian)"),
        ],
        loc="upper right",
        fontsize=8,
        frameon=False,
    )
    fig.savefig(path, format="png")
    return texts


def _by_group(nodes: dict, pos: dict) -> dict:
    """Expert nodes placed by :func:`graph_layout`, grouped by (layer, expert), left to right."""
    out: dict = {}
    for nid in sorted(pos, key=lambda i: pos[i][0]):
        m = nodes[nid].metadata
        if nodes[nid].type != "digit":
            out.setdefault((m["layer"], m["expert"]), []).append(nodes[nid])
    return out


# ====================================================================== main


def _batches(n: int, batch: int, gen: torch.Generator):
    perm = torch.randperm(n, generator=gen)
    for i in range(0, n, batch):
        yield perm[i : i + batch]


@torch.no_grad()
def _accuracy(fn, x: torch.Tensor, y: torch.Tensor) -> float:
    pred = fn(x).argmax(-1)
    return float((pred == y).float().mean())


def _loss_postfix(loss_history: dict) -> str:
    """The progress bar's postfix: the last epoch's mean training loss of both models."""
    return f"train loss: moe {loss_history['moe'][-1]:.3f}, dense {loss_history['dense'][-1]:.3f}"


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def check_demo_args(
    out_dir: str = os.path.join("outputs", "demo"),
    device: str = "cpu",
    epochs: Optional[int] = None,
    seed: int = 0,
    threads: Optional[int] = 1,
) -> None:
    """Check :func:`run_demo`'s arguments before any work: ``ValueError`` naming the argument,
    the expected and the received value. Creates ``out_dir`` (and checks a file can be written
    there), so an unwritable folder fails now, not after training."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise ValueError(f"demo: device must be 'cpu' or 'cuda' (or 'cuda:N'), got {device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"demo: device {device!r} requested but torch.cuda.is_available() is False"
        )
    if epochs is not None and (not _is_int(epochs) or not 1 <= epochs <= MAX_EPOCHS):
        raise ValueError(f"demo: epochs must be an int in [1, {MAX_EPOCHS}], got {epochs!r}")
    if not _is_int(seed) or not 0 <= seed <= MAX_SEED:
        raise ValueError(f"demo: seed must be an int in [0, {MAX_SEED}], got {seed!r}")
    if threads is not None and (not _is_int(threads) or not 1 <= threads <= MAX_THREADS):
        raise ValueError(
            f"demo: threads must be None (torch's default) or an int in [1, {MAX_THREADS}], "
            f"got {threads!r}"
        )
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"demo: the output folder {out_dir!r} exists and is not a folder")
    try:
        os.makedirs(out_dir, exist_ok=True)
        with tempfile.TemporaryFile(dir=out_dir):
            pass
    except OSError as exc:
        raise ValueError(
            f"demo: cannot write the output folder {out_dir!r}: {exc.strerror or exc}"
        ) from None


def run_demo(
    out_dir: str = os.path.join("outputs", "demo"),
    device: str = "cpu",
    epochs: Optional[int] = None,
    tiny: bool = False,
    seed: int = 0,
    progress: bool = True,
    batch_size: int = 64,
    lr: float = 3e-3,
    threads: Optional[int] = 1,
    quantize: Optional[str] = None,
) -> dict:
    """Run the demo; returns (and writes as ``summary.json``) its summary dict.

    ``quantize``: ``"int8"`` or ``"int4"`` also evaluates the trained model with weight-only
    quantised experts (:func:`quantization_report`: test accuracy and each layer's relative output
    error before / after; summary key ``"quantization"``). The saved model stays float.

    ``threads``: torch intra-op threads (default 1: the demo's matrices are 64 x 64, too small for
    a thread pool to pay off, and on a busy machine idle-spinning workers cost far more than they
    give; None keeps torch's setting)."""
    from tqdm.auto import tqdm

    check_demo_args(out_dir, device, epochs, seed, threads)
    if quantize is not None and quantize not in QUANTIZE_MODES:
        raise ValueError(
            f"demo: quantize must be one of {sorted(QUANTIZE_MODES)}, got {quantize!r}"
        )
    if threads is not None:
        torch.set_num_threads(threads)
    dev = torch.device(device)
    epochs = epochs if epochs is not None else (2 if tiny else 30)
    t_start = time.perf_counter()
    torch.manual_seed(seed)

    x_tr, y_tr, x_te, y_te = load_digits_split(seed, tiny)
    x_tr, y_tr, x_te, y_te = (t.to(dev) for t in (x_tr, y_tr, x_te, y_te))
    steps_per_epoch = (len(x_tr) + batch_size - 1) // batch_size
    cfg = demo_config(out_dir, tiny, steps_per_epoch, seed)
    assert cfg.kg_path is not None  # demo_config always sets it
    _clear_store(cfg.kg_path)
    names = list(cfg.expert_names)

    moe = MixtureOfExpertsSystem(cfg).to(dev)
    dense = DenseBaseline(cfg).to(dev)
    p_moe, p_dense = count_active_parameters(moe, cfg), count_active_parameters(dense)
    opt_moe = torch.optim.AdamW(moe.parameters(), lr=lr, weight_decay=1e-4)
    opt_dense = torch.optim.AdamW(dense.parameters(), lr=lr, weight_decay=1e-4)

    print(
        f"digits: {len(x_tr)} train / {len(x_te)} test images (8x8), {NUM_CLASSES} classes, "
        f"device {dev}"
    )
    print(
        f"MoE:   {cfg.num_layers} layers x {cfg.num_experts} experts, top-{cfg.k}: "
        f"{p_moe['active']:,} active / {p_moe['total']:,} total parameters"
    )
    print(f"dense: same layout, FFN width {cfg.k * cfg.d_hidden}: {p_dense['total']:,} params")

    L, E = cfg.num_layers, cfg.num_experts
    load_history = np.zeros((L, epochs, E))
    loss_history: dict = {"moe": [], "dense": []}
    gen = torch.Generator().manual_seed(seed)
    bar = tqdm(
        total=epochs * steps_per_epoch,
        desc="training MoE + dense",
        disable=not progress,
        unit="step",
    )
    t_train = {"moe": 0.0, "dense": 0.0}
    for epoch in range(epochs):
        sums = {"moe": 0.0, "dense": 0.0}
        for idx in _batches(len(x_tr), batch_size, gen):
            xb, yb = x_tr[idx.to(dev)], y_tr[idx.to(dev)]
            t0 = time.perf_counter()
            r = moe.training_step((xb, yb), opt_moe, F.cross_entropy)
            t_train["moe"] += time.perf_counter() - t0
            load_history[:, epoch, :] += np.asarray(r.stats["load"])
            sums["moe"] += r.task_loss

            t0 = time.perf_counter()
            dense.train()
            loss = F.cross_entropy(dense(xb), yb)
            opt_dense.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip_norm is not None:
                torch.nn.utils.clip_grad_norm_(dense.parameters(), cfg.grad_clip_norm)
            opt_dense.step()
            t_train["dense"] += time.perf_counter() - t0
            sums["dense"] += float(loss.detach())
            bar.update(1)
        for k in sums:
            loss_history[k].append(sums[k] / steps_per_epoch)
        bar.set_postfix_str(_loss_postfix(loss_history))
    bar.close()

    # ---- evaluation
    moe.eval()
    dense.eval()
    moe.collect_reports = False  # evaluation is not knowledge to file
    with torch.no_grad():
        out = moe(x_te)
    acc_moe = float((out.output.argmax(-1) == y_te).float().mean())
    acc_dense = _accuracy(dense, x_te, y_te)
    print(f"\ntest accuracy: MoE {acc_moe:.4f}   dense {acc_dense:.4f}")

    telemetry, spec = [], []
    print("\nrouting telemetry (test set)")
    for layer, info in enumerate(out.routing):
        summary = load_summary(info.counts)
        s = specialisation(info.ids, y_te, E, NUM_CLASSES).as_dict()
        telemetry.append(
            {
                "load": info.counts.tolist(),
                "cv": summary["cv"],
                "gini": summary["gini"],
                "max_over_mean": summary["max_over_mean"],
                "dead_experts": summary["dead_experts"],
                "dropped": int(info.stats["dropped"]) if "dropped" in info.stats else 0,
            }
        )
        spec.append(s)
        print(
            f"  layer {layer}: load {info.counts.tolist()}  cv={summary['cv']:.3f} "
            f"gini={summary['gini']:.3f} max/mean={summary['max_over_mean']:.2f} "
            f"dead={summary['dead_experts']}"
        )

    # ---- specialisation: for each expert, the digits that make up most of its traffic
    experts_classes = []
    print(
        "\nexpert specialisation (last layer): the digits most of each expert's test slots carry, "
        "P(digit | expert)"
    )
    last = spec[-1]
    counts = np.asarray(last["counts"], dtype=np.float64)  # [classes, E]
    for e in range(E):
        col = counts[:, e]
        total = col.sum()
        order = np.argsort(-col, kind="stable")
        top = [(int(c), float(col[c] / total)) for c in order[:3] if total > 0 and col[c] > 0]
        experts_classes.append({"expert": e, "name": names[e], "top_digits": top})
        desc = ", ".join(f"{c} ({share:.0%})" for c, share in top) or "unused"
        print(f"  {names[e]:<10} digits {desc}")

    # ---- knowledge graph: file the reports of the last (partial) interval, link digits
    moe.consolidate()
    kg = moe.knowledge_graph
    class_nodes = _add_digit_nodes(moe, kg, x_te, y_te, spec, L)
    print(f"\nknowledge graph: {len(kg)} nodes, {kg.num_edges()} edges at {cfg.kg_path}")

    # ---- a query answered from the graph: which experts' current knowledge (the nodes the last
    # consolidation wrote or merged into) is closest to images of a digit; the graph's routes_to
    # edges then say which digits those experts serve. Checked against routing for every digit.
    current = {"layer": L - 1, "step": moe.step}
    node_type = (moe.librarian.node_type,)
    agree = 0
    per_digit = {}
    for d in range(NUM_CLASSES):
        if not bool((y_te == d).any()):
            continue
        hits = moe.query_knowledge_graph(
            x_te[y_te == d], top_k=3, from_inputs=True, layer=-1, types=node_type, where=current
        )
        routed = [int(e) for e in np.argsort(-counts[d], kind="stable")[: cfg.k]]
        best = hits[0]["metadata"]["expert"] if hits else None
        agree += best in routed
        per_digit[d] = {"best_expert": best, "routed_to": routed}
    digit = 7
    hits = moe.query_knowledge_graph(
        x_te[y_te == digit], top_k=3, from_inputs=True, layer=-1, types=node_type, where=current
    )
    print(f"\nquery: which experts' knowledge is closest to images of the digit {digit}?")
    for h in hits:
        served = sorted(
            (
                (n.weight, kg.get_node(n.id).metadata["digit"])
                for n in kg.neighbors(h["id"], type="routes_to", direction="in")
            ),
            reverse=True,
        )
        h["digits_routed_here"] = [{"digit": d, "p_expert_given_digit": w} for w, d in served[:3]]
        m = h["metadata"]
        desc = ", ".join(f"{d} ({w:.2f})" for w, d in served[:3]) or "-"
        print(
            f"  node {h['id']:>4} cos={h['similarity']:+.3f}  layer {m.get('layer')} "
            f"{m.get('expert_name', m.get('expert'))}: digits routed here, "
            f"P(expert | digit): {desc}"
        )
    routed_to = per_digit.get(digit, {}).get("routed_to")
    print(f"  routing on the test set sends digit {digit} mostly to experts {routed_to}")
    print(
        f"  over all digits, the closest expert in the graph is one the digit is routed to for "
        f"{agree}/{len(per_digit)} digits"
    )
    answer = {
        "digit": digit,
        "hits": hits,
        "experts_the_digit_routes_to": routed_to,
        "agreement_with_routing": {
            "agree": agree,
            "digits": len(per_digit),
            "per_digit": per_digit,
        },
    }

    quant = None
    if quantize is not None:
        quant = quantization_report(moe, x_te, y_te, quantize)
        print(
            f"quantised experts ({quantize}, group sizes {quant['group_sizes']}; 0 = per channel): "
            f"test accuracy "
            f"{quant['accuracy_quantized']:.4f} (fp32 {quant['accuracy_fp32']:.4f}, "
            f"{quant['accuracy_drop_pt']:+.2f} pt drop); layer output error "
            + ", ".join(f"{e:.3%}" for e in quant["layer_relative_error"])
        )

    # ---- files
    written = _plots(out_dir, load_history, spec, names)
    kg_png = os.path.join(out_dir, "knowledge_graph.png")
    draw_knowledge_graph(kg, kg_png, spec, names)
    written.append(kg_png)
    model_dir = os.path.join(out_dir, "model")
    moe.save(model_dir)
    written += [os.path.join(model_dir, f) for f in sorted(os.listdir(model_dir))]
    written.append(cfg.kg_path)

    summary = {
        "dataset": {"name": "sklearn digits", "train": len(x_tr), "test": len(x_te)},
        "device": str(dev),
        "threads": torch.get_num_threads(),
        "epochs": epochs,
        "tiny": tiny,
        "config": cfg.to_dict(),
        "parameters": {"moe": p_moe, "dense": p_dense},
        "test_accuracy": {"moe": acc_moe, "dense": acc_dense},
        "quantization": quant,
        "train_loss_per_epoch": loss_history,
        "train_seconds": t_train,
        "routing_telemetry": telemetry,
        "specialisation": {"last_layer_experts": experts_classes, "per_layer": spec},
        "knowledge_graph": {
            "path": cfg.kg_path,
            "nodes": len(kg),
            "edges": kg.num_edges(),
            "digit_nodes": class_nodes,
        },
        "query": answer,
        "files": written,
        "seconds": time.perf_counter() - t_start,
    }
    with open(os.path.join(out_dir, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
    moe.close()
    print(f"\nwrote {len(written) + 1} files to {out_dir} in {summary['seconds']:.1f}s")
    return summary


QUANTIZE_MODES = {"int8": (8, None), "int4": (4, None)}


def quantization_report(
    moe: MixtureOfExpertsSystem, x: torch.Tensor, y: torch.Tensor, mode: str
) -> dict:
    """Accuracy of ``moe`` on ``(x, y)`` with fp32 and with quantised experts (``mode`` "int8":
    per-channel INT8; "int4": INT4 symmetric, group 128 capped at the layer width), and each MoE
    layer's relative output error ``||y_q - y|| / ||y||`` on the inputs the float model gives it.
    ``moe`` is left as it was (its float experts are put back)."""
    from .quantization import QuantizedExperts, quantize_experts

    if mode not in QUANTIZE_MODES:
        raise ValueError(f"demo: quantize must be one of {sorted(QUANTIZE_MODES)}, got {mode!r}")
    bits, group_size = QUANTIZE_MODES[mode]
    was_training = moe.training
    moe.eval()
    blocks = moe._blocks()
    inputs: list = []
    hooks = [b.moe.register_forward_hook(lambda m, a, out: inputs.append(a[0])) for b in blocks]
    try:
        with torch.no_grad():
            acc_fp32 = float((moe(x).output.argmax(-1) == y).float().mean())
            float_out = [b.moe(h)[0] for b, h in zip(blocks, inputs)]
    finally:
        for h in hooks:
            h.remove()
    originals = [b.moe.experts for b in blocks]
    try:
        with torch.no_grad():
            for b in blocks:
                quantize_experts(b.moe, bits, group_size)
            q_out = [b.moe(h)[0] for b, h in zip(blocks, inputs)]
            acc_q = float((moe(x).output.argmax(-1) == y).float().mean())
        quantized = [q for b in blocks if isinstance(q := b.moe.experts, QuantizedExperts)]
        fp32_bytes = sum(p.numel() * p.element_size() for o in originals for p in o.parameters())
        q_bytes = sum(q.weight_bytes() for q in quantized)
        gs = sorted({g for q in quantized for g in (q.group_size_in, q.group_size_out)})
    finally:
        for b, o in zip(blocks, originals):
            b.moe.experts = o
        moe.train(was_training)
    errors = [float((q - f).norm() / f.norm().clamp_min(1e-30)) for q, f in zip(q_out, float_out)]
    return {
        "mode": mode,
        "bits": bits,
        "group_sizes": gs,
        "accuracy_fp32": acc_fp32,
        "accuracy_quantized": acc_q,
        "accuracy_drop_pt": 100.0 * (acc_fp32 - acc_q),
        "layer_relative_error": errors,
        "expert_bytes": {"fp32": fp32_bytes, "quantized": q_bytes},
    }


def _add_digit_nodes(moe, kg, x_te, y_te, spec, L) -> dict:
    """One node per digit (embedding: its test images' mean MoE output in the last layer), with a
    ``routes_to`` edge to the last layer's expert nodes weighted by P(expert | digit)."""
    # Link each digit to the most recently updated node of each last-layer expert: what the
    # expert knows now, not an early snapshot of it.
    expert_node: dict = {}
    newest: dict = {}
    for node in kg.iter_nodes():
        m = node.metadata
        if m.get("layer") == L - 1 and "expert" in m and node.type != "digit":
            e = int(m["expert"])
            if e not in newest or (node.updated_at, node.id) > newest[e]:
                newest[e] = (node.updated_at, node.id)
                expert_node[e] = node.id
    dist = np.asarray(spec[-1]["distribution"])
    out = {}
    for digit in range(NUM_CLASSES):
        sel = x_te[y_te == digit]
        if len(sel) == 0:
            continue
        emb = moe.embed_inputs(sel, layer=-1).cpu().numpy()
        nid = kg.add_node(emb, type="digit", metadata={"digit": digit, "layer": "digits"})
        out[digit] = int(nid)
        edges = [
            (nid, expert_node[e], "routes_to", float(dist[digit, e]))
            for e in expert_node
            if dist[digit, e] > 0
        ]
        kg.add_edges_batch(edges)
    return out
