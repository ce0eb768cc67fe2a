"""Where a training step's time goes: host-bound (Python, dispatch, kernel launches) or GPU-bound.

    python benchmarks/profile_step.py [--device auto] [--rows 4,5,7,7@512] [--steps 20] [--warmup-steps 15]
        [--out benchmarks/results/NAME.json] [--section.key VALUE ...]
    python benchmarks/profile_step.py --device cpu --smoke        # seconds on a CPU: the tests use it

The rows are throughput.py's (same ids, same Trainer built the same way, same `_train_step`, data loading
included); see that script for what each row adds. Per row, after `--warmup-steps` untimed steps:

  wall ms/step   `--repeats` windows of `--steps` steps, each timed from a synchronize to the completion of
                 its last step (CUDA events; on a CPU perf_counter); the median.
  host ms/step   the same windows, perf_counter from the first step call to the return of the last one,
                 with no synchronize: on a GPU, how long Python takes to enqueue the steps. If the GPU is
                 the bottleneck the launch queue fills and the host blocks in a launch, so host ~ wall
                 then too: only the GPU busy time separates the two cases.
  GPU busy       under torch.profiler (one more window of `--steps` steps, after one profiler warmup step):
                 the union of the device's kernel, memcpy and memset intervals (overlapping streams
                 counted once) per step. busy % = busy / wall ms/step (wall measured without the
                 profiler, which slows the host but not the kernels).
  launches/step  host-side launch calls (cudaLaunchKernel*, cuLaunchKernel*, cudaGraphLaunch);
                 kernels/step: kernels that ran on the device (a CUDA graph: one launch, many kernels).
  syncs/step     blocking host syncs inside the step (cudaStreamSynchronize and the like: .item(), a
                 synchronous copy); nonzero means the GPU drains once per such sync.
  aten ops/step  top-level ATen calls (no aten:: op above them): the dispatcher's share of the host work.

Verdict: "host-bound" when host >= 0.9 x wall and busy < 0.7 x wall (the GPU waits for Python);
"GPU-bound" when busy >= 0.85 x wall; else "mixed"; "cpu" on a CPU (no device to wait for). Then the
GPU time by kernel class per row (below), the top 8 device kernels and the top 8 host ops per row (ms and
calls per step). The JSON is rewritten after every row ("complete": false until the last), rows in the order
of --rows.

  GPU time by class  each device kernel's time summed per class (not a union: the classes add up to the
                 kernel time, which may exceed GPU busy where streams overlap), ms per step: convolution
                 (cuDNN's fprop / dgrad / wgrad), compiled fusions (inductor's triton_* kernels: batch norm,
                 activations, the rest of the graph), fasttrain kernels (the fused SE and Lookahead-SGD),
                 eager ATen (at::native kernels), matmul, copies (memcpy/memset), other. Where the time of a
                 GPU-bound step goes: what a faster step must shrink.
  floor          on a GPU, how fast the row's step could be at best, by a model stated in `step_floor`: its
                 training FLOPs at the card's bf16 matrix-product rate and its batch norms' memory traffic
                 at the card's copy bandwidth, both measured at the start of the run; the rest of the step
                 counts as free. A step near its floor has nothing left to gain but by doing less work.
"""
from __future__ import annotations

import argparse
import re
import statistics
import tempfile
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import torch
from common import (REPO_ROOT, Timer, check_out, copy_bandwidth_gbs, default_result_path, matmul_tflops,
                    parse_known_overrides, run_main, run_metadata, wide_console, write_complete, write_json)
from rich.table import Table
from throughput import TRAIN_FLOPS_PER_FORWARD, ablation, prepared_row, run_variant, unavailable_features

from fasttrain.config import ConfigError, config_to_dict, load_config
from fasttrain.model import build_model, count_params, forward_flops
from fasttrain.runtime import resolve_device, synchronize

