"""Training throughput ablation: from the paper's training loop to fasttrain's, one change at a time.

    python benchmarks/throughput.py [--device auto] [--batch-sizes 128 512 1024] [--steps 100]
        [--out benchmarks/results/NAME.json] [--section.key VALUE ...]
    python benchmarks/throughput.py --device cpu --smoke        # seconds on a CPU: the tests use it

Every row trains the same network (configs/seed.yaml's model and optimizer; --smoke: configs/smoke.yaml)
in the same process, so the ratios between rows are trustworthy:

  1 the paper's way: fp32, NCHW, eager, torchvision DataLoader with CPU workers (PIL images through
    RandomCrop(32, 4) + RandomHorizontalFlip + ToTensor + Normalize), batch 128, torch SGD + Lookahead
  2 + GPU-resident data (fasttrain.data.TorchLoader)      5 + torch.compile
  3 + bf16 autocast                                       6 + Triton SE (model.se_impl triton)
  4 + channels_last                                       7 + fused Lookahead-SGD (optim.impl fused)
  8 DALI instead of the torch GPU data path
  9 step 7 with the whole step as one CUDA graph (train.cuda_graph; fasttrain/graph.py)
 10 step 7 with torch.compile mode reduce-overhead (torch's own CUDA graphs of forward and backward)
 11 step 9 with torch.compile mode max-autotune-no-cudagraphs (inductor's autotuning)
 12 step 9 with Muon on the filters instead of Lookahead-SGD (optim.name muon, optim.muon_batching shape;
    Nesterov SGD on the rest, no Lookahead: best.yaml's optimizer, here on the paper's network)
 13 step 12 with optim.muon_batching padded (every filter bank in one Newton-Schulz batch)
then steps 7, 8, 9, 11, 12 and 13 again at each larger --batch-sizes. Rows 12 and 13 are no step of the
paper's recipe: they say what Muon's step costs inside a training step, and which batching is faster.

Each row is a fasttrain Trainer built from the config with that row's settings; the timed step is the
trainer's own training step (forward, loss, backward, clipping, optimizer, schedule). A row is warmed
up first (torch.compile, cuDNN autotuning, DataLoader workers), then `--repeats` windows of `--steps`
steps are timed (CUDA events on a GPU, synchronize + perf_counter on a CPU) and the median is reported.
A feature that cannot be imported (Triton SE, fused optimizer, DALI) makes its row "skipped" with the
reason, and later rows are measured without it (their note says so).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import statistics
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from common import (REPO_ROOT, bf16_peak_tflops, check_out, default_result_path, endless, matmul_tflops, PaperLoader,
                    parse_known_overrides, release_memory, run_main, run_metadata, Timer, wide_console,
                    write_complete, write_json)
from rich.table import Table

import fasttrain.data
from fasttrain.config import ConfigError, config_to_dict, load_config, validate
from fasttrain.console import RunConsole
from fasttrain.data import resolve_data_dir
from fasttrain.model import build_model, count_params, forward_flops
from fasttrain.runtime import device_name, resolve_device, synchronize
from fasttrain.trainer import Trainer

TRAIN_FLOPS_PER_FORWARD = 3  # forward + backward (grad wrt activations and wrt weights): the usual 3x

# Every row's Trainer reads the same CIFAR-10 files (about a second each time, off the clock): read them
# once per process. build_data looks the reader up in fasttrain.data, so that is where it is cached.
fasttrain.data.load_cifar10 = functools.lru_cache(maxsize=2)(fasttrain.data.load_cifar10)


# ------------------------------------------------------------------------------------- the rows
@dataclass(frozen=True)
class Knobs:
    data: str = "workers"        # workers (torchvision DataLoader) | torch (TorchLoader) | dali
    precision: str = "fp32"
    channels_last: bool = False
    compile: bool = False
    se_impl: str = "torch"
    optim_impl: str = "torch"
    batch_size: int = 128
    cuda_graph: bool = False     # train.cuda_graph: the whole step as one CUDA graph
    compile_mode: str = "default"
    muon: str | None = None      # None: the config's optimizer | shape | padded: Muon (optim.muon_batching)


@dataclass(frozen=True)
class Variant:
    step: str
    name: str
    adds: str | None             # the optional feature this row is about (skipped when unavailable)
    knobs: Knobs


# which optional feature a knob value needs, and the value that does without it
FEATURES = {
    "compile": ("compile", True, False),
    "triton_se": ("se_impl", "triton", "torch"),
    "fused": ("optim_impl", "fused", "torch"),
    "dali": ("data", "dali", "torch"),
    "cuda_graph": ("cuda_graph", True, False),
}


def ablation(batch: int, batch_sizes: list[int]) -> list[Variant]:
    knobs = Knobs(batch_size=batch)
    rows = [Variant("1", "paper: fp32, NCHW, eager, DataLoader workers", None, knobs)]
    for step, name, adds, change in (
        ("2", "+ GPU-resident data (TorchLoader)", None, {"data": "torch"}),
        ("3", "+ bf16 autocast", None, {"precision": "bf16"}),
        ("4", "+ channels_last", None, {"channels_last": True}),
        ("5", "+ torch.compile", "compile", {"compile": True}),
        ("6", "+ Triton SE", "triton_se", {"se_impl": "triton"}),
        ("7", "+ fused Lookahead-SGD", "fused", {"optim_impl": "fused"}),
    ):
        knobs = replace(knobs, **change)
        rows.append(Variant(step, name, adds, knobs))
    rows.append(Variant("8", "DALI instead of the torch GPU data", "dali", replace(knobs, data="dali")))
    graphed = replace(knobs, cuda_graph=True)
    rows.append(Variant("9", "step 7 + whole-step CUDA graph", "cuda_graph", graphed))
    rows.append(Variant("10", "step 7, compile mode reduce-overhead", "compile",
                        replace(knobs, compile_mode="reduce-overhead")))
    # with the graph the step is GPU-bound (profile_step, H100): inductor's autotuning (Triton templates against
    # cuDNN for the convolutions, tuned fusions) goes after the GPU time itself; the compile takes minutes
    autotuned = replace(graphed, compile_mode="max-autotune-no-cudagraphs")
    rows.append(Variant("11", "step 9, compile mode max-autotune-no-cudagraphs", "cuda_graph", autotuned))
    # Muon (best.yaml's optimizer) in row 9's step: what its orthogonalizations cost there, by shape or padded.
    # Not a feature row: on a machine without CUDA graphs they run eagerly, and their note says so
    muon = {"12": ("step 9 with Muon (banks batched by shape)", replace(graphed, optim_impl="torch", muon="shape")),
            "13": ("step 12, Muon's banks padded into one batch", replace(graphed, optim_impl="torch", muon="padded"))}
    rows += [Variant(step, name, None, knobs) for step, (name, knobs) in muon.items()]
    for b in batch_sizes:
        if b != batch:
            rows.append(Variant(f"7@{b}", f"step 7 at batch {b}", None, replace(knobs, batch_size=b)))
            rows.append(Variant(f"8@{b}", f"DALI at batch {b}", "dali", replace(knobs, data="dali", batch_size=b)))
            rows.append(Variant(f"9@{b}", f"step 9 at batch {b}", "cuda_graph", replace(graphed, batch_size=b)))
            rows.append(Variant(f"11@{b}", f"step 11 at batch {b}", "cuda_graph", replace(autotuned, batch_size=b)))
            rows += [Variant(f"{step}@{b}", f"step {step} at batch {b}", None, replace(k, batch_size=b))
                     for step, (_, k) in muon.items()]
    return rows


def unavailable_features(device: torch.device, smoke: bool) -> dict[str, str]:
    """{feature: why it cannot be measured here}; imported up front so a row never fails half built."""
    reasons = {}
    if smoke and device.type == "cpu":
        reasons["compile"] = "--smoke on a CPU skips torch.compile (its C++ build takes minutes on a few cores)"
    if device.type != "cuda":
        reasons["cuda_graph"] = "CUDA graphs need a CUDA GPU"
    try:
        import fasttrain.kernels.se  # noqa: F401
    except Exception as e:  # ImportError, or a kernel module failing inside its own imports
        reasons["triton_se"] = f"fasttrain.kernels.se cannot be imported ({type(e).__name__}: {e})"
    try:
        from fasttrain.kernels.lookahead_sgd import FusedLookaheadSGD  # noqa: F401
    except Exception as e:
        reasons["fused"] = f"fasttrain.kernels.lookahead_sgd cannot be imported ({type(e).__name__}: {e})"
    from fasttrain.data.dali import dali_available

    if not dali_available():
        reasons["dali"] = "NVIDIA DALI cannot be imported (pip install 'fasttrain-resnet[dali]')"
    return reasons


def effective_knobs(knobs: Knobs, unavailable: dict[str, str]) -> tuple[Knobs, list[str]]:
    """The row's knobs without the features that are unavailable, and the names of those dropped."""
    dropped = []
    for feature, (field, wanted, fallback) in FEATURES.items():
        if feature in unavailable and getattr(knobs, field) == wanted:
            knobs = replace(knobs, **{field: fallback})
            dropped.append(feature)
    return knobs, dropped


