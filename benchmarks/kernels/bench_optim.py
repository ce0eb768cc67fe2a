"""Microbenchmark: one Lookahead-SGD step over the paper's 4.7M-parameter network, on a GPU.

Implementations (all: momentum 0.9, Nesterov, weight decay 5e-4, clip by value 0.1, Lookahead k=5,
alpha=0.5; fp32 parameters):
  fused            fasttrain.kernels.lookahead_sgd.FusedLookaheadSGD (one launch per step)
  foreach+python   clip_grad_value_(foreach) + SGD(foreach=True) + a per-tensor Python Lookahead loop
  fused-sgd+lerp   clip_grad_value_(foreach) + SGD(fused=True) inside the trainer's Lookahead wrapper
                   (fasttrain.optim.Lookahead: _foreach_lerp_/_foreach_copy_)
  muon             clip_grad_value_(foreach) + build_optimizer's fasttrain.muon.Muon for optim.name muon
                   (Newton-Schulz on the 27 filter banks at the default muon_lr 0.1 and momentum 0.9;
                   Nesterov SGD on the rest; no Lookahead), banks batched by shape (optim.muon_batching
                   shape). What its step costs beside the others; its GB/s counts the same bytes, though
                   its time is mostly the orthogonalization's small matrix products (21 GFLOPs a step on
                   this network)
  muon-padded      the same with optim.muon_batching padded: every bank in one zero-padded batch (fewer,
                   larger products: 86 GFLOPs a step on this network)

The Muon rows run at each of --muon-ns-steps (default 5, Muon's; optim.muon_ns_steps): a count other than 5
is a row of its own, its impl named with it (muon-ns3, muon-padded-ns3).

Times are per step, averaged over blocks of k steps (so every block holds one Lookahead sync) and
medianed over blocks, two ways: `us / step` includes the host-side launch overhead (each block starts on an
idle GPU: what an eager training loop pays), `GPU us / step` is the GPU's time alone (every launch queued
before the clock starts: what a step replayed as a CUDA graph pays, as train.cuda_graph runs Muon). Each row
also counts one step's ATen calls (views excluded: each of the others is at least one kernel launch on a
GPU, a foreach call one for a list) and its matrix products, on any device; the step counted is the first
of a Lookahead period (no sync), and on a CPU the fused step's count is its PyTorch fallback's. Effective
bandwidth = compulsory bytes / time with compulsory bytes = 4 B x numel x (5 + 3 / k): read p, g, buf
and write p, buf every step, and read slow, write slow and p again on the sync step. It is compared
with the device-to-device copy bandwidth measured here.

    python benchmarks/kernels/bench_optim.py [--blocks 50] [--muon-ns-steps 5 3]
    python benchmarks/kernels/bench_optim.py --cpu-smoke   # seconds on a CPU: every implementation steps
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from statistics import median

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: the shared helpers in common.py
from common import (add_kernel_bench_arguments, finish_gpu_benchmark, kernel_bench_out,  # noqa: E402
                    start_gpu_benchmark, times_ms)

from fasttrain.config import MAX_NS_STEPS, ModelConfig, OptimConfig  # noqa: E402
from fasttrain.kernels.lookahead_sgd import FusedLookaheadSGD  # noqa: E402
from fasttrain.model import build_model  # noqa: E402
from fasttrain.muon import NS_STEPS  # noqa: E402
from fasttrain.optim import Lookahead, build_optimizer  # noqa: E402

K, ALPHA, CLIP = 5, 0.5, 0.1
HYPER = dict(lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True)


def network_parameters(device: torch.device) -> list[torch.Tensor]:
    """Fresh parameters of the paper's network (the default ModelConfig: 4,697,742 in 81 tensors) on
    `device`, channels_last conv weights as trained."""
    model = build_model(ModelConfig()).to(device, memory_format=torch.channels_last)
    return [p.detach().clone().requires_grad_() for p in model.parameters()]


def with_grads(params):
    for p in params:
        p.grad = torch.randn_like(p) * 0.01
    return params


class PythonLookahead:
    """Lookahead as a per-tensor Python loop (the straightforward implementation)."""

    def __init__(self, params):
        self.params, self.slow, self.t = params, [p.detach().clone() for p in params], 0

    @torch.no_grad()
    def after_step(self):
        self.t += 1
        if self.t % K == 0:
            for slow, p in zip(self.slow, self.params):
                slow.add_(p - slow, alpha=ALPHA)
                p.copy_(slow)


class CallCounter(TorchDispatchMode):
    """Counts the ATen calls made under it that are not views (a view launches nothing), and the matrix
    products among them."""
    MATMULS = (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm, torch.ops.aten.baddbmm)

    def __init__(self):
        super().__init__()
        self.calls = self.matmuls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:
            self.calls += 1
            self.matmuls += func.overloadpacket in self.MATMULS
        return func(*args, **(kwargs or {}))


def count_calls(step) -> tuple[int, int]:
    """(ATen calls, matrix products) of one call of `step` (after the timing: it moves the parameters)."""
    with CallCounter() as counter:
        step()
    return counter.calls, counter.matmuls


def benchmark_rows(impls: list[str], ns_counts: list[int]) -> list[tuple[str, str, int | None]]:
    """(row name, impl, Newton-Schulz iterations or None) for each row: a Muon impl once per count, named
    with it where the count is not Muon's 5 (muon-ns3); the SGD impls once."""
    return [(impl if n in (None, NS_STEPS) else f"{impl}-ns{n}", impl, n) for impl in impls
            for n in (ns_counts if impl.startswith("muon") else [None])]


