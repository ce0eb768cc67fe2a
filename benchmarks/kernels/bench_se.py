"""Microbenchmark: the fused SE gate (Triton) vs PyTorch, forward and forward+backward, on a GPU.

Shapes are the network's: SE after the stem on [B, 64, 32, 32] (no residual; the paper's model) and
the SE-ResNet block placement (gate fused with the residual add and ReLU) on [B, 64, 32, 32],
[B, 128, 16, 16], [B, 256, 8, 8]; r = 16, B in {128, 512}, bf16 activations with fp32 SE weights
(autocast training), channels_last unless --nchw.

Implementations:
  triton          fasttrain.kernels.se.se_gate (the fused custom op)
  eager-ref       se_gate_reference (fp32 math, the tests' reference)
  compiled-ref    torch.compile(se_gate_reference)
  eager-module    the model's torch path (SqueezeExcite.forward: 1x1 convs in the activation dtype)
  compiled-module torch.compile of it

Effective bandwidth = compulsory bytes / time, where compulsory bytes count each large tensor once per
pass (forward: x, residual, y; backward: dy, x again, dx, and with the residual the y read for the ReLU
mask and dresidual), and is
reported as a percentage of the device-to-device copy bandwidth measured here.

    python benchmarks/kernels/bench_se.py [--batch-sizes 128 512] [--impls triton eager-ref ...]
    python benchmarks/kernels/bench_se.py --cpu-smoke   # seconds on a CPU: every implementation runs once
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from statistics import median

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: the shared helpers in common.py
from common import (add_kernel_bench_arguments, finish_gpu_benchmark, kernel_bench_out,  # noqa: E402
                    save_partial, start_gpu_benchmark, times_ms)

# (label, channels, size, fused residual)
SHAPES = [("stem", 64, 32, False), ("block", 64, 32, True), ("block", 128, 16, True), ("block", 256, 8, True)]
IMPLS = ["triton", "eager-ref", "compiled-ref", "eager-module", "compiled-module"]


def se_module_math(x, w1, b1, w2, b2, residual=None):
    """fasttrain.model.SqueezeExcite's torch path, in the activation dtype as autocast runs it."""
    w1, b1, w2, b2 = (t.to(x.dtype) for t in (w1, b1, w2, b2))
    scale = torch.sigmoid(F.conv2d(F.relu(F.conv2d(x.mean((2, 3), keepdim=True), w1, b1)), w2, b2))
    out = x * scale
    return out if residual is None else F.relu(out + residual)


def implementation(name: str, backend: str = "inductor"):
    """A fresh callable per (shape, batch) case: the compiled ones are static-shape graphs, as training
    compiles them (one torch.compile reused across shapes would go dynamic, then hit the recompile limit).
    A --cpu-smoke run compiles with aot_eager: the same capture in seconds, no C++ build."""
    from fasttrain.kernels.se import se_gate, se_gate_reference

    def compiled(fn):
        return torch.compile(fn, fullgraph=True, dynamic=False, backend=backend)

    return {
        "triton": lambda: se_gate,
        "eager-ref": lambda: se_gate_reference,
        "compiled-ref": lambda: compiled(se_gate_reference),
        "eager-module": lambda: se_module_math,
        "compiled-module": lambda: compiled(se_module_math),
    }[name]()


def make_inputs(batch, channels, size, residual, dtype, channels_last, device):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    shape = (batch, channels, size, size)
    x = torch.randn(shape, device=device, dtype=dtype).to(memory_format=fmt).requires_grad_()
    r = torch.randn(shape, device=device, dtype=dtype).to(memory_format=fmt).requires_grad_() if residual else None
    cr = channels // 16
    w = [torch.randn(cr, channels, 1, 1, device=device) * 0.1, torch.zeros(cr, device=device),
         torch.randn(channels, cr, 1, 1, device=device) * 0.1, torch.zeros(channels, device=device)]
    return x, [t.requires_grad_() for t in w], r