HOST_BOUND_HOST, HOST_BOUND_BUSY, GPU_BOUND_BUSY = 0.9, 0.7, 0.85  # fractions of wall time (see the doc)
TOP = 8
LAUNCH = re.compile(r"^(cudaLaunch\w*Kernel\w*|cuLaunchKernel\w*|cudaGraphLaunch\w*)$")
# blocking host syncs; not cudaDeviceSynchronize, which closes the profiled window (the step never calls it)
SYNC = re.compile(r"^(cudaStreamSynchronize|cudaEventSynchronize|cudaMemcpy|cuStreamSynchronize|cuEventSynchronize)$")
DEVICE_WORK = ("kernel", "gpu_memcpy", "gpu_memset")  # Kineto activity types; not annotations, not syncs
# a device kernel's class by its name, the first match wins: inductor's names can hold "conv" (a fusion next to
# a convolution), so the fusions are told apart first
KERNEL_CLASSES = (
    ("fasttrain kernels", re.compile(r"^_(se_\w+|lookahead_sgd)_kernel")),
    ("compiled fusions", re.compile(r"^triton_")),
    ("copies", re.compile(r"^Mem(cpy|set)")),
    ("convolution", re.compile(r"fprop|dgrad|wgrad|conv|winograd|implicit_gemm|cudnn", re.IGNORECASE)),
    # cuBLAS names its Hopper GEMMs nvjet_* (Muon's bf16 products, rows 12 and 13), older ones *gemm*
    ("matmul", re.compile(r"gemm|cutlass|cublas|nvjet", re.IGNORECASE)),
    ("eager ATen", re.compile(r"at::native::|^void at::")),
)


# The floor's traffic model: passes over each batch norm's output per training step, each reading or writing
# every element once. Forward 3: read it for the statistics, read it again and write the normalized (and
# activated) result. Backward 5: read the incoming gradient and the input for the two reductions, read both
# again and write the input's gradient. Fewer passes would need the norm fused into its convolution.
NORM_PASSES = 8
ELEMENT_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}  # the activations' size under each row precision