def variant_config(base, knobs: Knobs):
    cfg = copy.deepcopy(base)
    cfg.train.batch_size = knobs.batch_size
    cfg.train.precision = knobs.precision
    cfg.train.channels_last = knobs.channels_last
    cfg.train.compile = knobs.compile
    cfg.train.compile_mode = knobs.compile_mode
    cfg.train.cuda_graph = knobs.cuda_graph
    cfg.model.se_impl = knobs.se_impl
    cfg.optim.impl = knobs.optim_impl
    if knobs.muon is not None:  # as best.yaml runs it: no Lookahead (Muon refuses it), Nesterov on the rest
        cfg.optim.name, cfg.optim.muon_batching = "muon", knobs.muon
        cfg.optim.lookahead_k, cfg.optim.nesterov = 0, True
    cfg.data.loader = "dali" if knobs.data == "dali" else "torch"
    validate(cfg)
    return cfg


# ------------------------------------------------------------------------------------- the paper's data path
def paper_loader(cfg, batch_size: int, workers: int, device: torch.device) -> PaperLoader:
    """Step 1's data path over the config's training images (subset included)."""
    arrays = fasttrain.data.load_cifar10(resolve_data_dir(cfg.data.dir), download=cfg.data.download)
    n = cfg.data.train_subset or len(arrays.train_x)
    return PaperLoader(arrays.train_x[:n], arrays.train_y[:n], batch_size=batch_size, device=device,
                       workers=workers, mean=cfg.data.mean, std=cfg.data.std, crop_padding=cfg.data.crop_padding)