def bench_case(fn, x, w, r, warmup, iters):
    """(forward ms, forward+backward ms), medians."""
    dy = torch.randn_like(x)

    def forward():
        with torch.no_grad():
            fn(x, *w, residual=r)

    inputs = [x, *w] + ([r] if r is not None else [])

    def forward_backward():  # autograd.grad: no accumulation into .grad, only the op's own work
        torch.autograd.grad(fn(x, *w, residual=r), inputs, dy)

    return (median(times_ms(x.device, forward, warmup, iters)),
            median(times_ms(x.device, forward_backward, warmup, iters)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--impls", nargs="+", default=IMPLS, choices=IMPLS)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--nchw", action="store_true", help="NCHW activations instead of channels_last")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--iters", type=int, default=100)
    add_kernel_bench_arguments(parser, "a tiny CPU run (batch 2, two shapes, 1 warmup, 2 timed calls) that checks "
                                       "every implementation runs and the result file is written; its times mean "
                                       "nothing")
    args = parser.parse_args()
    if args.cpu_smoke:
        args.batch_sizes, args.warmup, args.iters = [2], 1, 2
    device, meta, copy_gbs = start_gpu_benchmark("bench_se.py", args.cpu_smoke)
    out = kernel_bench_out(args)
    dtype = getattr(torch, args.dtype)
    rows = []
    for batch in args.batch_sizes:
        for label, channels, size, residual in SHAPES[:2] if args.cpu_smoke else SHAPES:
            torch._dynamo.reset()  # each case compiles its own static graphs (see implementation)
            fns = {name: implementation(name, "aot_eager" if args.cpu_smoke else "inductor") for name in args.impls}
            x, w, r = make_inputs(batch, channels, size, residual, dtype, not args.nchw, device)
            tensor_bytes = x.numel() * x.element_size()
            fwd_bytes = tensor_bytes * (3 if residual else 2)
            bwd_bytes = fwd_bytes + tensor_bytes * (5 if residual else 3)  # dy, x, dx (+ y, dres)
            for name, fn in fns.items():
                fwd_ms, fwd_bwd_ms = bench_case(fn, x, w, r, args.warmup, args.iters)
                gbs = (fwd_bytes / (fwd_ms * 1e-3) / 1e9, bwd_bytes / (fwd_bwd_ms * 1e-3) / 1e9)
                rows.append({
                    "placement": label, "shape": [batch, channels, size, size], "residual": residual,
                    "impl": name, "forward_ms": fwd_ms, "forward_backward_ms": fwd_bwd_ms,
                    "forward_gbs": gbs[0], "forward_backward_gbs": gbs[1],
                    "forward_pct_copy": 100 * gbs[0] / copy_gbs,
                    "forward_backward_pct_copy": 100 * gbs[1] / copy_gbs,
                })
                print(f"  {label} {rows[-1]['shape']} {name}: {fwd_ms:.3f} / {fwd_bwd_ms:.3f} ms", file=sys.stderr)
            save_partial(out, "bench_se", device, {**meta, "rows": rows})

    finish_gpu_benchmark(out, "bench_se", device, {
        **meta, "dtype": args.dtype, "channels_last": not args.nchw, "copy_gbs": copy_gbs,
        "bandwidth_definition": "compulsory bytes (each large tensor once) / median time", "rows": rows}, (
        f"SE gate, {args.dtype}, {'NCHW' if args.nchw else 'channels_last'}, {meta['device']} "
        f"(copy {copy_gbs:,.0f} GB/s)",
        ["placement", "shape", "impl", "fwd ms", "fwd+bwd ms", "fwd % copy", "fwd+bwd % copy"],
        [[r["placement"], "x".join(map(str, r["shape"])), r["impl"], r["forward_ms"], r["forward_backward_ms"],
          r["forward_pct_copy"], r["forward_backward_pct_copy"]] for r in rows]))


if __name__ == "__main__":
    main()
