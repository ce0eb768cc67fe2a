"""Time to accuracy: train a config once per seed and report how long each takes to reach target accuracies.

    python benchmarks/time_to_accuracy.py --config configs/best.yaml [--seeds 5] [--targets apaper 94 95 96]
        [--device auto] [--out benchmarks/results/NAME.json] [--runs-dir DIR] [--section.key VALUE ...]

What is timed, and what is not:
* seed i trains with train.seed = (the config's seed) + i, evaluating the test set after every epoch
  (train.eval_every is forced to 1) so the epoch that first reaches a target is known exactly;
* the training clock is the sum of the metrics rows' `epoch_seconds` (each measured by the trainer
  between two device synchronizes), plus the stem's whitening before the first epoch and the final EMA
  BN recompute after the last (the summary's `train_seconds`); a time-to-target also counts the BN
  recomputes its evaluations needed. Per-epoch evaluation, logging and checkpoints are off the clock;
* torch.compile and cuDNN autotuning run on throwaway steps before the clock starts (the trainer's
  warmup, which restores every bit of state); their time is reported per seed as `compile_seconds`;
* time-to-target = the training clock at the end of the first epoch whose test accuracy (without
  test-time augmentation: TTA is only evaluated once, after the last epoch) reaches the target;
* `process_wall_seconds` is the whole script, from its start to writing the result file.

The result file is rewritten after every seed, `"complete": false` until the last: a run stopped by a
time limit keeps the seeds it finished, aggregated.
"""
from __future__ import annotations

import time

PROCESS_START = time.perf_counter()  # before the heavy imports: the end-to-end wall time includes them

import argparse  # noqa: E402
import copy  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

from common import (add_targets_argument, check_out, check_runs_dir, check_targets,  # noqa: E402
                    default_result_path, parse_known_overrides, release_memory, run_main, run_metadata,
                    wide_console, write_complete, write_json)
from recipe_verdict import yes_no  # noqa: E402
from rich.table import Table  # noqa: E402

from fasttrain.config import ConfigError, config_to_dict, load_config, validate  # noqa: E402
from fasttrain.evaluate import TTA_MODES  # noqa: E402
from fasttrain.trainer import Trainer  # noqa: E402


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, dict]:
    p = argparse.ArgumentParser(
        prog="python benchmarks/time_to_accuracy.py", allow_abbrev=False,
        description="Train a config over several seeds; report time to target test accuracies. "
                    "Any config key is a flag: --train.epochs 10")
    p.add_argument("--config", required=True, help="YAML config, e.g. configs/best.yaml")
    p.add_argument("--seeds", type=int, default=5, help="number of seeds (train.seed + 0 .. seeds-1; default 5)")
    add_targets_argument(p, [94.0, 95.0, 96.0], "test")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    p.add_argument("--out", type=Path, help="result JSON (default: benchmarks/results/"
                                            "time_to_accuracy-CONFIG-DEVICE-TIME.json)")
    p.add_argument("--runs-dir", type=Path, help="keep the seeds' run folders here (default: a temporary "
                                                 "folder, deleted at the end)")
    p.add_argument("--overwrite", action="store_true", help="replace runs already in --runs-dir")
    args, overrides = parse_known_overrides(p, argv)
    if args.seeds < 1:
        raise ConfigError(f"--seeds {args.seeds}: need at least 1")
    check_targets(args.targets)
    check_out(args.out)
    return args, overrides


def target_key(target: float) -> str:
    return f"{target:g}"  # 94.0 -> "94", 95.5 -> "95.5": the JSON keys