# ------------------------------------------------------------------------------------- timing
def timed_window(step, batches, steps: int, device: torch.device) -> float:
    """Seconds for `steps` training steps, data loading included (a slow loader starves the device)."""
    with Timer(device) as timer:
        for _ in range(steps):
            step(*next(batches))
    return timer.seconds


@contextlib.contextmanager
def prepared_row(cfg, knobs: Knobs, args, run_dir: Path):
    """A row's Trainer, warmed up: yields (trainer, endless batches, warmup seconds). Warmup covers
    torch.compile, cuDNN autotuning, DataLoader workers and, under train.cuda_graph, the capture (after
    which trainer._train_step replays the graph). profile_step.py builds its rows with this too."""
    if knobs.compile:
        import torch._dynamo

        torch._dynamo.reset()  # a fresh compile per row: no recompile limit silently falling back to eager
    trainer = Trainer(cfg, device=args.device, run_dir=run_dir, console=RunConsole(progress=False, enabled=False))
    loader = (paper_loader(cfg, knobs.batch_size, args.workers, trainer.device) if knobs.data == "workers"
              else trainer.data.train)
    batches = endless(loader)
    try:
        t0 = time.perf_counter()
        for _ in range(args.warmup_steps):
            trainer._train_step(*next(batches))
        if trainer.use_graph:
            trainer.capture_graph(*next(batches))
        synchronize(trainer.device)
        yield trainer, batches, time.perf_counter() - t0
    finally:
        batches.close()  # stops DataLoader workers / drains DALI before the next row


def measure(cfg, knobs: Knobs, args, run_dir: Path) -> dict:
    with prepared_row(cfg, knobs, args, run_dir) as (trainer, batches, warmup):
        windows = [timed_window(trainer._train_step, batches, args.steps, trainer.device)
                   for _ in range(args.repeats)]
    seconds = statistics.median(windows)
    return {"images_per_second": args.steps * knobs.batch_size / seconds, "ms_per_step": 1e3 * seconds / args.steps,
            "window_seconds": windows, "warmup_seconds": warmup}


