"""Sparse expert attention vs dense multi-head attention on a character language model.

Data: the dataset descriptions scikit-learn ships (``sklearn/datasets/descr/*.rst``, ~43 KB of
English; no download), character-level, 90/10 split. Two-layer pre-norm transformers that differ
only in their attention: :class:`~moe_framework.sparse_attention.SparseExpertAttention` (k of E
query/output experts per token, shared K/V) against plain ``scaled_dot_product_attention``
multi-head attention, at about equal active FLOPs per token (the table prints both counts).
Same seed, same batches, same optimiser, trained in the same run; reported: validation loss in
bits per character, training tokens/s and inference tokens/s.

    python -m moe_framework.benchmarks.bench_sparse_attention [--quick] [--steps N] [--seq-len L] [--batch B]
"""

from __future__ import annotations

import functools
import glob
import os
import time

import torch
import torch.nn.functional as F
from torch import nn

import moe_framework  # noqa: F401
from moe_framework.benchmarks import common
from moe_framework.sparse_attention import SparseExpertAttention, attention_flops_per_token


def load_text() -> str:
    """The concatenated scikit-learn dataset descriptions (sorted by file name)."""
    import sklearn.datasets

    folder = os.path.join(os.path.dirname(sklearn.datasets.__file__), "descr")
    files = sorted(glob.glob(os.path.join(folder, "*.rst")))
    if not files:
        raise RuntimeError(f"no dataset descriptions under {folder}")
    return "\n".join(open(f, encoding="utf-8").read() for f in files)


class DenseAttention(nn.Module):
    """Plain multi-head causal attention: q, k, v, o projections of ``heads`` heads of
    ``head_dim``."""

    def __init__(self, d: int, heads: int, head_dim: int):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.qkv = nn.Linear(d, 3 * heads * head_dim, bias=False)
        self.o = nn.Linear(heads * head_dim, d, bias=False)

    def forward(self, x):
        B, S, _ = x.shape
        H, h = self.heads, self.head_dim
        q, k, v = self.qkv(x).reshape(B, S, 3, H, h).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(a.transpose(1, 2).reshape(B, S, H * h)), None


class TinyLM(nn.Module):
    """Token + position embeddings, ``layers`` x (LN -> attention -> residual, LN -> GELU FFN ->
    residual), LN, head. ``attention()`` builds each layer's attention."""

    def __init__(self, vocab: int, d: int, layers: int, seq_len: int, attention):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(seq_len, d) * 0.02)
        self.attn = nn.ModuleList(attention() for _ in range(layers))
        self.norms1 = nn.ModuleList(nn.LayerNorm(d) for _ in range(layers))
        self.norms2 = nn.ModuleList(nn.LayerNorm(d) for _ in range(layers))
        self.ffn = nn.ModuleList(
            nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
            for _ in range(layers)
        )
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)

    def forward(self, idx):
        h = self.embed(idx) + self.pos[: idx.shape[1]]
        aux = h.new_zeros(())
        for attn, n1, n2, ffn in zip(self.attn, self.norms1, self.norms2, self.ffn):
            a, dec = attn(n1(h))
            if dec is not None:
                aux = aux + dec.aux_loss
            h = h + a
            h = h + ffn(n2(h))
        return self.head(self.norm(h)), aux