def make_step(impl: str, params, ns_steps: int = NS_STEPS):
    """A zero-argument callable doing one optimizer step of `impl` on `params` (Muon's: `ns_steps` Newton-Schulz
    iterations)."""
    if impl == "fused":
        opt = FusedLookaheadSGD(params, **HYPER, clip_value=CLIP, lookahead_k=K, lookahead_alpha=ALPHA)
        return opt.step
    if impl == "fused-sgd+lerp":  # the trainer's Lookahead wrapper (fasttrain.optim), around the fused SGD
        opt = Lookahead(torch.optim.SGD(params, **HYPER, fused=True), K, ALPHA)
        after_step = None
    elif impl in ("muon", "muon-padded"):  # what the trainer builds for optim.name muon (default muon_lr, momentum)
        batching = "padded" if impl == "muon-padded" else "shape"
        opt = build_optimizer(params, OptimConfig(name="muon", lookahead_k=0, muon_batching=batching,
                                                  muon_ns_steps=ns_steps, **HYPER))
        after_step = None
    else:
        opt, after_step = torch.optim.SGD(params, **HYPER, foreach=True), PythonLookahead(params).after_step

    def step():
        torch.nn.utils.clip_grad_value_(params, CLIP, foreach=True)
        opt.step()
        if after_step is not None:
            after_step()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    impls = ["fused", "foreach+python", "fused-sgd+lerp", "muon", "muon-padded"]
    parser.add_argument("--impls", nargs="+", default=impls, choices=impls)
    parser.add_argument("--blocks", type=int, default=50, help="timed blocks of k steps")
    parser.add_argument("--muon-ns-steps", type=int, nargs="+", default=[NS_STEPS], metavar="N",
                        help="Newton-Schulz iterations of the Muon rows (optim.muon_ns_steps), a row for each")
    add_kernel_bench_arguments(parser, "a tiny CPU run (1 block, no warmup) that checks every implementation "
                                       "steps and the result file is written; its times mean nothing (the fused one "
                                       "takes its PyTorch path on a CPU)")
    args = parser.parse_args()
    if any(not 1 <= n <= MAX_NS_STEPS for n in args.muon_ns_steps):
        parser.error(f"--muon-ns-steps: each count must be 1..{MAX_NS_STEPS}, as optim.muon_ns_steps")
    if args.cpu_smoke:  # Muon padded is ~2 s a step on 2 CPU cores: 11 steps an implementation, not 31
        args.blocks = 1
    device, meta, copy_gbs = start_gpu_benchmark("bench_optim.py", args.cpu_smoke)
    out = kernel_bench_out(args)
    rows = []
    for name, impl, ns_steps in benchmark_rows(args.impls, args.muon_ns_steps):
        params = network_parameters(device)
        numel = sum(p.numel() for p in with_grads(params))
        step = make_step(impl, params, ns_steps or NS_STEPS)

        def block():
            for _ in range(K):
                step()

        warmup = 0 if args.cpu_smoke else 4
        ms = median(times_ms(device, block, warmup=warmup, iters=args.blocks, include_host=True)) / K
        gpu_ms = median(times_ms(device, block, warmup=warmup, iters=args.blocks)) / K
        gbs = 4 * numel * (5 + 3 / K) / (ms * 1e-3) / 1e9
        calls, matmuls = count_calls(step)
        rows.append({"impl": name, "ns_steps": ns_steps, "params": numel, "tensors": len(params), "step_ms": ms, "gpu_step_ms": gpu_ms,
                     "gbs": gbs, "pct_copy": 100 * gbs / copy_gbs, "aten_calls": calls, "matmuls": matmuls,
                     "param_source": "fasttrain.model"})
        print(f"  {name}: {ms * 1e3:.1f} us/step, GPU alone {gpu_ms * 1e3:.1f}, {calls} ATen calls", file=sys.stderr)

    finish_gpu_benchmark(out, "bench_optim", device, {
        **meta, "copy_gbs": copy_gbs, "k": K, "clip_value": CLIP, **HYPER,
        "bandwidth_definition": "4 B x numel x (5 + 3/k) per step / median step time", "rows": rows}, (
        f"Lookahead-SGD step, {rows[0]['params']:,} fp32 parameters in {rows[0]['tensors']} tensors, "
        f"{meta['device']} (copy {copy_gbs:,.0f} GB/s)",
        ["impl", "us / step", "GPU us / step", "GB/s", "% copy", "ATen calls", "matmuls"],
        [[r["impl"], r["step_ms"] * 1e3, r["gpu_step_ms"] * 1e3, r["gbs"], r["pct_copy"], r["aten_calls"],
          r["matmuls"]] for r in rows]))


if __name__ == "__main__":
    main()