# ------------------------------------------------------------------------------------- pure helpers
def norm_elements_per_image(model: torch.nn.Module, image_hw: tuple[int, int] = (32, 32)) -> int:
    """Elements of all batch-norm outputs for one image (one forward pass of the model on the CPU)."""
    counted, training = [], model.training
    hooks = [m.register_forward_hook(lambda _m, _i, out: counted.append(out[0].numel()))
             for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    try:
        with torch.no_grad():  # in eval mode: the norms' running statistics stay as they were
            model.eval()(torch.zeros(1, 3, *image_hw))
    finally:
        for h in hooks:
            h.remove()
        model.train(training)
    return sum(counted)


def step_floor(train_flops: int, norm_elements: int, batch: int, element_bytes: int,
               tflops: float | None, copy_gbs: float | None) -> dict | None:
    """The least time a training step of `batch` images can take on a card that multiplies bf16 matrices
    at `tflops` and copies at `copy_gbs` (bytes read + written per second): per image, `train_flops`
    at that rate plus NORM_PASSES passes over `norm_elements` elements of `element_bytes` at that bandwidth,
    the two not overlapping (compute-bound convolutions and memory-bound norms take turns). None without
    both ceilings (on a CPU)."""
    if not tflops or not copy_gbs:
        return None
    compute_ms = 1e3 * train_flops * batch / (tflops * 1e12)
    norm_ms = 1e3 * NORM_PASSES * element_bytes * norm_elements * batch / (copy_gbs * 1e9)
    step_ms = compute_ms + norm_ms
    return {"compute_ms": compute_ms, "norm_traffic_ms": norm_ms, "step_ms": step_ms,
            "images_per_second": 1e3 * batch / step_ms}


def union_length(intervals) -> float:
    """Total length covered by (start, end) intervals, overlaps counted once."""
    total, cur_start, cur_end = 0.0, None, None
    for start, end in sorted(intervals):
        if cur_end is None or start > cur_end:
            if cur_end is not None:
                total += cur_end - cur_start
            cur_start, cur_end = start, end
        else:
            cur_end = max(cur_end, end)
    return total + (cur_end - cur_start if cur_end is not None else 0.0)


def verdict(wall: float, host: float, busy: float | None) -> str:
    if busy is None:
        return "cpu"
    if host >= HOST_BOUND_HOST * wall and busy < HOST_BOUND_BUSY * wall:
        return "host-bound"
    return "GPU-bound" if busy >= GPU_BOUND_BUSY * wall else "mixed"


def top_by_time(events, steps: int) -> list[dict]:
    """[{name, ms_per_step, count_per_step}] of the TOP names with the most total time."""
    total, count = defaultdict(float), defaultdict(int)
    for e in events:
        total[e.name] += e.time_range.elapsed_us()
        count[e.name] += 1
    names = sorted(total, key=total.get, reverse=True)[:TOP]
    return [{"name": n if len(n) <= 60 else n[:57] + "...", "ms_per_step": total[n] / 1e3 / steps,
             "count_per_step": count[n] / steps} for n in names]


def kernel_class(name: str) -> str:
    return next((label for label, pattern in KERNEL_CLASSES if pattern.search(name)), "other")


def time_by_class(events, steps: int) -> dict[str, float]:
    """{class: ms per step} of the device work, largest first (see KERNEL_CLASSES)."""
    total = defaultdict(float)
    for e in events:
        total[kernel_class(e.name)] += e.time_range.elapsed_us() / 1e3 / steps
    return dict(sorted(total.items(), key=lambda item: item[1], reverse=True))


def is_device_work(e) -> bool:
    if e.device_type != torch.autograd.DeviceType.CUDA or getattr(e, "is_user_annotation", False):
        return False
    kind = getattr(e, "activity_type", None)  # newer torch; else tell syncs and annotations apart by name
    return kind in DEVICE_WORK if kind else not (e.name.endswith("Sync") or e.name.endswith("Wait Event"))


def summarize(events, steps: int, cuda: bool) -> dict:
    """The profiled window's numbers per step, from torch.profiler's FunctionEvents."""
    cpu = torch.autograd.DeviceType.CPU

    def top_level_aten(e):
        if not e.name.startswith("aten::") or e.device_type != cpu:
            return False
        p = e.cpu_parent
        while p is not None and not p.name.startswith("aten::"):
            p = p.cpu_parent
        return p is None

    aten = [e for e in events if top_level_aten(e)]
    out = {"profiled_steps": sum(e.name.startswith("ProfilerStep") and e.device_type == cpu for e in events),
           "aten_ops_per_step": len(aten) / steps, "top_ops": top_by_time(aten, steps),
           "gpu_busy_ms_per_step": None, "kernels_per_step": None, "launches_per_step": None,
           "syncs_per_step": None, "top_kernels": None, "gpu_ms_by_class": None}
    if cuda:
        work = [e for e in events if is_device_work(e)]
        host = [e for e in events if e.device_type == cpu]
        out.update(
            gpu_busy_ms_per_step=union_length((e.time_range.start, e.time_range.end) for e in work) / 1e3 / steps,
            kernels_per_step=sum(not e.name.startswith(("Memcpy", "Memset")) for e in work) / steps,
            launches_per_step=sum(bool(LAUNCH.match(e.name)) for e in host) / steps,
            syncs_per_step=sum(bool(SYNC.match(e.name)) for e in host) / steps,
            top_kernels=top_by_time(work, steps), gpu_ms_by_class=time_by_class(work, steps))
    return out


# ------------------------------------------------------------------------------------- one row
def profile_row(cfg, knobs, args, run_dir: Path) -> dict:
    with prepared_row(cfg, knobs, args, run_dir) as (trainer, batches, warmup):
        device, step = trainer.device, trainer._train_step
        row = {"warmup_seconds": warmup, "wall_ms_windows": [], "host_ms_windows": []}
        for _ in range(args.repeats):
            with Timer(device) as timer:  # synchronize, start event ... end event, wait for it
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    step(*next(batches))
                host = time.perf_counter() - t0  # no sync: the time to enqueue on a GPU
            row["wall_ms_windows"].append(1e3 * timer.seconds / args.steps)
            row["host_ms_windows"].append(1e3 * host / args.steps)
        cuda = device.type == "cuda"
        activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
        plan = torch.profiler.schedule(wait=0, warmup=1, active=args.steps, repeat=1)
        t0 = time.perf_counter()
        with torch.profiler.profile(activities=activities, schedule=plan) as prof:
            for i in range(args.steps + 1):
                step(*next(batches))
                if i in (0, args.steps):  # a clean start, and every kernel finished before the trace stops
                    synchronize(device)
                prof.step()
        row["profiled_window_seconds"] = time.perf_counter() - t0
        row.update(summarize(prof.events(), args.steps, cuda))
    wall, host = statistics.median(row["wall_ms_windows"]), statistics.median(row["host_ms_windows"])
    busy = row["gpu_busy_ms_per_step"]
    return {"wall_ms_per_step": wall, "host_ms_per_step": host, "host_fraction": host / wall,
            "gpu_busy_fraction": None if busy is None else busy / wall, "verdict": verdict(wall, host, busy), **row}


def run_row(variant, base, args, unavailable: dict[str, str], tmp: Path, model: dict) -> dict:
    """throughput.run_variant with this script's measurement, and the row's floor (`model`: the result's
    model section, `ceilings` in it); the row id under "row"."""
    row = run_variant(variant, base, args, unavailable, resolve_device(args.device), tmp,
                      measure_row=profile_row, empty={"verdict": None})
    knobs, ceilings = variant.knobs, model["ceilings"]
    row["floor"] = step_floor(model["train_flops_per_image"], model["norm_elements_per_image"], knobs.batch_size,
                              ELEMENT_BYTES[knobs.precision], ceilings["bf16_matmul_tflops"], ceilings["copy_gbs"])
    return {"row": row.pop("step"), **row}


# ------------------------------------------------------------------------------------- output
def print_tables(result: dict) -> None:
    console = wide_console()
    fmt = lambda v, spec=".2f": "-" if v is None else format(v, spec)  # noqa: E731
    table = Table(title=f"training step, host vs GPU: {result['model']['name']} on {result['meta']['device']} "
                        f"({result['settings']['steps']} steps per window)")
    for col in ("row", "batch", "wall ms/step", "host ms/step", "GPU busy ms/step", "GPU busy %", "launches/step",
                "kernels/step", "syncs/step", "aten ops/step", "verdict", "note"):
        table.add_column(col, justify="left" if col in ("verdict", "note") else "right")
    for r in result["rows"]:
        if r["status"] != "ok":
            table.add_row(r["row"], str(r["batch_size"]), *["-"] * 8, "-", f"[yellow]{r['status']}[/]: {r['reason']}")
            continue
        busy = r["gpu_busy_fraction"]
        table.add_row(r["row"], str(r["batch_size"]), fmt(r["wall_ms_per_step"]), fmt(r["host_ms_per_step"]),
                      fmt(r["gpu_busy_ms_per_step"]), "-" if busy is None else f"{100 * busy:.0f}%",
                      fmt(r["launches_per_step"], ".0f"), fmt(r["kernels_per_step"], ".0f"),
                      fmt(r["syncs_per_step"], ".1f"), fmt(r["aten_ops_per_step"], ".0f"), r["verdict"], r["note"] or "")
    for r in result["rows"]:
        if r["status"] == "ok" and r.get("gpu_ms_by_class"):
            kernel_ms = sum(r["gpu_ms_by_class"].values())
            console.print(f"row {r['row']} (batch {r['batch_size']}): GPU time by class, per step: " + ", ".join(
                f"{label} {ms:.2f} ms ({100 * ms / kernel_ms:.0f}%)" for label, ms in r["gpu_ms_by_class"].items()))
        floor, ceilings = r.get("floor"), result["model"]["ceilings"]
        if r["status"] == "ok" and floor:
            console.print(
                f"row {r['row']} (batch {r['batch_size']}): floor {floor['step_ms']:.2f} ms/step = "
                f"{floor['images_per_second']:,.0f} images/s (compute {floor['compute_ms']:.2f} ms at "
                f"{ceilings['bf16_matmul_tflops']:.0f} TFLOP/s, batch-norm traffic {floor['norm_traffic_ms']:.2f} ms at "
                f"{ceilings['copy_gbs']:.0f} GB/s, both measured); measured {r['wall_ms_per_step']:.2f} ms, "
                f"{100 * floor['step_ms'] / r['wall_ms_per_step']:.0f}% of the floor's speed")
        for key, what in (("top_kernels", "device kernels"), ("top_ops", "host ops (top-level aten)")):
            if r["status"] == "ok" and r.get(key):
                console.print(f"row {r['row']} (batch {r['batch_size']}): top {what}, per step")
                for k in r[key]:
                    console.print(f"  {k['ms_per_step']:8.3f} ms  {k['count_per_step']:6.1f}x  {k['name']}")
    console.print(table)


# ------------------------------------------------------------------------------------- main
def parse_args(argv: list[str]) -> tuple[argparse.Namespace, dict]:
    p = argparse.ArgumentParser(prog="python benchmarks/profile_step.py", allow_abbrev=False,
                                description="Is the training step host-bound or GPU-bound? (see the module doc)")
    p.add_argument("--config", type=Path, help="default configs/seed.yaml; --smoke: configs/smoke.yaml")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    p.add_argument("--smoke", action="store_true", help="tiny model and step counts: seconds on a CPU")
    p.add_argument("--rows", type=lambda s: [r.strip() for r in s.split(",") if r.strip()],
                   help="throughput.py's row ids, profiled and reported in this order (default 4,5,7,7@512; "
                        "--smoke 4,5,7,7@64)")
    p.add_argument("--batch", type=int, help="the ablation's batch size (default 128; --smoke 32)")
    p.add_argument("--batch-sizes", type=int, nargs="+", help="larger batch sizes of the 7@B / 8@B rows "
                                                              "(default: those named in --rows)")
    p.add_argument("--steps", type=int, help="steps per timed window and in the profiled window (default 20; "
                                             "--smoke 3)")
    p.add_argument("--warmup-steps", type=int, help="untimed steps first (default 15; --smoke 1)")
    p.add_argument("--repeats", type=int, help="timed windows per row, the median is reported (default 3; --smoke 1)")
    p.add_argument("--workers", type=int, help="DataLoader workers of row 1 (default 4; --smoke 1)")
    p.add_argument("--out", type=Path, help="result JSON (default benchmarks/results/profile_step-MODEL-DEVICE-TIME.json)")
    args, overrides = parse_known_overrides(p, argv)
    check_out(args.out)  # before any row is measured: the first write comes after it
    defaults = (dict(config=REPO_ROOT / "configs/smoke.yaml", batch=32, rows=["4", "5", "7", "7@64"], steps=3,
                     warmup_steps=1, repeats=1, workers=1) if args.smoke else
                dict(config=REPO_ROOT / "configs/seed.yaml", batch=128, rows=["4", "5", "7", "7@512"], steps=20,
                     warmup_steps=15, repeats=3, workers=4))
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.batch_sizes is None:
        args.batch_sizes = sorted({int(b) for r in args.rows if "@" in r and (b := r.split("@", 1)[1]).isdigit()})
    if min(args.steps, args.repeats, args.batch, *args.batch_sizes) < 1 or min(args.warmup_steps, args.workers) < 0:
        raise ConfigError("--steps, --repeats and batch sizes must be >= 1; --warmup-steps and --workers >= 0")
    known = [v.step for v in ablation(args.batch, args.batch_sizes)]
    if not args.rows or set(args.rows) - set(known):
        raise ConfigError(f"--rows {','.join(args.rows) or '(empty)'}: each must be one of {', '.join(known)} "
                          "(R@B: row R at batch size B, one of --batch-sizes when given)")
    return args, overrides


def main(argv: list[str]) -> int:
    args, overrides = parse_args(argv)
    base = load_config(args.config, overrides)
    device = resolve_device(args.device)
    unavailable = unavailable_features(device, args.smoke)
    model = build_model(replace(base.model, se_impl="torch"))
    cuda = device.type == "cuda"
    result = {
        "benchmark": "profile_step",
        "meta": run_metadata(device, argv=["benchmarks/profile_step.py", *argv]),
        "model": {"name": base.name, "params": count_params(model),
                  "train_flops_per_image": TRAIN_FLOPS_PER_FORWARD * forward_flops(model),
                  "norm_elements_per_image": norm_elements_per_image(model),
                  # the card's ceilings as found, for each row's floor (measured once, before any row)
                  "ceilings": {"bf16_matmul_tflops": matmul_tflops() if cuda else None,
                               "copy_gbs": copy_bandwidth_gbs(device) if cuda else None,
                               "norm_passes": NORM_PASSES},
                  "config": config_to_dict(base)},
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "config")} | {"config": str(args.config)},
        "thresholds": {"host_bound_host_fraction": HOST_BOUND_HOST, "host_bound_busy_below": HOST_BOUND_BUSY,
                       "gpu_bound_busy_fraction": GPU_BOUND_BUSY},
        "unavailable": unavailable,
        "complete": False,
        "rows": [],
    }
    out = args.out or default_result_path("profile_step", base.name, device)
    by_id = {v.step: v for v in ablation(args.batch, args.batch_sizes)}
    with tempfile.TemporaryDirectory(prefix="fasttrain-profile-") as tmp:
        for row_id in dict.fromkeys(args.rows):
            result["rows"].append(run_row(by_id[row_id], base, args, unavailable, Path(tmp), result["model"]))
            write_json(out, result)  # after every row: a run stopped by a time limit keeps what it measured
    write_complete(out, result)
    print_tables(result)
    return 0


if __name__ == "__main__":
    run_main(main)
