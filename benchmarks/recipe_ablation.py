"""Recipe ablation on the validation split: what each change to a recipe buys, without touching the test set.

    python benchmarks/recipe_ablation.py --config configs/best.yaml \\
        [--variants benchmarks/recipe_variants.yaml] [--only base,no_lookahead] [--seeds 2] \\
        [--val-size 5000] [--targets apaper 93 94] [--device auto] [--jobs 1] \\
        [--out benchmarks/results/NAME.json] [--section.key VALUE ...]

Each variant is the config plus the variant's overrides (a YAML mapping: name -> {dotted key: value};
`base` with no overrides is the reference every other row is compared with). Every run holds out the
last `--val-size` training images (data.val_size), trains on the rest, evaluates only the validation
split every epoch and never the test set (train.eval_test false): tuning decisions are made on
validation accuracy alone (issue 6). The test set is for the final measurement of the chosen recipe,
with `time_to_accuracy.py` on the full training set.

Timing is time_to_accuracy.py's: the training clock is the sum of the trainer's `epoch_seconds` (plus
the stem's whitening and the EMA's BN recomputes, as there), compile and autotuning are reported
apart, and time-to-target is the clock at the end of the first epoch whose validation accuracy (no
TTA) reaches the target. By default all variants run in one
process one after the other, so their times are comparable. `--jobs N` runs N of them at a time, each
in its own fresh process (its log in the runs folder, NAME-seed-S.log), sharing the one GPU: the
accuracies are the same as one at a time (the same seeds give the same runs), the times are not --
they are shared-GPU times, marked as such in the JSON (`jobs`) and the table. It is for the search:
while a step is bound by host overhead (the first H200 session) or while the runs compile, N runs
overlap and a device session fits more variants. The JSON is rewritten after every run: a run
stopped by a time limit keeps what it measured (with --jobs, the runs in flight are lost). A run that
fails is recorded under "failed" and the others carry on, the exit code then 1: with --jobs > 1 any
failure, its process dying included; one at a time (in this process) a diverged run (TrainingError)
or a CUDA out-of-memory error, while anything else ends the ablation.

The verdict (recipe_verdict.py; "fastest" and "next" in the JSON, printed above the table): per
target and TTA kind, the quickest variant whose mean final validation accuracy reaches it, and the
candidate for configs/best.yaml with its overrides as flags, chosen on validation alone; the 5-seed test
run of time_to_accuracy.py then reports its test accuracy and time (gpu_summary.py prints that run as the
next call), and a test figure never sends the search back to pick another (that would tune on the test
set). The table is printed last.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

from common import (REPO_ROOT, add_targets_argument, check_out, check_runs_dir, check_targets, default_result_path,
                    parse_known_overrides, run_main, run_metadata, wide_console, write_complete, write_json)
import torch
from rich.table import Table
from recipe_verdict import fastest_lines, fastest_reaching, kind_accuracy, next_candidate
from time_to_accuracy import _fmt, aggregate, run_seed, seed_config, target_key

from fasttrain.config import ConfigError, config_to_dict, load_config, parse_yaml
from fasttrain.model import build_model, forward_flops
from fasttrain.runtime import resolve_device
from fasttrain.trainer import TrainingError

SPLIT = "val"
DEFAULT_VARIANTS = REPO_ROOT / "benchmarks" / "recipe_variants.yaml"


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, dict]:
    p = argparse.ArgumentParser(prog="python benchmarks/recipe_ablation.py", allow_abbrev=False,
                                description="Train recipe variants on a held-out validation split and compare "
                                            "validation accuracy and time. Any config key is a flag.")
    p.add_argument("--config", required=True, help="the recipe every variant changes, e.g. configs/best.yaml")
    p.add_argument("--variants", type=Path, default=DEFAULT_VARIANTS,
                   help="YAML: variant name -> {dotted key: value} (default benchmarks/recipe_variants.yaml)")
    p.add_argument("--only", type=lambda s: [v.strip() for v in s.split(",") if v.strip()],
                   help="run only these variants, comma-separated, in this order (base is added first)")
    p.add_argument("--seeds", type=int, default=2, help="seeds per variant (train.seed + 0 .. seeds-1; default 2)")
    p.add_argument("--val-size", type=int, default=5000, help="training images held out for validation")
    add_targets_argument(p, [93.0, 94.0], "validation")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    p.add_argument("--out", type=Path, help="result JSON (default benchmarks/results/recipe_ablation-CONFIG-DEVICE-TIME.json)")
    p.add_argument("--runs-dir", type=Path, help="keep the run folders here (default: a temporary folder)")
    p.add_argument("--jobs", type=int, default=1,
                   help="runs at a time, each in its own process on the one device (default 1: one after the "
                        "other, times comparable); more fits more variants in a session, times then shared")
    p.add_argument("--overwrite", action="store_true", help="replace runs already in --runs-dir")
    args, overrides = parse_known_overrides(p, argv)
    if args.seeds < 1:
        raise ConfigError(f"--seeds {args.seeds}: need at least 1")
    if args.jobs < 1:
        raise ConfigError(f"--jobs {args.jobs}: need at least 1 run at a time")
    if args.val_size < 1:
        raise ConfigError(f"--val-size {args.val_size}: tuning needs a validation split of at least 1 image")
    check_targets(args.targets)
    check_out(args.out)
    return args, overrides


def read_variants(path: Path, only: list[str] | None) -> dict[str, dict]:
    """{name: {dotted key: value}}, `base` first; every problem is a ConfigError naming the variant."""
    if not path.is_file():
        raise ConfigError(f"--variants {path}: no such file")
    variants = parse_yaml(path.read_text(encoding="utf-8"), str(path)) or {}
    if not isinstance(variants, dict) or not all(isinstance(v, dict) or v is None for v in variants.values()):
        raise ConfigError(f"{path}: expected a mapping of variant name -> {{dotted.key: value}}")
    variants = {str(name): dict(v or {}) for name, v in variants.items()}
    bad = [name for name in variants if not re.fullmatch(r"[A-Za-z0-9_.+-]+", name)]
    if bad:  # names become run-folder names
        raise ConfigError(f"{path}: variant names may use letters, digits and _ . + - only: {', '.join(bad)}")
    variants.setdefault("base", {})
    if variants["base"]:
        raise ConfigError(f"{path}: the variant 'base' is the unchanged recipe and takes no overrides")
    if only is not None:
        unknown = [name for name in only if name not in variants]
        if unknown:
            raise ConfigError(f"--only: unknown variant(s) {', '.join(unknown)}; {path} has {', '.join(variants)}")
        variants = {name: variants[name] for name in ["base", *[n for n in only if n != "base"]]}
    return {"base": variants["base"], **{k: v for k, v in variants.items() if k != "base"}}


def variant_config(config: str, cli: dict, name: str, changes: dict, val_size: int):
    """The config a variant trains (file, command-line overrides, the variant's, then tuning's fixed
    keys) and its network's forward GFLOPs per image."""
    forced = {"data.val_size": val_size, "train.eval_test": False, "train.eval_every": 1}
    clash = sorted(set(changes) & set(forced))
    if clash:
        raise ConfigError(f"variant {name!r}: {', '.join(clash)} is set by recipe_ablation itself")
    clash = sorted(set(cli) & set(forced))
    if clash:  # else silently replaced here, and carried into the candidate's flags for the final run
        raise ConfigError(f"--{', --'.join(clash)}: set by recipe_ablation itself (the validation split's "
                          "size is --val-size; the test set is never scored while tuning); leave it out")
    try:
        cfg = load_config(config, {**cli, **changes, **forced})
        model = build_model(cfg.model)  # the parameter budget, checked before any variant trains
    except ConfigError as e:
        raise ConfigError(f"variant {name!r}: {e}") from None
    return cfg, forward_flops(model) / 1e9