def batches(data: torch.Tensor, steps: int, batch: int, seq: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        start = torch.randint(0, data.numel() - seq - 1, (batch,), generator=g)
        idx = torch.stack([data[s : s + seq + 1] for s in start.tolist()])
        yield idx[:, :-1], idx[:, 1:]


@torch.no_grad()
def eval_bits_per_char(model: nn.Module, data: torch.Tensor, seq: int) -> float:
    model.eval()
    n = (data.numel() - 1) // seq
    x = data[: n * seq].reshape(n, seq)
    y = data[1 : n * seq + 1].reshape(n, seq)
    logits, _ = model(x)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
    model.train()
    return float(loss) / float(torch.log(torch.tensor(2.0)))


def run(args) -> dict:
    text = load_text()
    chars = sorted(set(text))
    lut = {c: i for i, c in enumerate(chars)}
    data = torch.tensor([lut[c] for c in text], dtype=torch.long)
    split = int(0.9 * data.numel())
    train, val = data[:split], data[split:]
    d, h, E, k_sparse, H_dense, layers = 64, 16, 8, 3, 2, 2
    seq, batch = args.seq_len, args.batch
    steps = args.steps or (20 if args.quick else 250)
    variants = {
        f"dense MHA {H_dense} heads": lambda: DenseAttention(d, H_dense, h),
        f"sparse expert attention k={k_sparse} of E={E}": lambda: SparseExpertAttention(
            d, E, k_sparse, head_dim=h, load_balance_coef=1e-2
        ),
        f"dense MHA {2 * H_dense} heads (2x FLOPs)": lambda: DenseAttention(d, 2 * H_dense, h),
    }
    flops = {
        f"dense MHA {H_dense} heads": attention_flops_per_token(
            d_model=d, head_dim=h, heads=H_dense, seq_len=seq
        ),
        f"sparse expert attention k={k_sparse} of E={E}": attention_flops_per_token(
            d_model=d, head_dim=h, heads=k_sparse, seq_len=seq, num_experts=E
        ),
        f"dense MHA {2 * H_dense} heads (2x FLOPs)": attention_flops_per_token(
            d_model=d, head_dim=h, heads=2 * H_dense, seq_len=seq
        ),
    }
    rows = []
    for name, make in variants.items():
        torch.manual_seed(args.seed)
        model = TinyLM(len(chars), d, layers, seq, make)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
        t0 = time.perf_counter()
        for x, y in batches(train, steps, batch, seq, args.seed):
            logits, aux = model(x)
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1)) + aux
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        train_s = time.perf_counter() - t0
        bpc = eval_bits_per_char(model, val, seq)
        model.eval()
        xb = train[: batch * seq].reshape(batch, seq)
        with torch.no_grad():
            t = common.timeit(functools.partial(model, xb), warmup=2, min_time=0.5)
        rows.append(
            {
                "attention": name,
                "attn MFLOP/token": flops[name] / 1e6,
                "attn params": sum(p.numel() for p in model.attn.parameters()),
                "val bits/char": bpc,
                "train tok/s": steps * batch * seq / train_s,
                "infer tok/s": batch * seq / t["median_s"],
            }
        )
    return {
        "rows": rows,
        "config": dict(d_model=d, head_dim=h, num_experts=E, k=k_sparse, dense_heads=H_dense,
                       seq_len=seq, batch=batch, layers=layers, steps=steps, vocab=len(chars),
                       train_chars=int(train.numel()), val_chars=int(val.numel())),
    }  # fmt: skip


def main() -> None:
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=None, help="training steps per model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seq-len", type=int, default=32, help="characters per sequence")
    p.add_argument("--batch", type=int, default=8, help="sequences per step")
    args = p.parse_args()
    # One thread by default (as the demo): these matrices are too small for a pool to pay off,
    # and on a shared machine spinning workers cost far more than they give.
    threads = common.thread_counts(args.threads or [1])[-1]
    torch.set_num_threads(threads)
    load_start = os.getloadavg()
    result = run(args)
    load_end = os.getloadavg()
    cfg = result["config"]
    title = (
        f"Char LM (sklearn dataset descriptions), {cfg['layers']} layers d={cfg['d_model']} "
        f"seq={cfg['seq_len']} batch={cfg['batch']}, {cfg['steps']} steps, {threads} threads"
    )
    cols = ["attention", "attn MFLOP/token", "attn params", "val bits/char", "train tok/s",
            "infer tok/s"]  # fmt: skip
    common.print_table(result["rows"], cols, title=title)
    print(f"load average: start {load_start[0]:.2f}, end {load_end[0]:.2f}")
    common.write_json(
        "sparse_attention",
        {
            "machine": common.machine_info("cpu"),
            "loadavg_start": load_start,
            "loadavg_end": load_end,
            **result,
        },
        args.out,
    )


if __name__ == "__main__":
    main()