def run_variant(variant: Variant, base, args, unavailable: dict[str, str], device: torch.device,
                tmp: Path, measure_row=measure, empty: dict | None = None) -> dict:
    """One row: skipped (with the reason) when its feature is unavailable, else measured by
    `measure_row(cfg, knobs, args, run_dir)`; a failure is recorded, never raised. `empty`: the
    result keys a row has before it is measured."""
    row = {"step": variant.step, "name": variant.name, "batch_size": variant.knobs.batch_size,
           "status": "skipped", "reason": None, "note": None,
           **({"images_per_second": None} if empty is None else empty)}
    if variant.adds in unavailable:
        row["reason"] = unavailable[variant.adds]
        return row
    knobs, dropped = effective_knobs(variant.knobs, unavailable)
    row["settings"] = asdict(knobs)
    notes = ["without " + ", ".join(dropped) + " (unavailable)"] if dropped else []
    if device.type == "cpu" and knobs.se_impl == "triton":
        from fasttrain.kernels._utils import INTERPRET

        notes.append("on a CPU the SE kernel runs in Triton's interpreter (TRITON_INTERPRET=1): slow by design"
                     if INTERPRET else "on a CPU the SE op runs its PyTorch reference, not the kernel")
    row["note"] = "; ".join(notes) or None
    try:
        row.update(measure_row(variant_config(base, knobs), knobs, args, tmp / f"row-{variant.step}"))
        row["status"] = "ok"
    except Exception as e:  # one broken variant must not lose the others' measurements
        traceback.print_exc()
        row["status"], row["reason"] = "failed", f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300]}"
    finally:
        release_memory()
    return row


def add_ratios(rows: list[dict], train_flops: int, peak_tflops: float | None) -> None:
    base = next((r["images_per_second"] for r in rows if r["step"] == "1" and r["status"] == "ok"), None)
    for r in rows:
        ips = r["images_per_second"]
        r["speedup"] = ips / base if ips and base else None
        r["tflops"] = ips * train_flops / 1e12 if ips else None
        r["bf16_peak_fraction"] = r["tflops"] / peak_tflops if r["tflops"] and peak_tflops else None


# ------------------------------------------------------------------------------------- output
def print_table(result: dict) -> None:
    console = wide_console()
    peak = result["bf16_peak_tflops"]
    measured = result.get("measured_bf16_matmul_tflops")
    table = Table(title=f"training throughput ablation: {result['model']['name']} "
                        f"({result['model']['params']:,} params) on {result['meta']['device']}",
                  caption=None if measured is None else
                  f"bf16 8192^3 matrix product measured here: {measured:.0f} TFLOP/s")
    for col in ("step", "variant", "batch", "img/s", "ms/step", "speed-up", "TFLOP/s",
                f"% of bf16 peak ({peak if peak else 'unknown'})", "warmup s", "note"):
        table.add_column(col, justify="left" if col in ("variant", "note") else "right")
    for r in result["rows"]:
        if r["status"] != "ok":
            table.add_row(r["step"], r["name"], str(r["batch_size"]), "-", "-", "-", "-", "-", "-",
                          f"[yellow]{r['status']}[/]: {r['reason']}")
            continue
        table.add_row(r["step"], r["name"], str(r["batch_size"]), f"{r['images_per_second']:,.0f}",
                      f"{r['ms_per_step']:.2f}", f"{r['speedup']:.2f}x" if r["speedup"] else "-",
                      f"{r['tflops']:.3g}", f"{100 * r['bf16_peak_fraction']:.1f}%" if r["bf16_peak_fraction"] else "-",
                      f"{r['warmup_seconds']:.1f}", r["note"] or "")
    console.print(table)


def write_chart(result: dict, path: Path) -> Path | None:
    from fasttrain.plot import new_figure

    try:
        fig = new_figure(10, 0.45 * len(result["rows"]) + 1.5)
    except ImportError as e:
        print(f"no chart: {e}")
        return None
    rows = result["rows"][::-1]  # step 1 at the top
    ax = fig.subplots()
    values = [r["images_per_second"] or 0.0 for r in rows]
    ax.barh([f"{r['step']}  {r['name']}" for r in rows], values, color="tab:blue")
    for i, r in enumerate(rows):
        label = (f" {r['images_per_second']:,.0f} img/s  ({r['speedup']:.2f}x)" if r["status"] == "ok" and r["speedup"]
                 else f" {r['status']}" if r["status"] != "ok" else f" {values[i]:,.0f} img/s")
        ax.text(values[i], i, label, va="center", fontsize="small")
    ax.set_xlabel("training images / s")
    ax.set_xlim(0, max(values + [1.0]) * 1.35)  # room for the labels right of the longest bar
    ax.set_title(f"{result['model']['name']} on {result['meta']['device']}")
    fig.savefig(path, dpi=110)
    return path