# ------------------------------------------------------------------------------------- per-epoch data
def read_epochs(metrics_path: Path, start: float = 0.0, final: float = 0.0) -> list[dict]:
    """The run's metrics rows, with the training clock accumulated epoch by epoch. It starts at `start`,
    the training work before the first epoch (the stem's whitening, summary stem_init_seconds), and the
    last epoch's takes `final` too, the work that makes the final model after it (the EMA's last BN
    recompute, ema_bn_seconds): the clock then ends at the summary's train_seconds.

    `eval_ema_bn_seconds`: the EMA's BN recompute that an earlier epoch's evaluation needed. The run
    did it off its clock (the run goes on from the unchanged training state), but a run stopped there
    to use that model would have paid it, so time_to_target adds it."""
    epochs, clock = [], start
    rows = [json.loads(line) for line in metrics_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    for i, row in enumerate(rows):
        clock += row["epoch_seconds"] + (final if i == len(rows) - 1 else 0.0)
        epochs.append({"epoch": row["epoch"], "test_acc": row["test_acc"], "val_acc": row.get("val_acc"),
                       "epoch_seconds": row["epoch_seconds"], "train_seconds": clock,
                       "eval_ema_bn_seconds": row.get("eval_ema_bn_seconds") or 0.0})
    return epochs


def time_to_target(epochs: list[dict], target: float, split: str = "test") -> tuple[float | None, int | None]:
    """(training seconds, epoch) at the end of the first epoch whose `split` accuracy >= target, else
    (None, None); the seconds include the BN recompute that epoch's evaluated EMA model needed."""
    for e in epochs:
        if e[f"{split}_acc"] is not None and e[f"{split}_acc"] >= target:
            return e["train_seconds"] + e["eval_ema_bn_seconds"], e["epoch"]
    return None, None


# ------------------------------------------------------------------------------------- one seed
def check_reports_the_test_set(cfg) -> None:
    """Refuse, before any seed trains, a config that would not give the test-set figure this script is
    for: one that never scores the test set (every accuracy null), or one that trains on fewer images
    than the whole training set (issue 6: the final measurement trains on all 50,000)."""
    if not cfg.train.eval_test:
        raise ConfigError("train.eval_test is false: time_to_accuracy.py times test accuracy; pass "
                          "--train.eval_test true (recipe_ablation.py tunes on the validation split)")
    if cfg.data.val_size:
        raise ConfigError(f"data.val_size is {cfg.data.val_size}: time_to_accuracy.py reports the test set of a "
                          "run on the whole training set; pass --data.val_size 0 (recipe_ablation.py tunes on "
                          "the validation split)")


def seed_config(base, seed: int, run_dir: Path):
    cfg = copy.deepcopy(base)
    cfg.train.seed = seed
    cfg.train.eval_every = 1  # every epoch: time-to-target is then exact, and evaluation is off the clock
    cfg.output.dir = str(run_dir)
    validate(cfg)
    return cfg


def run_seed(cfg, args, run_dir: Path, split: str = "test") -> tuple[dict, object]:
    """Train one seed; return its result row (accuracies of `split`: test, or val when tuning) and the
    torch device it ran on."""
    t0 = time.perf_counter()
    if cfg.train.compile:
        import torch._dynamo

        # Each seed compiles its own model: without a reset, the earlier seeds' graphs fill dynamo's
        # recompile limit and a later seed could silently run eager. The on-disk caches stay warm.
        torch._dynamo.reset()
    trainer = Trainer(cfg, device=args.device, run_dir=run_dir, overwrite=args.overwrite)
    summary = trainer.fit()  # compile, CUDA-graph capture and cuDNN autotuning warm up off its clock
    # every TTA mode's final accuracy: fit() measured none and train.tta's mode, the others are measured
    # here, off the clock (a few passes over the split)
    measured = {"none": summary[f"final_{split}_acc"]}
    if cfg.train.tta != "none":
        measured[cfg.train.tta] = summary[f"final_{split}_acc_tta"]
    missing = [mode for mode in TTA_MODES if measured.get(mode) is None]
    measured.update(trainer.accuracy_by_tta(missing).get(split, {}) if missing else {})
    by_tta = {mode: measured[mode] for mode in TTA_MODES if measured.get(mode) is not None} or None
    epochs = read_epochs(run_dir / "metrics.jsonl", start=summary.get("stem_init_seconds") or 0.0,
                         final=summary.get("ema_bn_seconds") or 0.0)
    row = {
        "seed": cfg.train.seed,
        f"final_{split}_acc": summary[f"final_{split}_acc"],
        f"final_{split}_acc_tta": summary[f"final_{split}_acc_tta"],
        f"final_{split}_acc_by_tta": by_tta,  # {none, flip, flip_shift: accuracy}, whatever train.tta is
        f"best_{split}_acc": max((e[f"{split}_acc"] for e in epochs if e[f"{split}_acc"] is not None), default=None),
        "train_seconds": epochs[-1]["train_seconds"] if epochs else 0.0,
        "compile_seconds": summary["compile_seconds"],
        "seed_wall_seconds": time.perf_counter() - t0,
        "time_to_target": {}, "epochs_to_target": {},
        "epochs": epochs,
        "run_dir": str(run_dir),
    }
    for target in args.targets:
        row["time_to_target"][target_key(target)], row["epochs_to_target"][target_key(target)] = \
            time_to_target(epochs, target, split)
    device = trainer.device
    del trainer  # the last reference: release_memory can free it before the next seed builds
    release_memory()
    return row, device


# ------------------------------------------------------------------------------------- aggregate
def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (n - 1); the std needs two seeds, else None."""
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def aggregate(rows: list[dict], targets: list[float], split: str = "test") -> dict:
    acc_mean, acc_std = _mean_std([r[f"final_{split}_acc"] for r in rows])
    tta_mean, tta_std = _mean_std([r[f"final_{split}_acc_tta"] for r in rows])
    modes = [m for m in TTA_MODES if all((r.get(f"final_{split}_acc_by_tta") or {}).get(m) is not None for r in rows)]
    out = {
        "seeds": len(rows),
        f"final_{split}_acc_mean": acc_mean, f"final_{split}_acc_std": acc_std,
        f"final_{split}_acc_tta_mean": tta_mean, f"final_{split}_acc_tta_std": tta_std,
        # every TTA mode's mean (train.tta's own and the others), where every seed measured it
        f"final_{split}_acc_by_tta_mean": {m: _mean_std([r[f"final_{split}_acc_by_tta"][m] for r in rows])[0]
                                           for m in modes},
        f"best_{split}_acc_mean": _mean_std([r[f"best_{split}_acc"] for r in rows])[0],
        "train_seconds_median": statistics.median(r["train_seconds"] for r in rows),
        # the compile warmup, off the clock: the first seed's is the cold compile, later seeds hit the caches
        "compile_seconds_first": rows[0]["compile_seconds"] if rows else None,
        "compile_seconds_total": sum(r["compile_seconds"] for r in rows),
        "targets": {},
    }
    for target in targets:
        key = target_key(target)
        times = [r["time_to_target"][key] for r in rows if r["time_to_target"][key] is not None]
        epochs = [r["epochs_to_target"][key] for r in rows if r["epochs_to_target"][key] is not None]
        out["targets"][key] = {
            "reached": len(times),
            "fraction_reached": len(times) / len(rows),
            # over the seeds that reached it only: a seed that never gets there has no time to rank
            "median_time_to_target": statistics.median(times) if times else None,
            "median_epochs_to_target": statistics.median(epochs) if epochs else None,
            # the recipe's own verdict (issue 6: the mean final accuracy over the seeds reaches the
            # target), without and with its test-time augmentation; None where that was not measured
            "mean_final_reaches": None if acc_mean is None else acc_mean >= target,
            "mean_final_tta_reaches": None if tta_mean is None else tta_mean >= target,
            "mean_final_by_tta_reaches": {m: acc >= target for m, acc in out[f"final_{split}_acc_by_tta_mean"].items()},
        }
        # the recipe's time to the target when its verdict rests on the final accuracy (TTA scores only
        # the finished run, and a decay-to-zero schedule peaks at its end): the whole training clock,
        # the seeds' median, per TTA mode whose mean final reaches the target; null where it does not
        reaches = out["targets"][key]["mean_final_by_tta_reaches"]
        out["targets"][key]["time_by_mean_final"] = {m: out["train_seconds_median"] if ok else None
                                                     for m, ok in reaches.items()}
    return out


# ------------------------------------------------------------------------------------- printing
def _fmt(value, spec: str, unit: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{unit}"


def print_tables(result: dict) -> None:
    console = wide_console()
    keys = [target_key(t) for t in result["targets"]]
    seeds = Table(title=f"time to accuracy: {result['config']['name']} on {result['meta']['device']}")
    for col in ("seed", "final %", "final TTA %", "best %", "train s", "compile s", *[f"s to {k}%" for k in keys]):
        seeds.add_column(col, justify="right")
    for r in result["runs"]:
        seeds.add_row(str(r["seed"]), _fmt(r["final_test_acc"], ".2f"), _fmt(r["final_test_acc_tta"], ".2f"),
                      _fmt(r["best_test_acc"], ".2f"), _fmt(r["train_seconds"], ".2f"),
                      _fmt(r["compile_seconds"], ".1f"), *[_fmt(r["time_to_target"][k], ".2f") for k in keys])
    agg = result["aggregate"]
    summary = Table(
        title=f"over {agg['seeds']} seed(s); process wall {result['process_wall_seconds']:.1f} s",
        caption=f"final test accuracy: mean {_fmt(agg['final_test_acc_mean'], '.2f', '%')}, std "
                f"{_fmt(agg['final_test_acc_std'], '.2f')}; "
                + (f"with {result['config']['train']['tta']} TTA: mean {_fmt(agg['final_test_acc_tta_mean'], '.2f', '%')}, "
                   f"std {_fmt(agg['final_test_acc_tta_std'], '.2f')}; " if result['config']['train']['tta'] != "none" else "")
                + "".join(f"TTA {mode}: mean {acc:.2f}%; " for mode, acc in agg.get("final_test_acc_by_tta_mean", {}).items())
                + "median time over the seeds reaching the target")
    for col in ("target %", "seeds reaching", "fraction", "median time s", "median epochs", "mean final reaches",
                "with TTA", "time s by the mean final"):
        summary.add_column(col, justify="right")
    for k in keys:
        t = agg["targets"][k]
        by_final = ", ".join(f"{m} {_fmt(sec, '.1f')}" for m, sec in t.get("time_by_mean_final", {}).items())
        summary.add_row(k, f"{t['reached']}/{agg['seeds']}", f"{t['fraction_reached']:.2f}",
                        _fmt(t["median_time_to_target"], ".2f"), _fmt(t["median_epochs_to_target"], "g"),
                        yes_no(t["mean_final_reaches"]), yes_no(t["mean_final_tta_reaches"]), by_final or "-")
    console.print(seeds)
    console.print(summary)


# ------------------------------------------------------------------------------------- main
def run_all(args, base, runs_root: Path, done) -> None:
    """The seeds one after the other (their times are the device's alone), `done(row, device)` after each."""
    base_seed = base.train.seed
    for i in range(args.seeds):
        seed = base_seed + i
        done(*run_seed(seed_config(base, seed, runs_root / f"seed-{seed}"), args, runs_root / f"seed-{seed}"))


def main(argv: list[str]) -> int:
    args, overrides = parse_args(argv)
    base = load_config(args.config, overrides)
    base.train.eval_every = 1
    check_reports_the_test_set(base)
    check_runs_dir(args.runs_dir, [f"seed-{base.train.seed + i}" for i in range(args.seeds)], args.overwrite)
    result = {"benchmark": "time_to_accuracy", "meta": None, "config": config_to_dict(base), "seeds": [],
              "targets": args.targets, "runs": [], "aggregate": None, "complete": False, "process_wall_seconds": None}
    out = None

    def done(row: dict, device) -> None:
        """After every seed the result file is rewritten (`complete` false until the last): a run cut by
        a time limit keeps the seeds it finished, with their aggregate."""
        nonlocal out
        if args.runs_dir is None:
            row["run_dir"] = None  # deleted with the temporary folder: pass --runs-dir to keep the runs
        result["runs"].append(row)
        result["seeds"].append(row["seed"])
        result["meta"] = result["meta"] or run_metadata(device)
        result["aggregate"] = aggregate(result["runs"], args.targets)
        result["process_wall_seconds"] = time.perf_counter() - PROCESS_START
        out = out or args.out or default_result_path("time_to_accuracy", base.name, device)
        write_json(out, result)

    if args.runs_dir is not None:
        run_all(args, base, args.runs_dir, done)
    else:
        with tempfile.TemporaryDirectory(prefix="fasttrain-tta-") as tmp:
            run_all(args, base, Path(tmp), done)
    result["process_wall_seconds"] = time.perf_counter() - PROCESS_START
    write_complete(out, result)
    print_tables(result)  # last, so it is what a terminal or a log ends with
    return 0


if __name__ == "__main__":
    run_main(main)