def summarize(rows: list[dict], targets: list[float], gflops: dict[str, float], seeds: int = 1,
              failed: list[dict] = (), optimizers: dict[str, str] | None = None) -> dict:
    """Per variant: the aggregate over its seeds, the change of mean val accuracy against base, its
    epochs, its cost in epoch-GFLOPs (epochs x forward GFLOPs per image: proportional to its training
    compute, whatever the network) and its optimizer (`optimizers`: optim.name; the verdict weighs the
    two into its ranking of runs that shared the GPU, recipe_verdict.training_cost), and whether all
    its `seeds` finished ("all_seeds": a variant with a failed or unfinished seed is shown, not judged)."""
    by_variant: dict[str, list[dict]] = {}
    for r in rows:
        by_variant.setdefault(r["variant"], []).append(r)
    out = {name: aggregate(runs, targets, SPLIT) for name, runs in by_variant.items()}
    base = out.get("base", {}).get("final_val_acc_mean")
    failed_variants = {f["variant"] for f in failed}
    for name, agg in out.items():
        agg["epochs"] = max(len(r["epochs"]) for r in by_variant[name])  # metrics rows: epochs trained
        agg["forward_gflops"] = gflops[name]
        agg["epoch_gflops"] = agg["epochs"] * gflops[name]
        if optimizers:
            agg["optimizer"] = optimizers[name]
        agg["all_seeds"] = agg["seeds"] >= seeds and name not in failed_variants
        mean = agg["final_val_acc_mean"]
        agg["delta_val_acc_vs_base"] = None if base is None or mean is None else mean - base
    return out


