"""Data-loader throughput: the DALI GPU pipeline vs the GPU-resident torch path vs the paper's way.

    python benchmarks/bench_loader.py                  # on a CUDA machine (refuses without one)
    python benchmarks/bench_loader.py --cpu-smoke      # a tiny CPU run that exercises every path

Three training loaders over the same uint8 CIFAR-shaped arrays (synthetic by default: throughput
does not depend on pixel values; `--data DIR` reads real CIFAR-10), each with pad-4 crop, flip,
normalise:
  * ``dali``        `fasttrain.data.dali.DaliLoader` (ops on the GPU; dataset resident in device
                    memory, a DALI sample an image, graph="samples", plus ``dali-host``: the same with
                    the dataset in host memory, copied per batch, and ``dali-seq``: device memory, the
                    batch as one DALI sample, graph="sequence" (data.dali_graph's default, the fastest
                    measured), and ``dali-slice``: device memory, fn.slice at integer starts,
                    graph="slice"; each row names its graph, so rows compare across sessions),
  * ``torch``       `fasttrain.data.loader_torch.TorchLoader` (GPU-resident, batched tensor ops),
  * ``torchvision`` the paper's pipeline: a map-style Dataset of PIL images with RandomCrop(32, 4),
                    RandomHorizontalFlip, ToTensor, Normalize in CPU worker processes, pinned
                    batches copied to the GPU (what `datasets.CIFAR10` + `DataLoader` do).

Two measurements per loader:
  * alone: whole epochs, images/s from CUDA events around them (after a warm-up epoch); each
    batch is left on the GPU as the trainer would get it, and the end event waits on all of it.
  * in a training step of the seed network (configs/seed.yaml's model and optimizer, bf16
    autocast, channels_last, the trainer's step) -- the number that matters -- next to the same
    step on one pre-made batch (no loader), so the loader's cost shows as the gap.

Prints a table last and writes JSON to benchmarks/results/loader-<device>.json (device name,
versions, git sha, command). The target: the DALI pipeline alone above 200,000 images/s on an
H100.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import sys
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

BENCHMARKS = str(Path(__file__).resolve().parent)
if BENCHMARKS not in sys.path:  # imported by file path (the tests): common.py sits next to this file
    sys.path.insert(0, BENCHMARKS)
from common import (REPO_ROOT, RESULTS_DIR, PaperLoader, Timer, check_out, device_slug, endless,  # noqa: E402
                    print_table, require_cuda, run_main, run_metadata, write_json)

from fasttrain.config import DataConfig  # noqa: E402

TARGET_IMAGES_PER_S = 200_000
LOADERS = ("dali", "dali-seq", "dali-slice", "dali-host", "torch", "torchvision")
DALI_GRAPH_ROWS = ("dali", "dali-seq", "dali-slice")  # device-resident, one row per data.dali_graph
MEAN, STD = DataConfig().mean, DataConfig().std  # the paper's normalization, the config default


# --------------------------------------------------------------------------------------------
# The measurements
# --------------------------------------------------------------------------------------------
def bench_alone(loader, epochs: int, device: torch.device) -> dict:
    """Images/s over `epochs` whole epochs, after one warm-up epoch."""
    loader.set_epoch(0)
    for _ in loader:  # warm-up: pipeline build, allocator, worker start
        pass
    count = 0
    with Timer(device) as timer:
        for epoch in range(1, epochs + 1):
            loader.set_epoch(epoch)
            for images, labels in loader:
                count += labels.shape[0]
    return {"images": count, "seconds": timer.seconds, "images_per_s": count / timer.seconds}


def make_train_step(model_cfg, optim_cfg, device: torch.device, autocast_dtype):
    """The trainer's step on the seed network: bf16 autocast forward, CE loss, backward,
    clip, optimizer (Lookahead-SGD per the config)."""
    import torch.nn.functional as F

    from fasttrain.model import build_model
    from fasttrain.optim import build_optimizer, clip_gradients

    model = build_model(model_cfg).to(device).to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model.parameters(), optim_cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    autocast = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None
                else torch.autocast(device.type, enabled=False))

    def step(images: torch.Tensor, labels: torch.Tensor) -> None:
        with autocast:
            loss = F.cross_entropy(model(images).float(), labels,
                                   label_smoothing=optim_cfg.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        clip_gradients(params, optim_cfg, optimizer)
        optimizer.step()

    return step


def bench_train(step, batches: Iterator, steps: int, warmup: int, device: torch.device) -> dict:
    """Images/s of `steps` training steps fed by the endless iterator `batches`, after `warmup` steps."""
    for _ in range(warmup):
        step(*next(batches))
    count = 0
    with Timer(device) as timer:
        for _ in range(steps):
            images, labels = next(batches)
            step(images, labels)
            count += labels.shape[0]
    return {"images": count, "seconds": timer.seconds, "images_per_s": count / timer.seconds}


# --------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------
def print_results(rows: list[dict]) -> None:
    print_table("Loader throughput", ["loader", "mode", "images/s", "images", "seconds", "note"],
                [[r["loader"], r["mode"],
                  f"{r['images_per_s']:,.0f}" if "images_per_s" in r else "-",
                  r.get("images", 0), f"{r.get('seconds', 0.0):.3f}", r.get("note", "")]
                 for r in rows])


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------
def load_arrays(args) -> tuple[np.ndarray, np.ndarray, str]:
    if args.data:
        from fasttrain.data.cifar import load_cifar10

        arrays = load_cifar10(args.data, download=False)
        x, y, what = arrays.train_x, arrays.train_y, arrays.source
    else:
        rng = np.random.default_rng(0)
        x = rng.integers(0, 256, size=(args.images, 32, 32, 3), dtype=np.uint8)
        y = rng.integers(0, 10, size=args.images).astype(np.int64)
        what = f"synthetic uint8 [{args.images}, 32, 32, 3]"
    if args.images and len(x) > args.images:
        x, y = x[:args.images], y[:args.images]
    return x, y, what


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu-smoke", action="store_true",
                   help="tiny run on the CPU (exercises every path; numbers meaningless)")
    p.add_argument("--data", default=None, help="CIFAR-10 folder (default: synthetic images)")
    p.add_argument("--images", type=int, default=None,
                   help="training images (default 50000; 512 with --cpu-smoke)")
    p.add_argument("--batch-size", type=int, default=None, help="default 512 (64 for smoke)")
    p.add_argument("--epochs", type=int, default=None, help="timed epochs alone (default 5)")
    p.add_argument("--steps", type=int, default=None, help="timed training steps (default 100)")
    p.add_argument("--workers", type=int, default=None,
                   help="torchvision DataLoader workers (default min(8, cores); 0 for smoke)")
    p.add_argument("--config", default=str(REPO_ROOT / "configs" / "seed.yaml"))
    p.add_argument("--loaders", default=",".join(LOADERS), help=f"comma-separated subset of {', '.join(LOADERS)}")
    p.add_argument("--no-train", action="store_true", help="skip the training-step measurement")
    p.add_argument("--dali-prefetch", type=int, default=2,
                   help="DALI's prefetch_queue_depth (DaliLoader's default: 2)")
    p.add_argument("--dali-threads", type=int, default=None,
                   help="DALI's CPU threads (DaliLoader's default: min(4, cores))")
    p.add_argument("--out", default=None,
                   help="JSON path (default benchmarks/results/loader-<device>.json)")
    args = p.parse_args(argv)
    smoke = args.cpu_smoke
    defaults = dict(images=512 if smoke else 50_000, batch_size=64 if smoke else 512,
                    epochs=1 if smoke else 5, steps=3 if smoke else 100,
                    workers=0 if smoke else min(8, os.cpu_count() or 1))
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.dali_prefetch < 1 or (args.dali_threads is not None and args.dali_threads < 1):
        p.error("--dali-prefetch and --dali-threads must be >= 1")
    if args.images < (0 if args.data else 1):
        p.error("--images must be >= 1 (with --data, 0 takes all of it)")
    for key in ("batch_size", "epochs", "steps"):
        if getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')} must be >= 1")
    unknown = sorted({name.strip() for name in args.loaders.split(",") if name.strip()} - set(LOADERS))
    if unknown:
        p.error(f"--loaders: unknown loader(s) {', '.join(unknown)}; the loaders are {', '.join(LOADERS)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.cpu_smoke:
        device = torch.device("cpu")
    else:
        try:
            require_cuda("bench_loader", "it measures GPU data paths; run it on the GPU machine, or "
                         "pass --cpu-smoke for a tiny CPU run that only checks it works")
        except SystemExit as refused:
            return refused.code
        device = torch.device("cuda", torch.cuda.current_device())

    from fasttrain.config import load_config
    from fasttrain.data.dali import DaliLoader, dali_available
    from fasttrain.data.loader_torch import TorchLoader

    cfg = None if args.no_train else load_config(args.config)  # a bad config before any measuring
    check_out(Path(args.out) if args.out else None)
    x, y, data_what = load_arrays(args)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    common = dict(batch_size=args.batch_size, train=True, device=device, dtype=dtype, mean=MEAN,
                  std=STD, channels_last=True, crop_padding=4, flip=True, seed=0)
    wanted = [name.strip() for name in args.loaders.split(",") if name.strip()]

    dali_opts = dict(prefetch=args.dali_prefetch, num_threads=args.dali_threads)
    factories = {
        "dali": lambda: DaliLoader(x, y, residency="device", graph="samples", **dali_opts, **common),
        "dali-seq": lambda: DaliLoader(x, y, residency="device", graph="sequence", **dali_opts, **common),
        "dali-slice": lambda: DaliLoader(x, y, residency="device", graph="slice", **dali_opts, **common),
        # on the CPU both residencies are the host one: measure it once
        "dali-host": (lambda: DaliLoader(x, y, residency="host", graph="samples", **dali_opts, **common))
        if device.type == "cuda" else None,
        "torch": lambda: TorchLoader(x, y, **common),
        "torchvision": lambda: PaperLoader(x, y, batch_size=args.batch_size, device=device, mean=MEAN, std=STD,
                                           channels_last=True, workers=args.workers, seed=0),
    }
    rows: list[dict] = []
    loaders = {}
    for name in wanted:
        if factories[name] is None:
            continue
        if name.startswith("dali") and not dali_available():
            rows.append({"loader": name, "mode": "alone", "note": "skipped: DALI not installed"})
            continue
        try:
            loader = factories[name]()
            result = bench_alone(loader, args.epochs, device)
        except Exception as e:  # one loader failing on this machine (a DALI operator, say) loses no other row
            detail = (str(e).strip().splitlines() or [""])[0][:200]
            rows.append({"loader": name, "mode": "alone", "note": f"failed: {type(e).__name__}: {detail}"})
            print(f"{name:<12} alone  failed: {type(e).__name__}: {detail}", file=sys.stderr, flush=True)
            continue
        loaders[name] = loader
        rows.append({"loader": name, "mode": "alone", **result})
        print(f"{name:<12} alone  {result['images_per_s']:>12,.0f} images/s", flush=True)

    if cfg is not None:
        model_cfg = cfg.model
        if args.cpu_smoke:  # the seed network's shape, shrunk so a CPU step takes milliseconds
            model_cfg = dataclasses.replace(model_cfg, base_channels=8, blocks=[1] * model_cfg.layers)
        autocast_dtype = torch.bfloat16 if device.type == "cuda" else None
        warmup = 1 if args.cpu_smoke else 20
        # the reference: the same step on one resident batch, no loader at all
        torch.manual_seed(0)
        step = make_train_step(model_cfg, cfg.optim, device, autocast_dtype)
        images = torch.randn(args.batch_size, 3, 32, 32, device=device, dtype=dtype)
        images = images.to(memory_format=torch.channels_last)
        labels = torch.randint(0, 10, (args.batch_size,), device=device)
        result = bench_train(step, itertools.repeat((images, labels)), args.steps, warmup,
                             device)
        rows.append({"loader": "none", "mode": "train-step", **result,
                     "note": "one resident batch: the step alone"})
        print(f"{'none':<12} train  {result['images_per_s']:>12,.0f} images/s", flush=True)
        for name, loader in loaders.items():
            torch.manual_seed(0)
            step = make_train_step(model_cfg, cfg.optim, device, autocast_dtype)
            result = bench_train(step, endless(loader), args.steps, warmup, device)
            rows.append({"loader": name, "mode": "train-step", **result})
            print(f"{name:<12} train  {result['images_per_s']:>12,.0f} images/s", flush=True)

    # the target's figure: the fastest DALI graph alone, device-resident (the one data.dali_graph would then name)
    best = max((r for r in rows
                if r["loader"] in DALI_GRAPH_ROWS and r["mode"] == "alone" and "images_per_s" in r),
               key=lambda r: r["images_per_s"], default=None)
    dali_alone = None if best is None else best["images_per_s"]
    meta = run_metadata(device, flat=True,
                        argv=None if argv is None else [os.path.relpath(__file__), *argv])
    report = {
        "benchmark": "loader",
        **meta,
        "cpu_smoke": args.cpu_smoke,
        "data": data_what,
        "batch_size": args.batch_size,
        "dali_prefetch": args.dali_prefetch, "dali_threads": args.dali_threads,
        "dtype": str(dtype),
        "torchvision_workers": args.workers,
        "results": rows,
        "target": {"dali_alone_images_per_s": TARGET_IMAGES_PER_S,
                   "measured": dali_alone, "loader": None if best is None else best["loader"],
                   "met": None if dali_alone is None or args.cpu_smoke
                   else dali_alone >= TARGET_IMAGES_PER_S},
    }
    out = write_json(Path(args.out) if args.out else RESULTS_DIR / f"loader-{device_slug(device)}.json",
                     report)

    print(f"wrote {out}")
    if dali_alone is not None and not args.cpu_smoke:
        verdict = "met" if dali_alone >= TARGET_IMAGES_PER_S else "NOT met"
        print(f"target: DALI alone > {TARGET_IMAGES_PER_S:,} images/s: {verdict} ({best['loader']}, the faster graph)")
    print()
    print(f"{meta['device']}; {data_what}; batch {args.batch_size}; {dtype}; torch {meta['torch']}, "
          f"DALI {meta['dali']}")
    print_results(rows)  # last, as every script's table: what a terminal or a log ends with
    return 0


if __name__ == "__main__":
    run_main(main)
