"""Accuracy of weight-only quantised experts on trained weights: a small Hugging Face Mixtral
fine-tuned for a few steps on packaged text, then each MoE layer's experts quantised.

Model: MixtralForCausalLM, byte-level (vocab 256), hidden 128, 8 experts of width 256, top-2,
2 layers, trained from scratch for ``--steps`` AdamW steps on scikit-learn's packaged dataset
descriptions (``sklearn/datasets/descr/*.rst``, ~80 KB of English text; the last 10% held out),
run through our experts (``replace_moe_blocks``). Then, per scheme (INT8 per channel; INT4
group 32 / 64 / 128, symmetric and asymmetric):

* "layer rel err": ``||y_q - y|| / ||y||`` of each layer's experts stage on the exact inputs
  (expert-sorted tokens, offsets) the float model gives it on held-out text (max over layers);
* held-out next-byte loss and accuracy of the whole model with quantised experts vs fp32.

    python -m moe_framework.benchmarks.quant_accuracy            # 300 steps
    python -m moe_framework.benchmarks.quant_accuracy --quick    # 30 steps
"""

from __future__ import annotations

import glob
import os
import time

import torch
import torch.nn.functional as F

from moe_framework.benchmarks import common

# (name, bits, group size, symmetric, act_quant): "a8" = INT8 activations (integer dot products)
SCHEMES = [
    ("int8", 8, None, True, None),
    ("int4 g32", 4, 32, True, None),
    ("int4 g64", 4, 64, True, None),
    ("int4 g128", 4, 128, True, None),
    ("int4 g128 asym", 4, 128, False, None),
    ("int8 a8", 8, None, True, "int8"),
    ("int4 g32 a8", 4, 32, True, "int8"),
    ("int4 g128 a8", 4, 128, True, "int8"),
    ("int4 g128 asym a8", 4, 128, False, "int8"),
]


def _text() -> torch.Tensor:
    import sklearn.datasets

    folder = os.path.join(os.path.dirname(sklearn.datasets.__file__), "descr")
    data = b"".join(open(p, "rb").read() for p in sorted(glob.glob(os.path.join(folder, "*.rst"))))
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()


def _batches(tokens: torch.Tensor, seq: int, batch: int, gen: torch.Generator):
    while True:
        starts = torch.randint(0, len(tokens) - seq - 1, (batch,), generator=gen)
        yield torch.stack([tokens[s : s + seq + 1] for s in starts.tolist()])


def _eval(model, tokens: torch.Tensor, seq: int) -> tuple:
    n = (len(tokens) - 1) // seq
    x = tokens[: n * seq + 1]
    inp = x[:-1].reshape(n, seq)
    tgt = x[1:].reshape(n, seq)
    with torch.no_grad():
        logits = model(inp).logits
    loss = float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1)))
    acc = float((logits.argmax(-1) == tgt).float().mean())
    return loss, acc


def run(quick: bool = False, steps=None, out_dir=None) -> dict:
    import transformers

    from moe_framework.integrations.transformers import HFExperts, replace_moe_blocks
    from moe_framework.quantization import QuantizedExperts

    load_start = os.getloadavg()
    t0 = time.perf_counter()
    torch.manual_seed(0)
    steps = steps or (30 if quick else 300)
    tokens = _text()
    split = int(0.9 * len(tokens))
    train, held = tokens[:split], tokens[split:]
    kw: dict = dict(
        hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=256, max_position_embeddings=128,
        num_local_experts=8, num_experts_per_tok=2, experts_implementation="eager",
    )  # fmt: skip
    model = transformers.MixtralForCausalLM(transformers.MixtralConfig(**kw))
    replace_moe_blocks(model)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    gen = torch.Generator().manual_seed(0)
    data = _batches(train, 64, 16, gen)
    model.train()
    first_loss = last_loss = float("nan")
    for step in range(steps):
        b = next(data)
        loss = model(b[:, :-1], labels=b[:, :-1]).loss  # HF shifts the labels itself
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        first_loss = float(loss) if step == 0 else first_loss
        last_loss = float(loss)
    model.eval()
    held = held[: 64 * 64 + 1] if quick else held
    fp_loss, fp_acc = _eval(model, held, 64)

    adapters = [m for m in model.modules() if isinstance(m, HFExperts)]
    captured: list = []
    hooks = [
        a.register_forward_hook(lambda m, a, out: captured.append((a[0], a[1], out)))
        for a in adapters
    ]
    _eval(model, held[: 16 * 64 + 1], 64)
    for h in hooks:
        h.remove()
    # the MoELayer that holds each adapter, to swap its experts stage
    parents = [(m, m.experts) for m in model.modules() if getattr(m, "experts", None) in adapters]

    rows = []
    for name, bits, gs, sym, act in SCHEMES:
        quantized = [
            QuantizedExperts.from_float(
                a.hf_experts.gate_up_proj.detach(),
                a.hf_experts.down_proj.detach(),
                bits=bits,
                group_size=gs,
                symmetric=sym,
                act_quant=act,
            )  # fmt: skip
            for a in adapters
        ]
        errs = []
        with torch.no_grad():
            for i, (x, off, y) in enumerate(captured):
                yq = quantized[i % len(quantized)](x, off)
                errs.append(float((yq - y).norm() / y.norm()))
        for (parent, _), q in zip(parents, quantized):
            parent.experts = q
        q_loss, q_acc = _eval(model, held, 64)
        for parent, orig in parents:
            parent.experts = orig
        rows.append(
            {
                "scheme": name,
                "layer rel err (max)": max(errs),
                "layer rel err (mean)": sum(errs) / len(errs),
                "held-out loss": q_loss,
                "loss delta": q_loss - fp_loss,
                "next-byte acc": q_acc,
                "acc drop (pt)": 100.0 * (fp_acc - q_acc),
            }
        )
    title = (
        f"HF Mixtral (byte-level, h=128, 8 experts x 256, top-2, 2 layers) after {steps} steps "
        f"(train loss {first_loss:.2f} -> {last_loss:.2f}); fp32 held-out loss {fp_loss:.4f}, "
        f"next-byte acc {fp_acc:.4f}"
    )
    common.print_table(rows, title=title)
    payload = {
        "benchmark": "quant_accuracy",
        "steps": steps,
        "train_loss": {"first": first_loss, "last": last_loss},
        "fp32": {"held_out_loss": fp_loss, "next_byte_acc": fp_acc},
        "rows": rows,
        "loadavg_start": load_start,
        "loadavg_end": os.getloadavg(),
        "wall_s": time.perf_counter() - t0,
    }
    common.write_json("quant_accuracy" + ("_quick" if quick else ""), payload, out_dir)
    return payload


def main(argv=None) -> None:
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=None, help="fine-tuning steps (default 300)")
    args = p.parse_args(argv)
    torch.set_num_threads((args.threads or [2])[0])
    run(quick=args.quick, steps=args.steps, out_dir=args.out)


if __name__ == "__main__":
    main()