def print_table(result: dict) -> None:
    keys = [target_key(t) for t in result["targets"]]
    table = Table(title=f"recipe ablation of {result['config_name']} on {result['val_size']} validation images, "
                        f"{result['meta']['device']}")
    # above the table, on its own line: a title longer than the table would wrap
    print("test set not evaluated" + (f"; {result['jobs']} runs at a time: shared-device times"
                                      if result["jobs"] > 1 else ""), flush=True)
    for col in ("variant", "changes", "seeds", "val %", "std", "vs base", "flip %", "flip_shift %", "epochs",
                "train s", *[f"s to {k}%" for k in keys]):
        table.add_column(col, justify="left" if col in ("variant", "changes") else "right")
    for name, agg in result["aggregate"].items():
        changes = ", ".join(f"{k}={json.dumps(v)}" for k, v in result["variants"][name].items()) or "-"
        delta = agg["delta_val_acc_vs_base"]
        table.add_row(name, changes, str(agg["seeds"]), _fmt(agg["final_val_acc_mean"], ".2f"),
                      _fmt(agg["final_val_acc_std"], ".2f"), "-" if delta is None else f"{delta:+.2f}",
                      _fmt(kind_accuracy(agg, "flip"), ".2f"), _fmt(kind_accuracy(agg, "flip_shift"), ".2f"),
                      str(agg["epochs"]), _fmt(agg["train_seconds_median"], ".1f"),
                      *[_fmt(agg["targets"][k]["median_time_to_target"], ".1f") for k in keys])
    wide_console().print(table)


# ------------------------------------------------------------------------------------- running the runs
class RunFailed(Exception):
    """A run failed (its error, or its worker process died); the message names the run, the error and
    its log (with --jobs) and the log's last lines."""

    def __init__(self, variant: str, seed: int, error: str, log: Path | None = None):
        self.record = {"variant": variant, "seed": seed, "error": error, "log": None if log is None else str(log)}
        where = f" (its log: {log})\n{tail(log, 12)}" if log is not None else ""
        super().__init__(f"variant {variant!r} seed {seed} failed: {error}{where}")


def run_one(task: tuple) -> dict:
    """One (variant, seed) run in this process: its result row, tagged with the variant."""
    name, cfg, seed, run_dir, args = task
    row, _ = run_seed(seed_config(cfg, seed, run_dir), args, run_dir, split=SPLIT)
    row["variant"] = name
    row["run_dir"] = str(run_dir) if args.runs_dir else None
    return row


def run_worker(task: tuple, log: Path, result_path: Path, threads: int) -> None:
    """A worker process: run_one with its output in `log`, its outcome in `result_path` (JSON:
    {"status": "ok", "row"} or {"status": "error", "error"}). Errors travel as text: the
    project's exceptions do not all survive pickling, and the parent names the failed run either way.
    A worker that dies without writing its result (a crash, a kill) is caught by its exit code."""
    import traceback

    torch.set_num_threads(threads)  # its share of the cores: N runs must not oversubscribe them
    with open(log, "w", encoding="utf-8") as f:  # fd-level, so the trainer's console and C code land there too
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
    sys.stdout = open(1, "w", encoding="utf-8", buffering=1, closefd=False)
    sys.stderr = open(2, "w", encoding="utf-8", buffering=1, closefd=False)
    try:
        outcome = {"status": "ok", "row": run_one(task)}
    except BaseException as e:  # noqa: BLE001 - a SIGINT's RunInterrupted too: reported, not re-raised
        traceback.print_exc()
        outcome = {"status": "error", "error": f"{type(e).__name__}: {e}"}
    write_json(result_path, outcome)