# ------------------------------------------------------------------------------------- main
def parse_args(argv: list[str]) -> tuple[argparse.Namespace, dict]:
    p = argparse.ArgumentParser(prog="python benchmarks/throughput.py", allow_abbrev=False,
                                description="Training images/s, one optimization at a time (see the module doc)")
    p.add_argument("--config", type=Path, help="model/optimizer/data config (default configs/seed.yaml; "
                                               "--smoke: configs/smoke.yaml)")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    p.add_argument("--smoke", action="store_true", help="tiny model and step counts: seconds on a CPU")
    p.add_argument("--batch", type=int, help="the ablation's batch size (default 128, the paper's; --smoke 32)")
    p.add_argument("--batch-sizes", type=int, nargs="+", help="steps 7, 8, 9, 11, 12 and 13 again at these batch "
                                                              "sizes (default 128 512 1024; --smoke 32 64)")
    p.add_argument("--steps", type=int, help="timed steps per window (default 100; --smoke 3)")
    p.add_argument("--warmup-steps", type=int, help="untimed steps first (default 15; --smoke 1)")
    p.add_argument("--repeats", type=int, help="timed windows per row, the median is reported (default 3; --smoke 1)")
    p.add_argument("--workers", type=int, help="DataLoader workers of step 1 (default 4; --smoke 1)")
    p.add_argument("--rows", type=lambda s: [r.strip() for r in s.split(",") if r.strip()],
                   help="measure only these rows, in this order, comma-separated step labels (e.g. 1,7@512,5); "
                        "they are reported in the ablation's order; default all")
    p.add_argument("--out", type=Path, help="result JSON (default benchmarks/results/throughput-MODEL-DEVICE-TIME.json);"
                                            " the chart is written beside it as .png")
    args, overrides = parse_known_overrides(p, argv)
    check_out(args.out)  # before any row is measured: the first write comes after it
    defaults = (dict(config=REPO_ROOT / "configs/smoke.yaml", batch=32, batch_sizes=[32, 64], steps=3,
                     warmup_steps=1, repeats=1, workers=1) if args.smoke else
                dict(config=REPO_ROOT / "configs/seed.yaml", batch=128, batch_sizes=[128, 512, 1024], steps=100,
                     warmup_steps=15, repeats=3, workers=4))
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    known = [v.step for v in ablation(args.batch, args.batch_sizes)]
    if args.rows is not None and (not args.rows or set(args.rows) - set(known)):
        raise ConfigError(f"--rows {','.join(args.rows) or '(empty)'}: each must be one of {', '.join(known)}")
    if min(args.steps, args.repeats, args.batch, *args.batch_sizes) < 1 or min(args.warmup_steps, args.workers) < 0:
        raise ConfigError("--steps, --repeats and batch sizes must be >= 1; --warmup-steps and --workers >= 0")
    return args, overrides


def main(argv: list[str]) -> int:
    args, overrides = parse_args(argv)
    base = load_config(args.config, overrides)
    device = resolve_device(args.device)
    model = build_model(replace(base.model, se_impl="torch"))  # counting runs the model: the plain SE will do
    flops = forward_flops(model)
    peak = bf16_peak_tflops(device_name(device)) if device.type == "cuda" else None
    measured_peak = matmul_tflops() if device.type == "cuda" else None  # the card as found, beside its datasheet
    unavailable = unavailable_features(device, args.smoke)
    result = {
        "benchmark": "throughput",
        "meta": run_metadata(device),
        "model": {"name": base.name, "params": count_params(model), "forward_flops": flops,
                  "train_flops_per_image": TRAIN_FLOPS_PER_FORWARD * flops, "config": config_to_dict(base)},
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "config")} | {"config": str(args.config)},
        "bf16_peak_tflops": peak,
        "measured_bf16_matmul_tflops": measured_peak,
        "unavailable": unavailable,
        "complete": False,
        "measured_order": [],            # the rows' steps in the order they ran (--rows)
        "rows": [],
    }
    out = args.out or default_result_path("throughput", base.name, device)
    variants = ablation(args.batch, args.batch_sizes)
    order = [v.step for v in variants]
    if args.rows is not None:  # measured in the order given (most wanted first under a time limit)
        by_step = {v.step: v for v in variants}
        variants = [by_step[step] for step in dict.fromkeys(args.rows)]
    with tempfile.TemporaryDirectory(prefix="fasttrain-throughput-") as tmp:
        for variant in variants:
            result["rows"].append(run_variant(variant, base, args, unavailable, device, Path(tmp)))
            result["measured_order"].append(variant.step)
            result["rows"].sort(key=lambda r: order.index(r["step"]))  # reported in the ablation's order
            add_ratios(result["rows"], TRAIN_FLOPS_PER_FORWARD * flops, peak)
            # rewritten after every row: a run stopped by a time limit still leaves the rows it measured
            write_json(out, result)
    write_complete(out, result)
    chart = write_chart(result, out.with_suffix(".png"))
    if chart:
        print(f"wrote {chart}")
    print_table(result)
    return 0


if __name__ == "__main__":
    run_main(main)
