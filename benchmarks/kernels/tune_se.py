"""Tile-size sweep of the fused SE kernels (fasttrain.kernels.se) at the network's shapes, on a GPU.

The SE launchers size each program's [BLOCK_C, BLOCK_HW] tile from two module constants:
`_GATE_TILE` (the elementwise gate kernels, forward and backward) and `_REDUCE_TILE` (the pooling
reductions). This script sets every pair from `--tiles`, checks the output and every gradient against
the PyTorch reference (a fast wrong configuration is worth nothing), times forward+backward of each
shape of bench_se.py with CUDA events, and ranks the pairs: by the paper's model (SE after the stem only) and
by the sum over all shapes (SE in every block). The defaults are marked in the table. Change the
constants in kernels/se.py only from a result file this wrote.

    python benchmarks/kernels/tune_se.py [--batch 512] [--tiles 1024 2048 4096 8192] [--out DIR]
    python benchmarks/kernels/tune_se.py --cpu-smoke   # seconds on a CPU: the sweep's plumbing runs once
"""
from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: the shared helpers in common.py
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_se import SHAPES, bench_case, make_inputs  # noqa: E402
from common import (add_kernel_bench_arguments, finish_gpu_benchmark, kernel_bench_out,  # noqa: E402
                    save_partial, start_gpu_benchmark)

STEM = "stem"  # the placement of the paper's model (configs/seed.yaml): one SE after the stem


def forward_backward_error(se_mod, x, w, r) -> float:
    """The largest relative error (L2) of the output and of every input's gradient, kernels against the
    PyTorch reference: the tiles size the backward kernels too, so both directions are checked."""
    inputs = [x, *w] + ([r] if r is not None else [])
    dy = torch.randn_like(x)
    outputs = {}
    for name, fn in (("got", se_mod.se_gate), ("want", se_mod.se_gate_reference)):
        y = fn(x, *w, residual=r)
        outputs[name] = [y, *torch.autograd.grad(y, inputs, dy)]
    got, want = ([t.detach().float() for t in outputs[k]] for k in ("got", "want"))
    return max(float((g - e).norm() / e.norm().clamp_min(1e-12)) for g, e in zip(got, want))


def rank_pairs(rows: list[dict]) -> list[dict]:
    """Per (gate, reduce) pair that was correct on every shape: the stem's and the total
    forward+backward ms, sorted by the stem time (the shipped model), then the total."""
    pairs: dict[tuple[int, int], dict] = {}
    for r in rows:
        key = (r["gate_tile"], r["reduce_tile"])
        p = pairs.setdefault(key, {"gate_tile": key[0], "reduce_tile": key[1], "stem_ms": 0.0, "total_ms": 0.0,
                                   "correct": True, "default": r["default"]})
        p["correct"] &= r["correct"]
        p["total_ms"] += r["forward_backward_ms"]
        if r["placement"] == STEM:
            p["stem_ms"] += r["forward_backward_ms"]
    return sorted((p for p in pairs.values() if p["correct"]), key=lambda p: (p["stem_ms"], p["total_ms"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--tiles", type=int, nargs="+", default=[1024, 2048, 4096, 8192],
                        help="values tried for both constants (powers of two)")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--iters", type=int, default=50)
    add_kernel_bench_arguments(parser, "a tiny CPU run (batch 2, two tile pairs, two shapes, 1 warmup, 2 timed calls) "
                                       "that checks the sweep runs and its result file is written; the PyTorch "
                                       "reference runs (no Triton on a CPU), so its times and ranking mean nothing")
    args = parser.parse_args()
    if any(t < 64 or t & (t - 1) for t in args.tiles):
        parser.error(f"--tiles {args.tiles}: powers of two >= 64")
    shapes = SHAPES
    if args.cpu_smoke:
        args.batch, args.tiles, args.warmup, args.iters, shapes = 2, [64, 128], 1, 2, SHAPES[:2]
    device, meta, copy_gbs = start_gpu_benchmark("tune_se.py", args.cpu_smoke)
    out = kernel_bench_out(args)
    from fasttrain.kernels import se as se_mod

    defaults = (se_mod._GATE_TILE, se_mod._REDUCE_TILE)
    rows = []
    try:
        for gate, reduce in itertools.product(args.tiles, args.tiles):
            se_mod._GATE_TILE, se_mod._REDUCE_TILE = gate, reduce
            for label, channels, size, residual in shapes:
                torch.manual_seed(0)
                x, w, r = make_inputs(args.batch, channels, size, residual, torch.bfloat16, True, device)
                err = forward_backward_error(se_mod, x, w, r)
                _, fwd_bwd_ms = bench_case(se_mod.se_gate, x, w, r, args.warmup, args.iters)
                rows.append({"gate_tile": gate, "reduce_tile": reduce, "default": (gate, reduce) == defaults,
                             "placement": label, "shape": [args.batch, channels, size, size],
                             "residual": residual, "forward_backward_ms": fwd_bwd_ms, "rel_error": err,
                             "correct": err < 1e-2})  # bf16 storage: ~4e-3 expected, NaN fails too
                print(f"  gate {gate} reduce {reduce} {label} {rows[-1]['shape']}: {fwd_bwd_ms:.3f} ms "
                      f"(rel err {err:.1e})", file=sys.stderr)
            save_partial(out, "tune_se", device, {**meta, "rows": rows})
    finally:
        se_mod._GATE_TILE, se_mod._REDUCE_TILE = defaults
    ranked = rank_pairs(rows)
    finish_gpu_benchmark(out, "tune_se", device, {
        **meta, "batch": args.batch, "dtype": "bfloat16", "channels_last": True, "copy_gbs": copy_gbs,
        "defaults": {"gate_tile": defaults[0], "reduce_tile": defaults[1]}, "ranked": ranked, "rows": rows}, (
        f"SE tile sweep, batch {args.batch}, bf16 channels_last, {meta['device']}: fwd+bwd ms, best first "
        f"(stem = the paper's model)",
        ["gate tile", "reduce tile", "stem ms", "all shapes ms", "default"],
        [[p["gate_tile"], p["reduce_tile"], f"{p['stem_ms']:.3f}", f"{p['total_ms']:.3f}", "*" if p["default"] else ""]
         for p in ranked]))


if __name__ == "__main__":
    main()