def tail(path: Path, lines: int = 3) -> str:
    try:
        return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def run_parallel(tasks: list[tuple], jobs: int, root: Path, done, failed) -> None:
    """Run `tasks` `jobs` at a time, each in a fresh spawned process (its own CUDA context, compile
    caches and dynamo state), calling `done(row)` as each finishes, or `failed(RunFailed)` for
    a run that fails or whose process dies: the others carry on (one bad variant must not cost a
    device session's whole search)."""
    import multiprocessing as mp

    spawn = mp.get_context("spawn")  # never fork: a child would inherit the parent's threads and CUDA state
    threads = max(1, (os.cpu_count() or 1) // jobs)
    queue, running = list(tasks), {}
    print(f"recipe_ablation: {len(tasks)} runs, {jobs} at a time; each run's log: {root}/VARIANT-seed-S.log",
          flush=True)
    try:
        while queue or running:
            while queue and len(running) < jobs:
                task = queue.pop(0)
                log, result = root / f"{task[0]}-seed-{task[2]}.log", root / f"{task[0]}-seed-{task[2]}.result.json"
                # not a daemon: a daemonic process may not start its own (compile workers)
                process = spawn.Process(target=run_worker, args=(task, log, result, threads))
                process.start()
                running[process] = (task, log, result)
            finished = [p for p in running if p.exitcode is not None]
            if not finished:
                time.sleep(0.5)
                continue
            for process in finished:  # as they finish, so the JSON grows as early as it can
                (name, _, seed, _, _), log, result = running.pop(process)
                outcome = json.loads(result.read_text(encoding="utf-8")) if result.is_file() else {
                    "status": "error", "error": f"its process ended with exit code {process.exitcode} "
                                                "and no result (crashed or killed)"}
                result.unlink(missing_ok=True)  # its content now lives in the ablation's JSON
                if outcome["status"] != "ok":
                    failed(RunFailed(name, seed, outcome["error"], log))
                    continue
                row = outcome["row"]
                print(f"recipe_ablation: {name} seed {seed} done: val {row['final_val_acc']}%\n{tail(log)}",
                      flush=True)
                done(row)
    finally:  # the parent stopped (a time limit, Ctrl-C): the runs still going would only hold the device
        for process in running:
            process.terminate()
        for process in running:
            process.join(10)


def main(argv: list[str]) -> int:
    args, overrides = parse_args(argv)
    variants = read_variants(args.variants, args.only)
    # every variant's config is built (and checked) before anything trains
    built = {name: variant_config(args.config, overrides, name, changes, args.val_size) for name, changes in variants.items()}
    configs = {name: cfg for name, (cfg, _) in built.items()}
    gflops = {name: flops for name, (_, flops) in built.items()}
    optimizers = {name: cfg.optim.name for name, cfg in configs.items()}
    base_cfg = configs["base"]
    check_runs_dir(args.runs_dir, [f"{name}-seed-{cfg.train.seed + i}" for name, cfg in configs.items()
                                   for i in range(args.seeds)], args.overwrite)
    # the provenance (seconds of imports and probes) up front: the first run to finish is then written
    # at once, not cut by a time limit while its metadata is gathered
    device = resolve_device(args.device)
    result = {"benchmark": "recipe_ablation", "meta": run_metadata(device), "config_name": base_cfg.name,
              "config": config_to_dict(base_cfg), "overrides": overrides, "variants_file": str(args.variants),
              "variants": variants, "val_size": args.val_size, "split": SPLIT, "targets": args.targets,
              "seeds": args.seeds, "jobs": args.jobs, "complete": False, "runs": [], "failed": [], "aggregate": {},
              "fastest": {}, "next": None}
    out = args.out or default_result_path("recipe_ablation", base_cfg.name, device)

    def judge() -> None:
        result["aggregate"] = summarize(result["runs"], args.targets, gflops, args.seeds, result["failed"], optimizers)
        result["fastest"] = fastest_reaching(result["aggregate"], {target_key(t): t for t in args.targets}, args.jobs)
        result["next"] = next_candidate(result)
        write_json(out, result)  # after every run: a time limit loses only the runs in flight

    def done(row: dict) -> None:
        result["runs"].append(row)
        result["runs"].sort(key=lambda r: order[r["variant"], r["seed"]])  # variants' order, whatever finished first
        judge()

    def failed(error: RunFailed) -> None:
        print(f"error: {error}", file=sys.stderr, flush=True)
        result["failed"].append(error.record)
        judge()

    with tempfile.TemporaryDirectory(prefix="fasttrain-ablation-") as tmp:
        root = args.runs_dir or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        tasks = [(name, cfg, cfg.train.seed + i, root / f"{name}-seed-{cfg.train.seed + i}", args)
                 for name, cfg in configs.items() for i in range(args.seeds)]
        order = {(name, seed): i for i, (name, _, seed, _, _) in enumerate(tasks)}
        if args.jobs == 1:
            for task in tasks:
                try:
                    done(run_one(task))
                except (TrainingError, torch.cuda.OutOfMemoryError) as e:  # a bad variant: the others still run
                    failed(RunFailed(task[0], task[2], f"{type(e).__name__}: {e}"))
        else:
            run_parallel(tasks, min(args.jobs, len(tasks)), root, done, failed)
    write_complete(out, result)
    print("\n".join(fastest_lines(result)))
    print_table(result)
    if result["failed"]:
        print(f"error: {len(result['failed'])} run(s) failed: "
              + ", ".join(f"{f['variant']} seed {f['seed']}" for f in result["failed"]), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    run_main(main)
