"""Microbenchmark: one Lookahead-SGD step over the paper's 4.7M-parameter network, on a GPU.

Implementations (all: momentum 0.9, Nesterov, weight decay 5e-4, clip by value 0.1, Lookahead k=5,
alpha=0.5; fp32 parameters):
  fused            fasttrain.kernels.lookahead_sgd.FusedLookaheadSGD (one launch per step)
  foreach+python   clip_grad_value_(foreach) + SGD(foreach=True) + a per-tensor Python Lookahead loop
  fused-sgd+lerp   clip_grad_value_(foreach) + SGD(fused=True) + _foreach_lerp_/_foreach_copy_ Lookahead

Times are per step, averaged over blocks of k steps (so every block holds one Lookahead sync) and
medianed over blocks; they include the host-side launch overhead (each block starts on an idle GPU). Effective
bandwidth = compulsory bytes / time with compulsory bytes = 4 B x numel x (5 + 3 / k): read p, g, buf
and write p, buf every step, and read slow, write slow and p again on the sync step. It is compared
with the device-to-device copy bandwidth measured here.

    python benchmarks/kernels/bench_optim.py [--blocks 50]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from statistics import median

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: the shared helpers in common.py
from common import RESULTS_DIR, cuda_times_ms, finish_gpu_benchmark, start_gpu_benchmark  # noqa: E402

K, ALPHA, CLIP = 5, 0.5, 0.1
HYPER = dict(lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True)
# The paper's model (fasttrain.model with the default ModelConfig), should the import fail:
# {shape: count}, 4,697,742 parameters in 81 tensors.
FALLBACK_SHAPES = {
    (64,): 19, (128,): 18, (256,): 14, (64, 64, 3, 3): 8, (128, 128, 3, 3): 7, (256, 256, 3, 3): 5,
    (64, 3, 3, 3): 1, (4, 64, 1, 1): 1, (4,): 1, (64, 4, 1, 1): 1, (128, 64, 3, 3): 1, (128, 64, 1, 1): 1,
    (256, 128, 3, 3): 1, (256, 128, 1, 1): 1, (10, 256): 1, (10,): 1,
}


def network_parameters() -> tuple[list[torch.Tensor], str]:
    """Fresh CUDA parameters shaped like the network's (channels_last conv weights, as trained)."""
    try:
        from fasttrain.config import ModelConfig
        from fasttrain.model import build_model

        model = build_model(ModelConfig()).cuda().to(memory_format=torch.channels_last)
        return [p.detach().clone().requires_grad_() for p in model.parameters()], "fasttrain.model"
    except Exception as e:  # the model module may not exist yet on a branch: same shapes, by hand
        print(f"build_model unavailable ({e!r}): using the built-in shape list", file=sys.stderr)
        shapes = [s for s, n in FALLBACK_SHAPES.items() for _ in range(n)]
        return [torch.randn(s, device="cuda").requires_grad_() for s in shapes], "fallback shape list"


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


class ForeachLookahead(PythonLookahead):
    @torch.no_grad()
    def after_step(self):
        self.t += 1
        if self.t % K == 0:
            torch._foreach_lerp_(self.slow, self.params, ALPHA)
            torch._foreach_copy_(self.params, self.slow)


def make_step(impl: str, params):
    """A zero-argument callable doing one optimizer step of `impl` on `params`."""
    if impl == "fused":
        from fasttrain.kernels.lookahead_sgd import FusedLookaheadSGD

        opt = FusedLookaheadSGD(params, **HYPER, clip_value=CLIP, lookahead_k=K, lookahead_alpha=ALPHA)
        return opt.step
    sgd = torch.optim.SGD(params, **HYPER, **({"foreach": True} if impl == "foreach+python" else {"fused": True}))
    lookahead = (PythonLookahead if impl == "foreach+python" else ForeachLookahead)(params)

    def step():
        torch.nn.utils.clip_grad_value_(params, CLIP, foreach=True)
        sgd.step()
        lookahead.after_step()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--impls", nargs="+", default=["fused", "foreach+python", "fused-sgd+lerp"],
                        choices=["fused", "foreach+python", "fused-sgd+lerp"])
    parser.add_argument("--blocks", type=int, default=50, help="timed blocks of k steps")
    parser.add_argument("--out", default=str(RESULTS_DIR), help="folder for the JSON results")
    args = parser.parse_args()
    device, meta, copy_gbs = start_gpu_benchmark("bench_optim.py")
    rows = []
    for impl in args.impls:
        params, source = network_parameters()
        numel = sum(p.numel() for p in with_grads(params))
        step = make_step(impl, params)

        def block():
            for _ in range(K):
                step()

        ms = median(cuda_times_ms(block, warmup=4, iters=args.blocks, include_host=True)) / K
        gbs = 4 * numel * (5 + 3 / K) / (ms * 1e-3) / 1e9
        rows.append({"impl": impl, "params": numel, "tensors": len(params), "step_ms": ms, "gbs": gbs,
                     "pct_copy": 100 * gbs / copy_gbs, "param_source": source})
        print(f"  {impl}: {ms * 1e3:.1f} us/step", file=sys.stderr)

    finish_gpu_benchmark(args.out, "bench_optim", device, {
        **meta, "copy_gbs": copy_gbs, "k": K, "clip_value": CLIP, **HYPER,
        "bandwidth_definition": "4 B x numel x (5 + 3/k) per step / median step time", "rows": rows}, (
        f"Lookahead-SGD step, {rows[0]['params']:,} fp32 parameters in {rows[0]['tensors']} tensors, "
        f"{meta['device']} (copy {copy_gbs:,.0f} GB/s)",
        ["impl", "us / step", "GB/s", "% copy"],
        [[r["impl"], r["step_ms"] * 1e3, r["gbs"], r["pct_copy"]] for r in rows]))


if __name__ == "__main__":
    main()
