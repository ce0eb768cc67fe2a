"""How much of Muon's update fewer Newton-Schulz iterations keep, on a real network's filter banks.

`optim.muon_ns_steps` trades the orthogonalization's matrix products (a fifth of them an iteration) against
how close each update gets to U V^T. This measures the second half on the config's network, at its
initialization or at trained weights (a checkpoint or exported weights file), on any device (a CPU is
enough: no timing here; the GPU's cost of an iteration is benchmarks/kernels/bench_optim.py's):

1. the gradients of `--batches` training batches (the config's augmentation, loss and label smoothing; BN
   in training mode), the weights held fixed;
2. Muon's Nesterov direction over them, d = g_last + mu * buf with buf = sum mu^k g (mu: optim.muon_momentum),
   as the momentum buffer would hold it after those steps;
3. per filter bank, O_n = orthogonalize(d, n) for each n of --steps, against Muon's 5 iterations and the
   exact polar factor U V^T of d's SVD.

Per n it prints (filter banks weighted by their size): the cosine of O_n with O_5 and with U V^T, the
ratio of norms |O_n| / |O_5| (fewer iterations take a shorter step in the weak directions: in effect a
lower learning rate there), and the weakest decile of O_n's singular values in d's basis (1 would be U V^T).
A proxy for what a step loses, not for accuracy: the accuracy is the recipe search's.

    python benchmarks/muon_ns_check.py --config configs/best.yaml [--weights FILE] [--batches 8]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/: the shared helpers in common.py
from common import print_table, run_main, run_metadata, write_json  # noqa: E402

from fasttrain.config import MAX_NS_STEPS, load_config  # noqa: E402
from fasttrain.data import build_data  # noqa: E402
from fasttrain.evaluate import load_model, use_local_data  # noqa: E402
from fasttrain.model import build_model  # noqa: E402
from fasttrain.muon import NS_STEPS, is_filter_bank, matrix_shape, orthogonalize  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SCRIPT = "benchmarks/muon_ns_check.py"  # in the result's command line, as typed from the repository root


def muon_directions(model: torch.nn.Module, batches, mu: float, label_smoothing: float) -> dict[str, torch.Tensor]:
    """Each filter bank's Nesterov direction after the gradients of `batches` (weights fixed): g_last + mu buf,
    buf = mu buf + g over the batches in order."""
    banks = {name: p for name, p in model.named_parameters() if is_filter_bank(p)}
    bufs = {name: torch.zeros_like(p) for name, p in banks.items()}
    model.train()
    grads = {}
    for images, labels in batches:
        model.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(images), labels, label_smoothing=label_smoothing).backward()
        grads = {name: p.grad.detach().clone() for name, p in banks.items()}
        for name, g in grads.items():
            bufs[name].mul_(mu).add_(g)
    return {name: grads[name] + mu * bufs[name] for name in banks}


def bank_figures(d: torch.Tensor, steps: list[int], dtype: torch.dtype) -> dict[int, dict]:
    """For one direction d [out, in, kh, kw]: per n of `steps`, O_n's cosine with O_5 and with U V^T, its norm
    over O_5's, and the 10th percentile of its singular values in d's basis (diag of U^T O_n V)."""
    m = d.reshape(matrix_shape(d)).double()
    u, _, vh = torch.linalg.svd(m, full_matrices=False)
    polar = u @ vh
    reference = orthogonalize(m, NS_STEPS, dtype=dtype).double()
    figures = {}
    for n in steps:
        o = orthogonalize(m, n, dtype=dtype).double()
        values = torch.diagonal(u.mT @ o @ vh.mT)
        figures[n] = {
            "cos_ns5": float((o * reference).sum() / (o.norm() * reference.norm())),
            "cos_polar": float((o * polar).sum() / (o.norm() * polar.norm())),
            "norm_ratio": float(o.norm() / reference.norm()),
            "sv_p10": float(torch.quantile(values, 0.1)),
        }
    return figures


def summarize(per_bank: dict[str, dict], sizes: dict[str, int], steps: list[int]) -> list[dict]:
    """Per n: the size-weighted means over banks, the lowest cosine with O_5, the median weakest decile."""
    total = sum(sizes.values())
    rows = []
    for n in steps:
        def mean(key):
            return sum(per_bank[b][n][key] * sizes[b] for b in per_bank) / total
        p10 = sorted(per_bank[b][n]["sv_p10"] for b in per_bank)
        rows.append({"ns_steps": n, "cos_ns5": mean("cos_ns5"), "cos_ns5_min": min(per_bank[b][n]["cos_ns5"]
                                                                                 for b in per_bank),
                     "cos_polar": mean("cos_polar"), "norm_ratio": mean("norm_ratio"),
                     "sv_p10_median": p10[len(p10) // 2]})
    return rows


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/best.yaml", help="the network, data and loss (default best.yaml)")
    parser.add_argument("--weights", help="a checkpoint or exported weights file: measure at its weights (default: "
                                          "the config's network at initialization, seeded by train.seed)")
    parser.add_argument("--batches", type=int, default=8, help="training batches in the momentum (default 8)")
    parser.add_argument("--batch-size", type=int, default=256, help="images a batch (default 256)")
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 2, 3, 4, 5], help="Newton-Schulz counts")
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32",
                        help="Newton-Schulz's precision (a GPU step runs bf16; default fp32)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, help="JSON result file (default: printed only)")
    args = parser.parse_args(argv)
    if any(not 1 <= n <= MAX_NS_STEPS for n in args.steps) or args.batches < 1 or args.batch_size < 1:
        parser.error(f"--steps each 1..{MAX_NS_STEPS}, --batches and --batch-size at least 1")
    device = torch.device(args.device)
    if args.weights:
        model, cfg = load_model(args.weights, device=device)
        use_local_data(cfg)  # $FASTTRAIN_DATA before the path the run was trained with
    else:
        cfg = load_config(args.config, [])
        torch.manual_seed(cfg.train.seed)
        model = build_model(cfg.model, device=device)
    data = build_data(cfg.data, batch_size=args.batch_size, eval_batch_size=args.batch_size, device=device,
                      dtype=torch.float32, channels_last=False, seed=cfg.train.seed)
    data.train.set_epoch(0)
    batches = [(x, y) for (x, y), _ in zip(data.train, range(args.batches))]
    directions = muon_directions(model, batches, cfg.optim.muon_momentum, cfg.optim.label_smoothing)
    # a bank without a gradient (behind a dead ReLU: best.yaml's trained stem SE has every squeeze unit off) has no
    # direction to compare: named, not averaged in
    idle = sorted(name for name, d in directions.items() if not d.any())
    per_bank = {name: bank_figures(d, args.steps, DTYPES[args.dtype]) for name, d in directions.items()
                if name not in idle}
    sizes = {name: directions[name].numel() for name in per_bank}
    rows = summarize(per_bank, sizes, args.steps)
    source = args.weights or f"{args.config} at initialization (seed {cfg.train.seed})"
    print_table(f"Muon's update at n Newton-Schulz iterations against 5 and against U V^T: {len(per_bank)} filter "
                f"banks of {cfg.name} ({source}), {args.batches} batches of {args.batch_size}, {args.dtype}",
                ["n", "cos O_5", "min cos O_5", "cos U V^T", "|O_n| / |O_5|", "weakest decile sv"],
                [[r["ns_steps"], *(f"{r[k]:.4f}" for k in ("cos_ns5", "cos_ns5_min", "cos_polar", "norm_ratio",
                                                         "sv_p10_median"))] for r in rows])
    if idle:
        print(f"without a gradient at these weights (left out): {', '.join(idle)}")
    if args.out:
        meta = run_metadata(device, argv=[SCRIPT, *argv])
        banks = {b: {"shape": list(directions[b].shape), **{str(n): f for n, f in per_bank[b].items()}}
                 for b in per_bank}
        path = write_json(args.out, {**meta, "weights": source, "batches": args.batches, "batch_size": args.batch_size,
                                     "dtype": args.dtype, "rows": rows, "banks_without_gradient": idle,
                                     "banks": banks})
        print(f"wrote {path}")


if __name__ == "__main__":
    run_main(main)
