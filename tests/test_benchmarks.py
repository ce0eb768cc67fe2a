"""The benchmark scripts on a CPU, tiny: well-formed results, and timing arithmetic that holds up.

The scripts run as subprocesses, exactly as a user runs them. Their numbers are recomputed here from
independent data (the run folders' metrics.jsonl, the timed windows), not just checked for presence.
"""
import importlib
import json
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import tarfile
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from fasttrain.config import load_config
from fasttrain.evaluate import evaluate_checkpoint
from fasttrain.model import build_model, forward_flops

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
META_KEYS = {"device", "versions", "host", "git_sha", "command", "timestamp"}
VERSION_KEYS = {"torch", "triton", "dali"}


@pytest.fixture(scope="module")
def bench(repo_root):
    """The scripts' modules, imported from benchmarks/ as the scripts import each other."""
    sys.path.insert(0, str(repo_root / "benchmarks"))
    try:
        yield {name: importlib.import_module(name) for name in ("common", "time_to_accuracy", "throughput",
                                                                "gpu_summary", "recipe_ablation", "recipe_verdict",
                                                                "bench_loader", "se_gate_check")}
    finally:
        sys.path.remove(str(repo_root / "benchmarks"))


def table_rows(text: str) -> list[dict]:
    """A rich table's rows as {column: cell} (one-line cells), read from its printed text."""
    header, rows = None, []
    for line in text.splitlines():
        cells = [c.strip() for c in re.split("[│┃]", line.strip())[1:-1]]
        if line.lstrip().startswith("┃"):
            header = cells
        elif line.lstrip().startswith("│") and header:
            rows.append(dict(zip(header, cells)))
    return rows


def run_script(repo_root, cifar_dir, *args):
    env = dict(os.environ, FASTTRAIN_DATA=str(cifar_dir),
               # one OpenMP thread: on 2 shared cores two spin-waiting threads are slower and far noisier
               OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)  # the SE row runs the PyTorch reference on a CPU, not the interpreter
    proc = subprocess.run([sys.executable, *map(str, args)], cwd=repo_root, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc


# ------------------------------------------------------------------------------------- time to accuracy
def test_time_to_target_is_the_clock_at_the_first_epoch_reaching_it(bench):
    tta = bench["time_to_accuracy"]
    epochs = [{"epoch": i + 1, "test_acc": acc, "train_seconds": 2.0 * (i + 1), "eval_ema_bn_seconds": 0.0}
              for i, acc in enumerate([20.0, 50.0, 40.0, 60.0])]
    assert tta.time_to_target(epochs, 45.0) == (4.0, 2)  # epoch 2, not the later epochs above it
    assert tta.time_to_target(epochs, 20.0) == (2.0, 1)  # reaching = equal counts
    assert tta.time_to_target(epochs, 60.5) == (None, None)
    epochs[1]["eval_ema_bn_seconds"] = 0.25  # the EMA's BN recompute that epoch 2's evaluation needed
    assert tta.time_to_target(epochs, 45.0) == (4.25, 2)


def test_the_clock_takes_the_work_before_the_first_epoch_and_after_the_last(bench, tmp_path):
    """read_epochs: the stem's whitening (stem_init_seconds) before epoch 1, the EMA's final BN recompute
    (ema_bn_seconds) after the last: its clock ends where the trainer's train_seconds does."""
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"epoch": e, "test_acc": 50.0, "epoch_seconds": 2.0}) + "\n" for e in (1, 2, 3)))
    epochs = bench["time_to_accuracy"].read_epochs(path, start=0.5, final=0.25)
    assert [e["train_seconds"] for e in epochs] == [2.5, 4.5, 6.75]
    assert [e["train_seconds"] for e in bench["time_to_accuracy"].read_epochs(path)] == [2.0, 4.0, 6.0]


def test_aggregate_medians_only_over_seeds_that_reached(bench):
    tta = bench["time_to_accuracy"]
    rows = [{"final_test_acc": a, "final_test_acc_tta": None, "best_test_acc": a, "train_seconds": 10.0,
             "compile_seconds": c, "time_to_target": {"90": t}, "epochs_to_target": {"90": e}}
            for a, t, e, c in [(91.0, 3.0, 3, 27.5), (89.0, None, None, 4.0), (93.0, 5.0, 4, 3.5)]]
    agg = tta.aggregate(rows, [90.0])
    assert (agg["compile_seconds_first"], agg["compile_seconds_total"]) == (27.5, 35.0)  # the cold compile, all
    assert agg["final_test_acc_mean"] == pytest.approx(91.0)
    assert agg["final_test_acc_std"] == pytest.approx(2.0)  # sample std (n - 1)
    assert agg["final_test_acc_tta_mean"] is None
    assert agg["targets"]["90"] == {"reached": 2, "fraction_reached": pytest.approx(2 / 3),
                                    "median_time_to_target": 4.0, "median_epochs_to_target": 3.5,
                                    "mean_final_reaches": True, "mean_final_tta_reaches": None,
                                    "mean_final_by_tta_reaches": {},  # rows without by-mode figures
                                    "time_by_mean_final": {}}
    # the recipe's verdict is the mean's: 2 of 3 seeds reach 91, the mean (91.0) does; no seed reaches 92
    with_tta = [dict(r, final_test_acc_tta=r["final_test_acc"] + 1.5, time_to_target={"91": None, "92": None},
                     epochs_to_target={"91": None, "92": None}) for r in rows]
    verdict = tta.aggregate(with_tta, [91.0, 92.0])["targets"]
    assert (verdict["91"]["mean_final_reaches"], verdict["91"]["mean_final_tta_reaches"]) == (True, True)
    assert (verdict["92"]["mean_final_reaches"], verdict["92"]["mean_final_tta_reaches"]) == (False, True)
    # the recipe's time where its verdict rests on the mean final: the median training clock (31 s of 30, 31
    # and a slow 100: one slow seed moves a mean, not the median), per TTA mode
    by_mode = [dict(r, train_seconds=sec, final_test_acc_by_tta={"none": r["final_test_acc"],
                                                                  "flip": r["final_test_acc"] + 1.5})
               for r, sec in zip(with_tta, (30.0, 100.0, 31.0))]
    timed = tta.aggregate(by_mode, [91.0, 92.0])
    assert timed["train_seconds_median"] == 31.0
    times = timed["targets"]
    assert times["91"]["time_by_mean_final"] == {"none": 31.0, "flip": 31.0}
    assert times["92"]["time_by_mean_final"] == {"none": None, "flip": 31.0}


def test_a_paper_is_the_mean_final_accuracy_of_the_recorded_paper_runs(bench, tmp_path, capsys, monkeypatch):
    """A_paper (`--targets apaper`) from the recorded seed.yaml runs: recomputed here from their
    metrics.jsonl (the last epoch's test accuracy), and refused from anything but 2+ finished runs."""
    runs = sorted(bench["common"].APAPER_RUNS.glob("*/metrics.jsonl"))
    last = [json.loads(path.read_text().splitlines()[-1]) for path in runs]
    assert len(last) >= 2 and all(row["epoch"] == 200 for row in last)
    expected = round(statistics.fmean(row["test_acc"] for row in last), 2)
    assert bench["common"].a_paper() == expected == 92.52
    parse = bench["time_to_accuracy"].parse_args
    assert parse(["--config", "c.yaml", "--targets", "apaper", "94"])[0].targets == [expected, 94.0]
    assert parse(["--config", "c.yaml"])[0].targets == [94.0, 95.0, 96.0]  # issue 5's default
    with pytest.raises(SystemExit):
        parse(["--config", "c.yaml", "--targets", "ninety"])
    assert "'ninety' is not an accuracy: give a percentage such as 94, or apaper" in capsys.readouterr().err

    one = tmp_path / "one" / "seed-0"
    one.mkdir(parents=True)
    (one / "summary.json").write_text(json.dumps({"name": "seed", "epochs": 200, "final_test_acc": 92.0}))
    with pytest.raises(ValueError, match="at least 2 seeds"):
        bench["common"].a_paper(tmp_path / "one")
    (tmp_path / "one" / "seed-1").mkdir()
    (tmp_path / "one" / "seed-1" / "summary.json").write_text(
        json.dumps({"name": "seed", "epochs": 3, "final_test_acc": 70.0}))
    with pytest.raises(ValueError, match="not a finished 200-epoch run"):
        bench["common"].a_paper(tmp_path / "one")
    for i, acc in enumerate((90.0, 91.0, 95.0)):  # three runs: their mean (92.0), not the median (91.0)
        (tmp_path / "three" / f"seed-{i}").mkdir(parents=True)
        (tmp_path / "three" / f"seed-{i}" / "summary.json").write_text(
            json.dumps({"name": "seed", "epochs": 200, "final_test_acc": acc}))
    assert bench["common"].a_paper(tmp_path / "three") == 92.0

    # `--targets apaper` over such runs says why on the command line (argparse drops a ValueError's words)
    real = bench["common"].a_paper
    monkeypatch.setattr(bench["common"], "a_paper", lambda: real(tmp_path / "one"))
    with pytest.raises(SystemExit):
        parse(["--config", "c.yaml", "--targets", "apaper"])
    assert "apaper: " in (err := capsys.readouterr().err) and "is not a finished 200-epoch run" in err, err


@pytest.mark.parametrize("extra, message", [
    (["--target", "50"], "unknown option --target: did you mean --targets?"),  # the script's own, suggested
    (["--resume", "auto"], "unknown option --resume: the options are --config, --seeds, --targets"),
    (["--targets", "0.94"], "accuracies are percentages (94, not 0.94)"),
    (["--targets", "925"], "accuracies are percentages in 0..100"),  # 92.5 mistyped: no run ever reaches it
    (["--seeds", "0"], "--seeds 0: need at least 1"),
    (["--out", "/proc/nowhere/t.json"], "--out /proc/nowhere/t.json: cannot write there"),
    (["--out", "HELD"], "is a folder: --out names the result file"),  # its probe wrote beside it: passed
    # every seed trained, then a result of null accuracies (or a figure from 45,000 images) marked complete
    (["--data.val_size", "100", "--train.eval_test", "false"], "train.eval_test is false: time_to_accuracy.py times"),
    (["--data.val_size", "100"], "data.val_size is 100: time_to_accuracy.py reports the test set"),
    (["--runs-dir", "HELD"], "already holds runs (seed-1): pass --overwrite to replace them, or another --runs-dir"),
])
def test_time_to_accuracy_refuses_before_training(repo_root, cifar_dir, tmp_path, extra, message):
    """Bad flags, a fraction for a percentage, an --out that cannot be written and a --runs-dir that
    holds a run are refused up front, in one line, before any seed trains (found one by one, the
    later ones used to cost the runs before them, on a GPU session's clock)."""
    held = tmp_path / "held"
    (held / "seed-1").mkdir(parents=True)
    (held / "seed-1" / "config.yaml").write_text("name: earlier\n")
    extra = [str(held) if arg == "HELD" else arg for arg in extra]
    env = dict(os.environ, FASTTRAIN_DATA=str(cifar_dir))
    proc = subprocess.run([sys.executable, "benchmarks/time_to_accuracy.py", "--config", "configs/smoke.yaml",
                           "--seeds", "2", "--device", "cpu", "--train.epochs", "1", *extra], cwd=repo_root, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and not (held / "seed-0").exists()  # nothing trained


@pytest.mark.parametrize("extra, code, message", [
    (["--config", "configs/nope.yaml"], 2, "error: config file 'configs/nope.yaml' not found"),
    (["--data", "/nonexistent"], 1, "error: no CIFAR-10 in /nonexistent"),
    (["--images", "0"], 2, "error: --images must be >= 1"),
    *[([flag, "0", "--out", "OUT"], 2, f"error: {flag} must be >= 1")  # else nothing measured, or a division by 0
      for flag in ("--batch-size", "--epochs", "--steps")],
    (["--loaders", "torch,foo"], 2, "error: --loaders: unknown loader(s) foo"),
    (["--out", "/proc/nowhere/l.json"], 2, "error: --out /proc/nowhere/l.json: cannot write there"),
])
def test_bench_loader_bad_input_is_one_error_line(repo_root, tmp_path, extra, code, message):
    extra = [str(tmp_path / "l.json") if arg == "OUT" else arg for arg in extra]  # never the repo's results
    proc = subprocess.run([sys.executable, "benchmarks/bench_loader.py", "--cpu-smoke", *extra], cwd=repo_root,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == code and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_time_to_accuracy_script(repo_root, cifar_dir, tmp_path):
    out, runs = tmp_path / "tta.json", tmp_path / "runs"
    proc = run_script(repo_root, cifar_dir, "benchmarks/time_to_accuracy.py", "--config", "configs/smoke.yaml",
                      "--seeds", "2", "--targets", "0", "100", "--device", "cpu", "--out", out,
                      "--runs-dir", runs, "--data.train_subset", "128", "--data.test_subset", "100",
                      "--train.epochs", "2", "--model.blocks", "[1,1,1]", "--output.progress", "false",
                      "--train.tta", "flip", "--model.stem_init", "whiten",
                      "--train.ema_decay", "0.9", "--train.ema_bn", "recompute")
    tail = proc.stdout[proc.stdout.rindex("wrote "):]
    assert "seeds reaching" in tail and proc.stdout.rstrip().endswith("reaching the target")  # the table is last
    result = json.loads(out.read_text())
    assert META_KEYS <= result["meta"].keys() and VERSION_KEYS <= result["meta"]["versions"].keys()
    host = result["meta"]["host"]  # host-bound figures depend on it: which CPU, how many, how busy
    assert host["cpus"] == os.cpu_count() and 1 <= host["usable_cpus"] <= host["cpus"] and host["loadavg_1m"] >= 0
    assert "--seeds 2" in result["meta"]["command"]
    assert result["config"]["name"] == "smoke" and result["config"]["train"]["eval_every"] == 1
    assert result["seeds"] == [0, 1] and [r["seed"] for r in result["runs"]] == [0, 1]

    for row in result["runs"]:
        # recompute from the run's own metrics file, not from what the script stored
        metrics = [json.loads(line) for line in (runs / f"seed-{row['seed']}" / "metrics.jsonl").read_text().splitlines()]
        summary = json.loads((runs / f"seed-{row['seed']}" / "summary.json").read_text())
        # the clock starts with the stem's whitening (training work before the first epoch) ...
        assert summary["stem_init_seconds"] > 0
        clock = [summary["stem_init_seconds"] + sum(m["epoch_seconds"] for m in metrics[:i + 1])
                 for i in range(len(metrics))]
        clock[-1] += summary["ema_bn_seconds"]  # ... the last epoch makes the final model: the EMA's BN recompute
        assert summary["ema_bn_seconds"] > 0 and metrics[-1]["eval_ema_bn_seconds"] == 0.0  # counted once
        assert row["train_seconds"] == pytest.approx(clock[-1])
        assert row["train_seconds"] == pytest.approx(summary["train_seconds"])  # ... and ends at the trainer's
        # any accuracy reaches 0%: epoch 1, whose evaluated EMA model needed its own BN recompute
        assert metrics[0]["eval_ema_bn_seconds"] > 0
        assert row["time_to_target"]["0"] == pytest.approx(clock[0] + metrics[0]["eval_ema_bn_seconds"])
        assert row["epochs_to_target"]["0"] == 1
        assert row["time_to_target"]["100"] is None and row["epochs_to_target"]["100"] is None
        assert row["final_test_acc"] == metrics[-1]["test_acc"]
        # every TTA mode's final accuracy: none and train.tta's flip as the run measured them, ...
        assert set(row["final_test_acc_by_tta"]) == {"none", "flip", "flip_shift"}
        assert row["final_test_acc_by_tta"]["none"] == row["final_test_acc"]
        assert row["final_test_acc_by_tta"]["flip"] == row["final_test_acc_tta"] is not None
        # ... and the others scored after it, off the clock: what `eval` makes of its checkpoint
        assert row["final_test_acc_by_tta"]["flip_shift"] == pytest.approx(evaluate_checkpoint(
            runs / f"seed-{row['seed']}" / "last.pt", tta="flip_shift", device="cpu", data_dir=str(cifar_dir))["test_acc"])
        assert row["best_test_acc"] == max(m["test_acc"] for m in metrics)
        assert row["compile_seconds"] == 0.0  # no compile, and no autotuning warmup on a CPU
        assert [e["test_acc"] for e in row["epochs"]] == [m["test_acc"] for m in metrics]

    agg = result["aggregate"]
    assert agg["final_test_acc_mean"] == pytest.approx(statistics.fmean(r["final_test_acc"] for r in result["runs"]))
    assert agg["targets"]["0"]["fraction_reached"] == 1.0
    assert agg["targets"]["0"]["median_time_to_target"] == pytest.approx(
        statistics.median(r["time_to_target"]["0"] for r in result["runs"]))
    assert agg["targets"]["100"] == {"reached": 0, "fraction_reached": 0.0, "median_time_to_target": None,
                                     "median_epochs_to_target": None, "mean_final_reaches": False,
                                     "mean_final_tta_reaches": None if agg["final_test_acc_tta_mean"] is None else False,
                                     "mean_final_by_tta_reaches": {"none": False, "flip": False, "flip_shift": False},
                                     "time_by_mean_final": {"none": None, "flip": None, "flip_shift": None}}
    assert agg["targets"]["0"]["mean_final_reaches"] is True
    assert agg["targets"]["0"]["time_by_mean_final"] == {mode: agg["train_seconds_median"]
                                                         for mode in ("none", "flip", "flip_shift")}
    assert agg["final_test_acc_by_tta_mean"]["flip_shift"] == pytest.approx(
        statistics.fmean(r["final_test_acc_by_tta"]["flip_shift"] for r in result["runs"]))
    assert result["process_wall_seconds"] > sum(r["train_seconds"] for r in result["runs"])


def test_time_to_accuracy_reports_the_compile_warmup_off_the_clock(repo_root, cifar_dir, tmp_path):
    """With train.compile the warmup compiles (on throwaway steps) before the clock: its seconds are the
    seed's compile_seconds, as the run's summary has them, and none of them are in the training clock."""
    out, runs = tmp_path / "tta.json", tmp_path / "runs"
    run_script(repo_root, cifar_dir, "benchmarks/time_to_accuracy.py", "--config", "configs/smoke.yaml",
               "--seeds", "1", "--targets", "0", "--device", "cpu", "--out", out, "--runs-dir", runs,
               "--data.train_subset", "128", "--data.test_subset", "100", "--train.epochs", "1",
               "--model.blocks", "[1,1,1]", "--output.progress", "false", "--train.compile", "true")
    (row,) = json.loads(out.read_text())["runs"]
    summary = json.loads((runs / "seed-0" / "summary.json").read_text())
    assert row["compile_seconds"] == summary["compile_seconds"] > 0
    agg = json.loads(out.read_text())["aggregate"]
    assert agg["compile_seconds_first"] == agg["compile_seconds_total"] == row["compile_seconds"]
    (metrics,) = [json.loads(line) for line in (runs / "seed-0" / "metrics.jsonl").read_text().splitlines()]
    assert row["train_seconds"] == pytest.approx(metrics["epoch_seconds"])  # the clock: the epoch alone
    # ... and the epoch did not compile again (a warmup whose graphs the timed steps miss would recompile,
    # on the clock: seconds of inductor against the milliseconds of 128 images through the compiled net)
    assert metrics["epoch_seconds"] < 0.25 * row["compile_seconds"], (metrics["epoch_seconds"], row["compile_seconds"])


# ------------------------------------------------------------------------------------- throughput
@pytest.mark.gpu
def test_cuda_times_are_the_gpus_unless_the_host_is_asked_for(bench):
    """~2 ms of Python around ~10 us of GPU work: the default timing holds the GPU back until the work is
    queued, so it reports the GPU's time; include_host charges the host's 2 ms (the first GPU session's
    fwd+bwd SE times, 0.6-1.1 ms for every implementation, most likely held such host time)."""
    import time

    common, x = bench["common"], torch.ones(1 << 20, device="cuda")

    def host_heavy():
        time.sleep(0.002)
        x.mul_(1.0)

    gpu = statistics.median(common.cuda_times_ms(host_heavy, warmup=6, iters=10, flush_l2=False))
    host = statistics.median(common.cuda_times_ms(host_heavy, warmup=6, iters=10, flush_l2=False, include_host=True))
    assert gpu < 0.5 < 1.5 < host, (gpu, host)


@pytest.mark.gpu
def test_timer_on_a_gpu_reports_seconds(bench):
    """Timer on a GPU reads CUDA events, whose elapsed_time is in milliseconds, and reports seconds: ~50 ms
    of GPU spin (torch.cuda._sleep, sized by the spin rate cuda_times_ms measures) times within 20% of the
    host's clock around it, which the Timer's synchronize at entry and wait on its end event bracket."""
    import time

    common, device = bench["common"], torch.device("cuda", torch.cuda.current_device())
    cycles = int(50 * common._spin_cycles_per_ms(device.index))
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with common.Timer(device) as timer:
        torch.cuda._sleep(cycles)
    host = time.perf_counter() - t0
    assert 0.02 < timer.seconds < 0.5 and timer.seconds == pytest.approx(host, rel=0.2), (timer.seconds, host)


def test_bf16_peak_table(bench):
    peak = bench["common"].bf16_peak_tflops
    assert peak("NVIDIA H100 80GB HBM3") == 989.0
    assert peak("NVIDIA H100 PCIe") == 756.0
    assert peak("NVIDIA H200") == 989.0
    assert peak("NVIDIA H200 NVL") == 835.0  # not the SXM board's figure
    assert peak("NVIDIA H100 NVL") is None  # neither PCIe nor SXM: no guess
    assert peak("NVIDIA A100-SXM4-40GB") == 312.0
    assert peak("NVIDIA GeForce RTX 4090") is None  # unknown: no guess


def test_speedup_and_share_of_the_bf16_peak(bench):
    """Row 1 is the base of every speed-up; the FLOP rate is images/s x training FLOPs per image (3 x the
    model's forward count) against the card's peak: the paper's network at the issue's 80,000 img/s on an
    H100 is 3 x 1.597 GFLOP x 80,000 = 383 TFLOP/s, 39% of 989."""
    tp = bench["throughput"]
    train_flops = tp.TRAIN_FLOPS_PER_FORWARD * 2 * 798_690_304  # seed.yaml: 798,690,304 multiply-adds
    rows = [{"step": "1", "status": "ok", "images_per_second": 5_000.0},
            {"step": "7", "status": "ok", "images_per_second": 80_000.0},
            {"step": "9", "status": "skipped", "images_per_second": None}]
    tp.add_ratios(rows, train_flops, 989.0)
    assert [r["speedup"] for r in rows] == [1.0, 16.0, None]
    assert rows[1]["tflops"] == pytest.approx(383.37, abs=0.01)
    assert rows[1]["bf16_peak_fraction"] == pytest.approx(0.3876, abs=1e-4)
    assert rows[2]["tflops"] is None and rows[2]["bf16_peak_fraction"] is None
    tp.add_ratios(rows, train_flops, None)  # a card without a datasheet peak: no share, never a guess
    assert rows[1]["bf16_peak_fraction"] is None and rows[1]["speedup"] == 16.0
    rows[0]["status"] = "failed"  # no row 1: no speed-ups
    tp.add_ratios(rows, train_flops, 989.0)
    assert rows[1]["speedup"] is None


def test_unavailable_feature_skips_its_row_and_is_dropped_later(bench, tmp_path):
    tp = bench["throughput"]
    variants = {v.step: v for v in tp.ablation(128, [128, 512])}
    assert list(variants) == ["1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11", "12", "13", "7@512", "8@512",
                              "9@512", "11@512", "12@512", "13@512"]
    assert variants["9"].knobs == replace(variants["7"].knobs, cuda_graph=True)
    assert variants["10"].knobs == replace(variants["7"].knobs, compile_mode="reduce-overhead")
    assert variants["11"].knobs == replace(variants["9"].knobs, compile_mode="max-autotune-no-cudagraphs")
    assert variants["11@512"].knobs == replace(variants["11"].knobs, batch_size=512)
    assert variants["9@512"].knobs == replace(variants["9"].knobs, batch_size=512)
    assert variants["12"].knobs == replace(variants["9"].knobs, optim_impl="torch", muon="shape")
    assert variants["13"].knobs == replace(variants["12"].knobs, muon="padded")
    assert variants["13@512"].knobs == replace(variants["13"].knobs, batch_size=512)
    seed = load_config("configs/seed.yaml")
    for step, batching in (("12", "shape"), ("13", "padded")):  # best.yaml's optimizer on the paper's network
        cfg = tp.variant_config(seed, variants[step].knobs)
        assert (cfg.optim.name, cfg.optim.muon_batching, cfg.optim.impl) == ("muon", batching, "torch")
        assert cfg.optim.lookahead_k == 0 and cfg.optim.nesterov and cfg.train.cuda_graph
        assert cfg.model == replace(seed.model, se_impl="triton") and cfg.optim.lr == seed.optim.lr  # row 9's SE
    assert tp.variant_config(seed, variants["9"].knobs).optim.name == "sgd"
    unavailable = {"triton_se": "no kernel here"}
    skipped = tp.run_variant(variants["6"], None, None, unavailable, None, tmp_path)  # returns before building
    assert skipped["status"] == "skipped" and skipped["reason"] == "no kernel here"
    knobs, dropped = tp.effective_knobs(variants["7"].knobs, unavailable)
    assert dropped == ["triton_se"] and knobs == replace(variants["7"].knobs, se_impl="torch")
    assert knobs.optim_impl == "fused" and knobs.compile


def test_a_rows_warmup_steps_run_before_its_timed_windows_and_the_median_window_counts(bench, monkeypatch, tmp_path):
    """measure (the trainer and its steps faked): --warmup-steps untimed steps first, then --repeats timed
    windows of --steps steps each, and the row's images/s and ms/step are the median window's."""
    tp, calls = bench["throughput"], []

    class Loader:
        def set_epoch(self, epoch):
            pass

        def __iter__(self):
            return iter([(torch.zeros(1), torch.zeros(1))] * 5)

    class FakeTrainer:
        def __init__(self, cfg, device, run_dir, console):
            self.device, self.use_graph, self.data = torch.device("cpu"), False, type("Data", (), {"train": Loader()})

        def _train_step(self, images, labels):
            calls.append("step")

    seconds, real_window = iter([0.3, 0.1, 0.2]), tp.timed_window

    def window(step, batches, steps, device):
        calls.append("window")
        real_window(step, batches, steps, device)
        return next(seconds)

    monkeypatch.setattr(tp, "Trainer", FakeTrainer)
    monkeypatch.setattr(tp, "timed_window", window)
    args = type("Args", (), {"device": "cpu", "warmup_steps": 2, "steps": 4, "repeats": 3, "workers": 0})
    row = tp.measure(None, tp.Knobs(data="torch", batch_size=16), args, tmp_path)
    assert calls == ["step"] * 2 + (["window"] + ["step"] * 4) * 3
    assert row["window_seconds"] == [0.3, 0.1, 0.2]
    assert row["images_per_second"] == pytest.approx(4 * 16 / 0.2) and row["ms_per_step"] == pytest.approx(50.0)


def test_throughput_smoke_script(repo_root, cifar_dir, tmp_path):
    out = tmp_path / "throughput.json"
    run_script(repo_root, cifar_dir, "benchmarks/throughput.py", "--device", "cpu", "--smoke", "--steps", "2",
               "--batch", "16", "--batch-sizes", "16", "32", "--out", out)
    result = json.loads(out.read_text())
    assert META_KEYS <= result["meta"].keys() and VERSION_KEYS <= result["meta"]["versions"].keys()
    assert result["bf16_peak_tflops"] is None  # a CPU has no entry in the peak table
    assert result["measured_bf16_matmul_tflops"] is None  # measured on a GPU only
    model = build_model(replace(load_config("configs/smoke.yaml").model, se_impl="torch"))
    assert result["model"]["train_flops_per_image"] == 3 * forward_flops(model)

    assert result["complete"] is True
    rows = {r["step"]: r for r in result["rows"]}
    assert list(rows) == ["1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11", "12", "13", "7@32", "8@32", "9@32",
                          "11@32", "12@32", "13@32"]
    assert rows["5"]["status"] == "skipped" and "compile" in rows["5"]["reason"]  # --smoke on a CPU
    assert rows["10"]["status"] == "skipped" and "compile" in rows["10"]["reason"]
    for graphed in ("9", "9@32", "11", "11@32"):  # CUDA graphs: GPU only, and the row says so
        assert rows[graphed]["status"] == "skipped" and "CUDA GPU" in rows[graphed]["reason"]
    # the Triton SE row (its op, running the PyTorch reference on a CPU: run_script unsets the interpreter)
    # and DALI (its CPU backend) rows run: a broken import would otherwise pass as a row skipped with a reason
    assert rows["6"]["status"] == rows["8"]["status"] == rows["8@32"]["status"] == "ok"
    # Muon's rows are step 9's without the graph a CPU lacks (eager, and they say so), not skipped
    for step, batching in (("12", "shape"), ("13", "padded"), ("12@32", "shape"), ("13@32", "padded")):
        assert rows[step]["status"] == "ok" and "cuda_graph" in rows[step]["note"], rows[step]
        assert rows[step]["settings"]["muon"] == batching and rows[step]["settings"]["optim_impl"] == "torch"
    base = rows["1"]["images_per_second"]
    for r in rows.values():
        assert r["status"] in ("ok", "skipped"), r  # never failed; skipped rows say why
        if r["status"] == "skipped":
            assert r["reason"] and r["images_per_second"] is None
            continue
        assert r["images_per_second"] > 0
        assert r["images_per_second"] == pytest.approx(2 * r["batch_size"] / statistics.median(r["window_seconds"]))
        assert r["speedup"] == pytest.approx(r["images_per_second"] / base)
        assert r["tflops"] == pytest.approx(r["images_per_second"] * result["model"]["train_flops_per_image"] / 1e12)
        if r["step"] in ("1", "2", "3", "4"):
            assert r["note"] is None
        else:  # measured without the skipped compile, and the table says so
            assert "without compile" in r["note"]
    assert rows["1"]["settings"]["data"] == "workers" and rows["2"]["settings"]["data"] == "torch"
    assert rows["7@32"]["batch_size"] == 32
    png = out.with_suffix(".png").read_bytes()
    assert png.startswith(PNG_SIGNATURE) and len(png) > 1000


def test_throughput_rows_subset_has_no_speedup_without_step_1(repo_root, cifar_dir, tmp_path):
    out = tmp_path / "throughput.json"
    run_script(repo_root, cifar_dir, "benchmarks/throughput.py", "--device", "cpu", "--smoke", "--steps", "2",
               "--batch", "16", "--batch-sizes", "16", "32", "--rows", "7@32,2", "--out", out)
    result = json.loads(out.read_text())
    assert result["complete"] is True and [r["step"] for r in result["rows"]] == ["2", "7@32"]  # ablation order
    assert result["measured_order"] == ["7@32", "2"]  # ...measured in the order asked for
    assert all(r["status"] == "ok" and r["images_per_second"] > 0 for r in result["rows"])
    assert all(r["speedup"] is None for r in result["rows"])  # step 1 was not measured: no made-up base


@pytest.mark.parametrize("extra, messages", [
    (["--rows", "2,99"], ["--rows 2,99", "7@64"]),
    # no timed window at all: a median of nothing, after every row's warmup was spent
    (["--repeats", "0"], ["--steps, --repeats and batch sizes must be >= 1"]),
    # the result is first written after the first row: --out is checked before any is measured
    (["--out", "/proc/nowhere/t.json"], ["--out /proc/nowhere/t.json: cannot write there"]),
    (["--out", "TMP"], ["is a folder"]),
])
def test_throughput_unknown_row_or_a_zero_count_is_a_clear_error(repo_root, cifar_dir, tmp_path, extra, messages):
    """An unknown row, a count below 1 or an --out that cannot be written is refused up front (exit 2,
    one line), before any row is built."""
    env = dict(os.environ, FASTTRAIN_DATA=str(cifar_dir))
    extra = [str(tmp_path) if arg == "TMP" else arg for arg in extra]
    proc = subprocess.run([sys.executable, "benchmarks/throughput.py", "--device", "cpu", "--smoke",
                           "--out", str(tmp_path / "t.json"), *extra], cwd=repo_root, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and all(m in proc.stderr for m in messages), proc.stderr
    assert not (tmp_path / "t.json").exists()


# ------------------------------------------------------------------------------------- GPU session summary
def test_gpu_summary_reads_what_a_session_wrote(repo_root, cifar_dir, tmp_path):
    """gpu_session.sh's last word: real result files of the scripts (CPU-sized), and the numbers in the
    summary are the ones in those files; a stage stopped at its limit shows as such, not as a number."""
    d = tmp_path / "session"
    run_script(repo_root, cifar_dir, "benchmarks/throughput.py", "--device", "cpu", "--smoke", "--steps", "2",
               "--batch", "16", "--batch-sizes", "16", "--rows", "1,2", "--out", d / "throughput.json")
    run_script(repo_root, cifar_dir, "benchmarks/time_to_accuracy.py", "--config", "configs/smoke.yaml",
               "--seeds", "1", "--targets", "0", "100", "--device", "cpu", "--out", d / "best.json",
               "--runs-dir", d / "best-runs", "--data.train_subset", "128", "--data.test_subset", "100",
               "--train.epochs", "2", "--model.blocks", "[1,1,1]", "--output.progress", "false")
    (d / "seed").mkdir()
    (d / "seed" / "metrics.jsonl").write_text(  # a run cut by its time limit mid-line keeps its whole rows
        json.dumps({"epoch": 1, "epoch_seconds": 2.0, "images_per_second": 25000.0, "test_acc": 41.5}) + "\n"
        + '{"epoch": 2, "epoch_sec')
    (d / "graphseed").mkdir()  # the first epoch (warmup effects) is left out of apaper's sizing
    (d / "graphseed" / "metrics.jsonl").write_text("\n".join(json.dumps(
        {"epoch": e, "epoch_seconds": s, "images_per_second": 4e4, "test_acc": 50.0})
        for e, s in ((1, 9.0), (2, 1.0), (3, 1.25))) + "\n")
    (d / "apaper-1").mkdir()  # evaluated every 10 epochs: the last accuracy is an earlier epoch's
    (d / "apaper-1" / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"epoch": 10, "epoch_seconds": 1.0, "images_per_second": 5e4, "test_acc": 80.25},
        {"epoch": 11, "epoch_seconds": 1.0, "images_per_second": 5e4, "test_acc": None}]) + "\n")
    (d / "tune_se_nvidia-h100.json").write_text(json.dumps({"ranked": [  # tune_se.py's ranking, best first
        {"gate_tile": 8192, "reduce_tile": 2048, "stem_ms": 0.2, "total_ms": 0.61, "default": False},
        {"gate_tile": 4096, "reduce_tile": 2048, "stem_ms": 0.3, "total_ms": 0.8, "default": True}]}))
    (d / "bench_se_nvidia-h100.json").write_text(json.dumps({"rows": [  # bench_se.py's row keys
        {"placement": "stem", "shape": [512, 64, 32, 32], "impl": name, "forward_backward_ms": ms}
        for name, ms in (("triton", 0.2), ("eager-ref", 0.5), ("compiled-ref", 0.25))]}))
    (d / "profile.json").write_text(json.dumps({"complete": False, "rows": [  # profile_step.py's row keys
        {"row": "7", "batch_size": 128, "status": "ok", "reason": None, "wall_ms_per_step": 10.5,
         "host_ms_per_step": 10.25, "gpu_busy_ms_per_step": 3.125, "kernels_per_step": 412.0,
         "syncs_per_step": 0.0, "verdict": "host-bound", "gpu_ms_by_class": {
             "convolution": 2.0, "compiled fusions": 0.75, "eager ATen": 0.25, "copies": 0.125, "other": 0.0625},
         "floor": {"compute_ms": 1.5, "norm_traffic_ms": 1.125, "step_ms": 2.625, "images_per_second": 48761.9}},
        {"row": "9", "batch_size": 128, "status": "skipped", "reason": "CUDA graphs need a CUDA GPU"}]}))
    (d / "odd.json").write_text("[1, 2]")  # not a result file: ignored, never a crash
    (d / "stages.tsv").write_text("gpu-tests\t0\t61\nthroughput\t124\t150\nloader\tskip\t0\nseed\t137\t70\n"
                                  # with their limits (since session 30): killed before its limit, cut by the watchdog
                                  "tune\t137\t80\t70\nkernels\t137\t12\t500\nddp-tests\tcut\t40\t34\n")
    (d / "gpu-tests.log").write_text("FAILED tests/test_x.py::test_y - AssertionError\n"
                                     "1 failed, 96 passed, 276 deselected in 58.21s\n")  # pytest -q's last line
    proc = subprocess.run([sys.executable, "benchmarks/gpu_summary.py", str(d)], cwd=repo_root,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    tp = json.loads((d / "throughput.json").read_text())
    best = json.loads((d / "best.json").read_text())["runs"][0]
    assert text.startswith("GPU session summary: ") and tp["meta"]["git_sha"] in text.splitlines()[0]
    assert "throughput  TIME LIMIT" in text and "loader      skipped (no time left)" in text
    assert "seed        TIME LIMIT (killed)" in text and "tune        TIME LIMIT (killed)" in text
    assert "kernels     KILLED (not its limit) 12s" in text  # the OOM killer's 137 is no time limit
    assert "ddp-tests   CUT (session deadline) 40s" in text
    assert "profile     host- or GPU-bound per step (PARTIAL)" in text
    assert "  7      b128   10.50 / 10.25 / 3.12 ms, 412 kernels, 0.0 syncs: host-bound" in text
    assert ("         GPU ms by class: convolution 2.00, compiled fusions 0.75, eager ATen 0.25, copies 0.12\n"
            in text)  # the four largest
    assert ("         floor 2.62 ms (1.50 compute + 1.12 norm traffic) = 48,762 img/s; the step runs at 25% of it\n"
            in text)
    assert "  9      skipped: CUDA graphs need a CUDA GPU" in text
    assert "bench_se    stem 512x64x32x32 fwd+bwd ms: triton 0.200 (2.50x), eager-ref 0.500, compiled-ref 0.250 (2.00x)" in text
    assert "gpu tests   1 failed, 96 passed, 276 deselected in 58.21s" in text and "failed: tests/test_x.py::test_y" in text
    for row in tp["rows"]:
        assert f"{row['images_per_second']:,.0f} img/s" in text
    assert f"{tp['rows'][1]['speedup']:.2f}x" in text
    assert f"final {best['final_test_acc']:.2f}%" in text and f"train {best['train_seconds']:.1f} s" in text
    assert "; to 0%: " in text and ", 100%: - s" in text  # reached at once; never reached
    assert "seed        1 epochs, last test 41.50%, train clock 2.0 s, median 25,000 img/s" in text
    assert "apaper-1    2 epochs, last test 80.25% (epoch 10), train clock 2.0 s" in text
    assert ("apaper      graphseed epoch 1.12 s: 200 epochs ~225 s a seed, two side by side up to 450 s; "
            "one call holds ~450 s of training: two seeds side by side a call") in text
    assert ("tune_se     best first: gate 8192 reduce 2048: stem 0.200 / all 0.610 ms, "
            "gate 4096 reduce 2048: stem 0.300 / all 0.800 ms (default)") in text

    assert (f"best.yaml   mean final {best['final_test_acc']:.2f}% (TTA -) over 1 seed(s); "
            "mean reaches (plain/TTA) 0%: yes/-, 100%: no/-") in text

    # a best stage cut by its limit after seed 0: the result file holds seed 0 (PARTIAL), and the seed
    # in flight shows from its metrics
    partial = json.loads((d / "best.json").read_text())
    (d / "best.json").write_text(json.dumps(dict(partial, complete=False)))
    (d / "best-runs" / "seed-1").mkdir()
    (d / "best-runs" / "seed-1" / "metrics.jsonl").write_text((d / "best-runs" / "seed-0" / "metrics.jsonl").read_text())
    text = subprocess.run([sys.executable, "benchmarks/gpu_summary.py", str(d)], cwd=repo_root,
                          capture_output=True, text=True, timeout=60).stdout
    assert "over 1 seed(s) (PARTIAL); mean reaches" in text
    assert "best.yaml   seed-1 (partial, not in the result file): 2 epochs" in text
    assert "best.yaml   seed-0 (partial" not in text

    (d / "best.json").unlink()  # a best run stopped before its result file: read from its metrics
    text = subprocess.run([sys.executable, "benchmarks/gpu_summary.py", str(d)], cwd=repo_root,
                          capture_output=True, text=True, timeout=60).stdout
    assert "best.yaml   seed-0 (partial, not in the result file): 2 epochs" in text


def test_gpu_summary_best_lines_are_the_result_files_figures(bench, tmp_path):
    """best.json's lines from a synthetic result: the mean final is the final accuracy's mean (91.00), not the
    best epoch's (92.00); each seed's time to each target is its seconds (not its epochs); and every target
    the mean final reaches gets its own time line, in seconds, per TTA mode that reaches it."""
    runs = [{"seed": seed, "final_test_acc": acc, "final_test_acc_tta": None, "train_seconds": 120.0,
             "compile_seconds": 3.0, "time_to_target": {"90": t90, "91": t91, "92": None},
             "epochs_to_target": {"90": 7, "91": 9, "92": None}}
            for seed, acc, t90, t91 in [(0, 90.5, 61.5, 80.4), (1, 91.5, 55.0, None)]]
    targets = {"90": {"none": 120.0, "flip": 120.0}, "91": {"none": None, "flip": 120.0},
               "92": {"none": None, "flip": None}}
    agg = {"seeds": 2, "final_test_acc_mean": 91.0, "final_test_acc_tta_mean": None, "best_test_acc_mean": 92.0,
           "train_seconds_median": 120.0,
           "targets": {t: {"mean_final_reaches": t in ("90", "91"), "mean_final_tta_reaches": None,
                           "time_by_mean_final": times} for t, times in targets.items()}}
    (tmp_path / "best.json").write_text(json.dumps({"complete": True, "runs": runs, "aggregate": agg}))
    lines = bench["gpu_summary"].best(tmp_path)
    assert lines == [
        "best.yaml   seed 0: final 90.50% (TTA -), train 120.0 s, compile 3 s; to 90%: 61.5 s, 91%: 80.4 s, 92%: - s",
        "best.yaml   seed 1: final 91.50% (TTA -), train 120.0 s, compile 3 s; to 90%: 55.0 s, 91%: - s, 92%: - s",
        "best.yaml   mean final 91.00% (TTA -) over 2 seed(s); mean reaches (plain/TTA) 90%: yes/-, 91%: yes/-, "
        "92%: no/-",
        "best.yaml   time to 90% by the mean final: none 120.0 s, flip 120.0 s",
        "best.yaml   time to 91% by the mean final: flip 120.0 s"]  # and no line for 92%: nothing reaches it
    assert "92.00%" not in "\n".join(lines)


def test_gpu_session_limits_a_stage_so_its_kill_lands_before_the_watchdog(repo_root, tmp_path):
    """`limited` under KILL_AFTER=45 (torchrun's): the stage gets 35 s less than what is left, so timeout's
    SIGKILL comes by the deadline + 10 s, before the watchdog's TERM at + 25 s (which ended the script with
    the stage still running, holding the GPU); the default KILL_AFTER leaves the limit as it was."""
    script = (repo_root / "benchmarks" / "gpu_session.sh").read_text()
    start = script.index("limited() {")
    function = script[start:script.index("\n}\n", start) + 3]
    proc = subprocess.run(["bash", "-c", "now() { date +%s; }; work=$1; deadline=$(( $(now) + 100 ))\n" + function +
                           "limited a 500 true >/dev/null; KILL_AFTER=45 limited b 500 true >/dev/null; "
                           "limited c 30 true >/dev/null", "-", str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    rows = [line.split("\t") for line in (tmp_path / "stages.tsv").read_text().splitlines()]
    assert [(name, code) for name, code, _, _ in rows] == [("a", "0"), ("b", "0"), ("c", "0")]
    limits = [int(limit) for *_, limit in rows]
    # a second may tick between the calls: b's limit is 35 s under a's, give or take that second
    assert limits[0] in (99, 100) and limits[0] - 36 <= limits[1] <= limits[0] - 35 and limits[2] == 30, limits


def test_a_stage_cut_by_the_watchdog_keeps_its_row(repo_root, tmp_path):
    """The watchdog's TERM (sent here by hand) in the middle of a stage: the summary names the stage as cut,
    not silently without it (its row was written only when the stage returned)."""
    shim = tmp_path / "bin"
    shim.mkdir()
    (shim / "python").write_text(f"#!/bin/bash\nif [[ \"$1 $2\" == \"-m fasttrain\" ]]; then sleep 8; exit 0; fi\n"
                                 f"exec {sys.executable} \"$@\"\n")
    (shim / "python").chmod(0o755)
    env = dict(os.environ, INSTALL="0", BUDGET_S="200", PATH=f"{shim}:{os.environ['PATH']}")
    env.pop("GPU_SESSION_T0", None)
    out = tmp_path / "out"
    session = subprocess.Popen(["bash", "benchmarks/gpu_session.sh", "seed", str(out)], cwd=repo_root, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in session.stdout:
        if line.startswith("== seed (limit"):
            session.send_signal(signal.SIGTERM)  # as the watchdog does
            break
    rest = session.communicate(timeout=60)[0]
    assert "seed        CUT (session deadline)" in (out / "summary.txt").read_text(), rest


def test_gpu_session_loader_runs_each_set_of_loader_args_into_one_folder(repo_root, tmp_path):
    """gpu_session.sh loader with LOADER_ARGS 'A | B': two bench_loader runs, loader.json and loader-2.json in
    the one work folder, so one call returns both (the device returns at most 8 files a call)."""
    env = dict(os.environ, INSTALL="0", BUDGET_S="200", OMP_NUM_THREADS="1",
               LOADER_ARGS="--cpu-smoke --loaders torch --no-train | --cpu-smoke --loaders torch --no-train "
                           "--batch-size 32")
    env.pop("GPU_SESSION_T0", None)
    proc = subprocess.run(["bash", "benchmarks/gpu_session.sh", "loader", str(tmp_path)], cwd=repo_root, env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    with tarfile.open(tmp_path / "gpu-session.tar.gz") as archive:
        first = json.load(archive.extractfile("./loader.json"))
        second = json.load(archive.extractfile("./loader-2.json"))
    assert first["batch_size"] != 32 and second["batch_size"] == 32  # each set its own run
    summary = (tmp_path / "summary.txt").read_text()
    assert "loader      img/s: torch/alone " in summary
    assert "(--epochs 3 --steps 50 --cpu-smoke --loaders torch --no-train --batch-size 32)" in summary


def test_gpu_summary_has_a_line_per_loader_run_of_one_stage(bench, tmp_path):
    """LOADER_ARGS with several runs ('|') writes loader.json, loader-2.json, ... into one folder (one call's
    files: the device returns at most 8): a line each, in run order (loader-10 after loader-9), the later
    ones naming their flags; a run with no result file has no line."""
    def write(name: str, flags: str, rate: float) -> None:
        (tmp_path / name).write_text(json.dumps({
            "benchmark": "loader", "command": f"python benchmarks/bench_loader.py --epochs 3 --steps 50 {flags} "
                                              f"--out /root/out/session/{name}",
            "results": [{"loader": "dali-seq", "mode": "alone", "images_per_s": rate}]}))
    write("loader.json", "", 280894.0)
    write("loader-2.json", "--batch-size 2048", 300000.0)
    write("loader-10.json", "--dali-threads 8", 310000.0)
    write("loader-9.json", "--dali-prefetch 4", 290000.0)
    assert bench["gpu_summary"].loader(tmp_path) == [
        "loader      img/s: dali-seq/alone 280,894",
        "loader      img/s: dali-seq/alone 300,000 (--epochs 3 --steps 50 --batch-size 2048)",
        "loader      img/s: dali-seq/alone 290,000 (--epochs 3 --steps 50 --dali-prefetch 4)",
        "loader      img/s: dali-seq/alone 310,000 (--epochs 3 --steps 50 --dali-threads 8)"]


def test_gpu_summary_shows_the_peak_share_in_percent_and_optimizers_against_fused(bench, tmp_path):
    """throughput.json's bf16_peak_fraction is a fraction (0.39), shown as 39.0% of the peak; bench_optim's
    ratios are each implementation's step time over the fused kernel's (4x slower shows as 4.00x fused), its
    GPU-alone time (a CUDA graph's cost) beside it where the file has one (files before it do not)."""
    summary = bench["gpu_summary"]
    (tmp_path / "throughput.json").write_text(json.dumps({
        "model": {"name": "seed"}, "complete": True, "bf16_peak_tflops": 989.0, "measured_bf16_matmul_tflops": None,
        "rows": [{"step": "7", "name": "compiled", "status": "ok", "images_per_second": 80_000.0, "speedup": 16.0,
                  "bf16_peak_fraction": 0.39}]}))
    assert summary.throughput(tmp_path)[1].endswith(" 80,000 img/s  16.00x  39.0% peak")
    (tmp_path / "bench_optim_nvidia-h100.json").write_text(json.dumps({"rows": [
        {"impl": "fused", "step_ms": 0.5}, {"impl": "foreach+python", "step_ms": 2.0}]}))
    assert summary.kernels(tmp_path) == ["bench_optim fused 500 us, foreach+python 2000 us (4.00x fused)"]
    (tmp_path / "bench_optim_nvidia-h100.json").write_text(json.dumps({"rows": [
        {"impl": "fused", "step_ms": 0.5, "gpu_step_ms": 0.25}, {"impl": "muon", "step_ms": 3.0, "gpu_step_ms": 1.2}]}))
    assert summary.kernels(tmp_path) == ["bench_optim fused 500 us [GPU alone 250], muon 3000 us (6.00x fused) "
                                         "[GPU alone 1200]"]


GRAPH_OFF = 'ablation with ABLATION_ARGS="--train.cuda_graph false" and BUDGET_S from what is left: '


@pytest.mark.parametrize("tests_code, failed, graphseed_code, expected", [
    ("0", [], "0", "ablation with BUDGET_S from what is left: the graph is proven"),
    ("1", ["tests/test_kernels_se.py::test_se_gate_cuda_matches_reference[2x64x32x32]"], "0",
     "ablation with BUDGET_S from what is left: the graph is proven"),  # another kernel's failure
    ("1", ["tests/test_graph.py::test_replayed_graph_trains_like_the_eager_step[lookahead]",
           "tests/test_kernels_optim.py::test_cuda_graph_capture_with_tensor_lr"], "0",
     GRAPH_OFF + "the graph is not proven (2 of its gpu tests failed)"),
    ("124", [], "0", GRAPH_OFF + "the graph is not proven (the gpu tests did not run to the end)"),
    ("0", [], "1", GRAPH_OFF + "the graph is not proven (graphseed failed)"),
])
def test_gpu_summary_says_what_the_next_call_runs(repo_root, tmp_path, tests_code, failed, graphseed_code, expected):
    (tmp_path / "stages.tsv").write_text(f"gpu-tests\t{tests_code}\t61\ngraphseed\t{graphseed_code}\t55\n")
    (tmp_path / "gpu-tests.log").write_text("".join(f"FAILED {name} - AssertionError\n" for name in failed)
                                            + f"{len(failed)} failed, 100 passed in 61.00s\n")
    (tmp_path / "graphseed").mkdir()
    (tmp_path / "graphseed" / "metrics.jsonl").write_text("\n".join(json.dumps(
        {"epoch": e, "epoch_seconds": s, "images_per_second": 4e4, "test_acc": 50.0})
        for e, s in ((1, 9.0), (2, 1.4), (3, 1.4))) + "\n")
    text = subprocess.run([sys.executable, "benchmarks/gpu_summary.py", str(tmp_path)], cwd=repo_root,
                          capture_output=True, text=True, timeout=60).stdout
    assert text.rstrip().splitlines()[-1].startswith(f"next call   {expected}"), text


# ------------------------------------------------------------------------------------- recipe ablation
ABLATION_TINY = ["--config", "configs/smoke.yaml", "--device", "cpu", "--data.train_subset", "256",
                 "--train.epochs", "2", "--model.blocks", "[1,1,1]", "--output.progress", "false"]


def ablation_summary(repo_root, ablation_json, tmp_path) -> str:
    """gpu_summary.py's text for a session folder holding this ablation result, as gpu_session.sh leaves it."""
    session = tmp_path / "session"
    session.mkdir(exist_ok=True)
    (session / "ablation.json").write_text(ablation_json.read_text())
    return subprocess.run([sys.executable, "benchmarks/gpu_summary.py", str(session)], cwd=repo_root,
                          capture_output=True, text=True, timeout=60).stdout


def test_recipe_ablation_tunes_on_validation_only(repo_root, cifar_dir, tmp_path):
    variants = tmp_path / "variants.yaml"
    variants.write_text("base: {}\nmore_lr: {optim.lr: 0.2, optim.label_smoothing: 0.1}\nunused: {train.epochs: 3}\n")
    out, runs = tmp_path / "ablation.json", tmp_path / "runs"
    proc = run_script(repo_root, cifar_dir, "benchmarks/recipe_ablation.py", *ABLATION_TINY, "--variants", variants,
                      "--only", "more_lr", "--seeds", "2", "--val-size", "100", "--targets", "0", "100",
                      "--out", out, "--runs-dir", runs)
    assert proc.stdout.rstrip().endswith("┘") and "recipe ablation of smoke" in proc.stdout  # the table is last
    result = json.loads(out.read_text())
    assert result["complete"] is True and META_KEYS <= result["meta"].keys()
    assert result["variants"] == {"base": {}, "more_lr": {"optim.lr": 0.2, "optim.label_smoothing": 0.1}}
    assert [(r["variant"], r["seed"]) for r in result["runs"]] == [("base", 0), ("base", 1), ("more_lr", 0),
                                                                  ("more_lr", 1)]
    for row in result["runs"]:
        run_dir = runs / f"{row['variant']}-seed-{row['seed']}"
        metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert all(m["test_acc"] is None and m["val_acc"] is not None for m in metrics)  # test never evaluated
        assert row["final_val_acc"] == metrics[-1]["val_acc"] and "final_test_acc" not in row
        assert row["final_val_acc_by_tta"]["none"] == row["final_val_acc"]  # and never a test-set figure
        assert row["time_to_target"]["0"] == pytest.approx(metrics[0]["epoch_seconds"])
        assert row["time_to_target"]["100"] is None
        saved = load_config(run_dir / "config.yaml")
        assert saved.data.val_size == 100 and saved.train.eval_test is False and saved.data.train_subset == 256
        assert saved.optim.lr == (0.2 if row["variant"] == "more_lr" else load_config("configs/smoke.yaml").optim.lr)
    agg = result["aggregate"]
    means = {v: statistics.fmean(r["final_val_acc"] for r in result["runs"] if r["variant"] == v)
             for v in ("base", "more_lr")}
    assert agg["base"]["final_val_acc_mean"] == pytest.approx(means["base"])
    assert agg["base"]["delta_val_acc_vs_base"] == 0.0
    assert agg["more_lr"]["delta_val_acc_vs_base"] == pytest.approx(means["more_lr"] - means["base"])

    text = ablation_summary(repo_root, out, tmp_path)  # what the ablation stage leaves, summarized
    delta = agg["more_lr"]["delta_val_acc_vs_base"]
    assert f"more_lr              {agg['more_lr']['final_val_acc_mean']:.2f}% ({delta:+.2f})" in text
    assert f"base                 {agg['base']['final_val_acc_mean']:.2f}% (+0.00)" in text
    shift = agg["base"]["final_val_acc_by_tta_mean"]["flip_shift"]
    assert f"% (+0.00), {agg['base']['final_val_acc_by_tta_mean']['flip']:.2f}% / {shift:.2f}%, 2 ep" in text
    # every variant reaches 0%, none 100%: the quicker one (by median training clock) is the pick
    quick = min(("base", "more_lr"), key=lambda v: (agg[v]["train_seconds_median"], v))
    assert result["fastest"]["0"]["plain"]["variant"] == quick and result["fastest"]["100"]["plain"] is None
    assert f"fastest to 0% val: without TTA: {quick} (" in proc.stdout
    assert f": {quick} reached 0% without TTA on validation" in text


def test_fastest_reaching_picks_the_quickest_variant_over_each_target_and_tta_kind(bench):
    recipe_verdict, summary = bench["recipe_verdict"], bench["gpu_summary"]
    aggregates = {  # name: (mean val % without TTA, with flip, with flip_shift, median train s, epochs)
        name: {"final_val_acc_mean": acc, "final_val_acc_by_tta_mean": {"none": acc, "flip": flip, "flip_shift": shift},
               "train_seconds_median": secs, "epochs": epochs}
        for name, (acc, flip, shift, secs, epochs) in {
            "base": (91.0, 91.8, 92.0, 40.0, 40), "long": (92.7, 93.2, 93.4, 80.0, 80),
            "cutout": (92.6, 93.1, 93.1, 41.0, 40), "late": (92.8, 93.0, 93.3, 30.0, 60)}.items()}
    # one at a time the clock ranks; side by side (jobs > 1) a run queued late shares the GPU with fewer
    # and shows a shorter clock, so the fewest epochs rank first, then the higher accuracy
    assert recipe_verdict.fastest_reaching(aggregates, {"92.5": 92.5}, jobs=1)["92.5"]["plain"]["variant"] == "late"
    # ... by compute, where the aggregates count it: 60 epochs of a network of half the FLOPs beat 40
    with_flops = {name: dict(agg, epoch_gflops=agg["epochs"] * (0.8 if name == "late" else 1.6))
                  for name, agg in aggregates.items()}
    assert recipe_verdict.fastest_reaching(with_flops, {"92.5": 92.5}, jobs=6)["92.5"]["plain"]["variant"] == "late"
    fastest = recipe_verdict.fastest_reaching(aggregates, {f"{t:g}": t for t in (92.5, 91.5, 93.2, 93.35, 99.0)}, jobs=6)
    assert fastest["92.5"]["plain"] == {"variant": "cutout", "val_acc": 92.6, "margin": pytest.approx(0.1),
                                        "train_seconds": 41.0, "epochs": 40}
    assert fastest["91.5"]["plain"]["variant"] == "cutout"  # base (91.0) does not reach it
    # a variant with a failed or unfinished seed is not judged, however good
    unfinished = dict(aggregates, cutout=dict(aggregates["cutout"], all_seeds=False))
    assert recipe_verdict.fastest_reaching(unfinished, {"92.5": 92.5}, jobs=6)["92.5"]["plain"]["variant"] == "late"
    assert fastest["91.5"]["flip"]["variant"] == "cutout" and fastest["91.5"]["flip_shift"]["variant"] == "cutout"
    assert fastest["93.2"]["plain"] is None and fastest["93.2"]["flip"]["variant"] == "long"
    assert fastest["93.2"]["flip_shift"]["variant"] == "late"
    assert fastest["93.35"] == {"plain": None, "flip": None, "flip_shift": {
        "variant": "long", "val_acc": 93.4, "margin": pytest.approx(0.05), "train_seconds": 80.0, "epochs": 80}}
    assert fastest["99"] == {"plain": None, "flip": None, "flip_shift": None}

    result = {"config_name": "best", "val_size": 5000, "complete": True, "jobs": 6, "aggregate": aggregates,
              "config": {"train": {"tta": "flip"}}, "targets": [92.5],
              "variants": {"base": {}, "long": {"train.epochs": 80}, "late": {"train.ema_decay": 5e-05},
                           "cutout": {"data.cutout": 12, "model.blocks": [4, 4, 3]}}}

    def verdict(fastest_of: dict) -> tuple[dict | None, str]:
        result.update(fastest=fastest_of)
        result["next"] = recipe_verdict.next_candidate(result)
        return result["next"], summary.ablation_verdict(result)[-1]

    result["overrides"] = {"train.cuda_graph": False, "train.checkpoint_every": 1000, "output.dir": "x"}
    pick, _ = verdict({"92.5": fastest["92.5"]})  # the ablation's own overrides too, but plumbing
    assert pick["best_args"] == "--train.cuda_graph=false --data.cutout=12 --model.blocks=[4,4,3]"
    result["overrides"] = {}
    pick, line = verdict({"92.5": fastest["92.5"]})
    assert ("fastest to 92.5% val: without TTA: cutout (92.60%, +0.10; 40 epochs, 41.0 s (shared-device times; "
            "ranked by compute, a Muon epoch as 1.18 SGD epochs))") in recipe_verdict.fastest_lines(result)[0]
    # the cheapest reaching the first target, a tie going to less TTA; its overrides as flags
    assert pick["kind"] == "plain" and pick["best_args"] == "--data.cutout=12 --model.blocks=[4,4,3]"
    assert line.startswith("next        best on nvidia-h100-x1 with SEEDS=5 BEST_ARGS='--data.cutout=12 "
                           "--model.blocks=[4,4,3]' (or, on this warm machine, BEST_FROM=/tmp/fasttrain-search.json): "
                           "cutout reached 92.5% without TTA")
    from fasttrain.config import parse_overrides
    assert parse_overrides(pick["best_args"].split()) == {"data.cutout": 12, "model.blocks": [4, 4, 3]}
    pick, line = verdict({"93.2": fastest["93.2"]})  # flip reaches with 80 epochs, flip_shift with 60: cheaper
    assert (pick["kind"], pick["variant"]) == ("flip_shift", "late")
    # train.tta set to the kind that reached; a float keeps its dot (YAML 1.1 reads 5e-05 as a string)
    assert pick["best_args"] == "--train.ema_decay=5.0e-05 --train.tta=\"flip_shift\""
    assert parse_overrides(pick["best_args"].split()) == {"train.ema_decay": 5e-05, "train.tta": "flip_shift"}
    assert "late reached 93.2% with flip_shift TTA on validation;" in line
    # a variant that turns TTA off but reaches only with flip: its flags turn flip back on (the config's own
    # flip is overridden by the variant's none, so leaving train.tta out would judge it without TTA)
    result["variants"]["long"] = {"train.epochs": 80, "train.tta": "none"}
    pick, _ = verdict({"93.2": dict(fastest["93.2"], flip_shift=None)})
    assert (pick["kind"], pick["variant"]) == ("flip", "long")
    assert pick["best_args"] == "--train.epochs=80 --train.tta=\"flip\""
    pick, line = verdict({"99": fastest["99"]})
    assert pick is None and line.startswith("next        no variant reached 99% on validation:")
    # cut by its time limit: the variants never judged are named beside the pick
    result.update(complete=False, aggregate={name: aggregates[name] for name in ("base", "cutout")})
    _, line = verdict(recipe_verdict.fastest_reaching(result["aggregate"], {"92.5": 92.5}, jobs=6))
    assert "cutout reached 92.5% without TTA on validation (PARTIAL: long, late not judged);" in line


def test_side_by_side_runs_rank_a_muon_epoch_at_its_measured_cost_over_sgds(bench):
    """Runs that shared the GPU rank by compute weighted by the optimizer's epoch time: at the same network
    and epochs SGD's fused step is the cheaper (the higher accuracy no longer decides a tie of compute), and
    fewer Muon epochs win only where they save more than Muon's extra (1.18x: 32 Muon epochs cost more than
    36 of SGD, 30 less). An aggregate naming no optimizer, or one never timed, ranks by compute alone."""
    recipe_verdict = bench["recipe_verdict"]
    assert recipe_verdict.EPOCH_COST["muon"] == pytest.approx(1.177, abs=1e-3)

    def agg(epochs: int, optimizer: str | None, acc: float) -> dict:
        out = {"final_val_acc_mean": acc, "final_val_acc_by_tta_mean": {"flip_shift": acc},
               "train_seconds_median": 10.0, "epochs": epochs, "epoch_gflops": epochs * 1.14}
        return out if optimizer is None else dict(out, optimizer=optimizer)

    def pick(aggregates: dict) -> str:
        return recipe_verdict.fastest_reaching(aggregates, {"92.52": 92.52}, jobs=6)["92.52"]["flip_shift"]["variant"]

    assert pick({"muon36": agg(36, "muon", 92.76), "sgd36": agg(36, "sgd", 92.74)}) == "sgd36"
    assert pick({"muon32": agg(32, "muon", 92.6), "sgd36": agg(36, "sgd", 92.6)}) == "sgd36"
    assert pick({"muon30": agg(30, "muon", 92.6), "sgd36": agg(36, "sgd", 92.6)}) == "muon30"
    assert recipe_verdict.training_cost(agg(30, "muon", 92.6)) == pytest.approx(30 * 1.14 * 0.843 / 0.716)
    # without an optimizer named (an older result) or with an unmeasured one: compute alone, accuracy breaks ties
    assert pick({"a": agg(36, None, 92.76), "b": agg(36, "sgd", 92.74)}) == "a"
    assert recipe_verdict.training_cost(agg(36, "adamw", 92.0)) == pytest.approx(36 * 1.14)
    # one run at a time the measured clock decides, whatever the optimizer
    clocked = {"muon36": dict(agg(36, "muon", 92.76), train_seconds_median=30.0),
               "sgd36": dict(agg(36, "sgd", 92.74), train_seconds_median=31.0)}
    assert recipe_verdict.fastest_reaching(clocked, {"92.52": 92.52}, jobs=1)["92.52"]["flip_shift"]["variant"] == "muon36"


def ablation_row(variant: str, seed: int, acc: float, seconds: float, epochs: int) -> dict:
    """A run's result row as recipe_ablation.py records it, synthetic: reaching 90% at its last epoch."""
    return {"variant": variant, "seed": seed, "final_val_acc": acc, "final_val_acc_tta": None, "best_val_acc": acc,
            "train_seconds": seconds, "compile_seconds": 0.0, "time_to_target": {"90": seconds},
            "epochs_to_target": {"90": epochs}, "epochs": [{"epoch": e + 1} for e in range(epochs)]}


def test_recipe_ablation_summary_judges_whole_variants_at_their_own_compute(bench):
    """summarize: a variant with fewer seeds than asked (the time limit cut it) is shown but not judged,
    however good; each variant's epoch-GFLOPs are its epochs times its own network's GFLOPs."""
    ra = bench["recipe_ablation"]
    rows = [ablation_row("base", 0, 90.5, 40.0, 2), ablation_row("base", 1, 90.7, 42.0, 2),
            ablation_row("x", 0, 93.0, 20.0, 3)]  # x: 1 of 2 seeds, quicker and better
    agg = ra.summarize(rows, [90.0], {"base": 1.6, "x": 0.5}, seeds=2)
    assert (agg["base"]["all_seeds"], agg["x"]["all_seeds"]) == (True, False)
    assert agg["base"]["epoch_gflops"] == pytest.approx(2 * 1.6) and agg["x"]["epoch_gflops"] == pytest.approx(3 * 0.5)
    for jobs in (1, 2):
        assert ra.fastest_reaching(agg, {"90": 90.0}, jobs)["90"]["plain"]["variant"] == "base"


def test_recipe_ablation_ranks_runs_side_by_side_by_compute(bench, repo_root, tmp_path, monkeypatch, capsys):
    """recipe_ablation.main with --jobs 2 (the runs themselves faked, no training): the ranking is by
    compute, as fastest_reaching does for shared-device clocks, so the bigger network with the shorter
    clock loses; each variant trains with the command line's overrides under its own (its lr, not the
    CLI's)."""
    ra = bench["recipe_ablation"]
    variants = tmp_path / "variants.yaml"
    variants.write_text("base: {}\nwide: {model.base_channels: 32, optim.lr: 0.25}\n"
                        "muon: {optim.name: muon, optim.impl: torch, optim.lookahead_k: 0}\n")
    lrs = {}

    def fake_parallel(tasks, jobs, root, done, failed):
        assert jobs == 2
        for name, cfg, seed, _, _ in tasks:  # wide: the shorter (shared-device) clock, over 10x the compute
            lrs[name] = cfg.optim.lr
            done(ablation_row(name, seed, 95.0, 10.0 if name == "wide" else 50.0, 2))

    monkeypatch.setattr(ra, "run_parallel", fake_parallel)
    out = tmp_path / "a.json"
    assert ra.main(["--config", str(repo_root / "configs" / "smoke.yaml"), "--device", "cpu", "--variants",
                    str(variants), "--seeds", "1", "--val-size", "100", "--targets", "90", "--jobs", "2",
                    "--out", str(out), "--optim.lr", "0.3"]) == 0
    result = json.loads(out.read_text())
    assert lrs == {"base": 0.3, "wide": 0.25, "muon": 0.3}
    agg = result["aggregate"]
    assert agg["wide"]["epoch_gflops"] > 10 * agg["base"]["epoch_gflops"]
    # each variant's optimizer, for the verdict's weighing: muon, the same compute as base, ranks after it
    assert {name: a["optimizer"] for name, a in agg.items()} == {"base": "sgd", "wide": "sgd", "muon": "muon"}
    assert agg["muon"]["epoch_gflops"] == agg["base"]["epoch_gflops"]
    assert result["fastest"]["90"]["plain"]["variant"] == "base" and result["next"]["variant"] == "base"
    assert "fastest to 90% val: without TTA: base (" in capsys.readouterr().out


def test_recipe_verdict_prints_the_candidates_flags_or_says_why_there_is_none(repo_root, tmp_path):
    """The command line that gpu_session.sh's best stage reads (BEST_FROM): the flags on stdout, alone."""
    def verdict(doc) -> subprocess.CompletedProcess:
        path = tmp_path / "ablation.json"
        path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
        return subprocess.run([sys.executable, "benchmarks/recipe_verdict.py", str(path)], cwd=repo_root,
                              capture_output=True, text=True, timeout=60)

    pick = {"target": "92.52", "kind": "flip", "variant": "cutout_12", "val_acc": 92.9, "margin": 0.38,
            "epochs": 60, "best_args": "--data.cutout=12 --train.epochs=60"}
    found = verdict({"benchmark": "recipe_ablation", "complete": True, "fastest": {"92.52": {}}, "next": pick})
    assert found.returncode == 0 and found.stdout == "--data.cutout=12 --train.epochs=60\n"
    assert "cutout_12 reached 92.52% (flip) on validation; 60 epochs\n" in found.stderr
    cut = verdict({"benchmark": "recipe_ablation", "complete": False, "fastest": {"92.52": {}}, "next": pick})
    assert cut.stdout == found.stdout and "60 epochs (a PARTIAL search: not every variant was judged)" in cut.stderr
    none = verdict({"benchmark": "recipe_ablation", "complete": False, "fastest": {"92.52": {}}, "next": None})
    assert none.returncode == 1 and none.stdout == ""
    assert "no judged variant reached 92.52% on validation (a partial search)" in none.stderr
    other = verdict({"benchmark": "time_to_accuracy", "next": pick})
    assert other.returncode == 1 and other.stdout == "" and "not a recipe_ablation.py result" in other.stderr
    cut = verdict('{"benchmark": "recipe_abl')  # cut mid-write
    assert cut.returncode == 1 and cut.stdout == "" and "cannot read" in cut.stderr
    for script in ("recipe_verdict.py", "gpu_summary.py"):  # --help is help, not a file name
        shown = subprocess.run([sys.executable, f"benchmarks/{script}", "--help"], cwd=repo_root, capture_output=True,
                               text=True, timeout=60)
        assert shown.returncode == 0 and shown.stdout.startswith(f"usage: python benchmarks/{script}"), shown.stderr


def test_gpu_session_best_runs_the_searchs_candidate(repo_root, cifar_dir, tmp_path):
    """gpu_session.sh best with BEST_FROM: the ablation result's candidate flags become the run's
    overrides (no copying by hand within a warm machine's 30 s), BEST_EXTRA's flags added on top; with no
    candidate the stage says so and trains nothing. A CPU-sized candidate of best.yaml, run as the device runs it."""
    tiny = ("--train.compile=false --train.cuda_graph=false --model.base_channels=8 --model.blocks=[1,1,1] "
            "--data.train_subset=384 --data.test_subset=100 --train.epochs=2 --train.batch_size=64 "
            "--output.progress=false --data.cutout=4")  # 2 epochs on 384 images: seed 1 scores above seed 0
    env = dict(os.environ, FASTTRAIN_DATA=str(cifar_dir), OMP_NUM_THREADS="1", INSTALL="0", BUDGET_S="240",
               SEARCH_KEEP=str(tmp_path / "kept.json"))
    for name in ("BEST_ARGS", "BEST_EXTRA", "GPU_SESSION_T0"):
        env.pop(name, None)

    def session(name: str, doc: dict, seeds: int = 1, **more_env) -> tuple[subprocess.CompletedProcess, Path]:
        (tmp_path / f"{name}.json").write_text(json.dumps(doc))
        out = tmp_path / name
        out.mkdir()
        proc = subprocess.run(["bash", "benchmarks/gpu_session.sh", "best", str(out)], cwd=repo_root,
                              env=dict(env, BEST_FROM=str(tmp_path / f"{name}.json"), SEEDS=str(seeds), **more_env),
                              capture_output=True, text=True, timeout=280)
        return proc, out

    proc, out = session("none", {"benchmark": "recipe_ablation", "complete": True, "fastest": {"92.52": {}},
                                 "next": None})
    assert proc.returncode == 0, proc.stderr
    assert "best        skipped (BEST_FROM: no candidate)" in (out / "summary.txt").read_text()
    assert not (out / "weights-best-bf16.pt").exists()
    missing = tmp_path / "missing"  # a fresh machine holds no search result
    missing.mkdir()
    proc = subprocess.run(["bash", "benchmarks/gpu_session.sh", "best", str(missing)], cwd=repo_root,
                          env=dict(env, BEST_FROM=str(tmp_path / "nowhere.json")), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and "does not exist (a fresh machine? pass BEST_ARGS instead)" in proc.stdout
    assert "best        skipped (BEST_FROM: no such file)" in (missing / "summary.txt").read_text()

    pick = {"target": "92.52", "kind": "plain", "variant": "tiny", "val_acc": 93.0, "margin": 0.48, "epochs": 1,
            "best_args": tiny}
    proc, out = session("tiny", {"benchmark": "recipe_ablation", "complete": True, "fastest": {"92.52": {}},
                                 "next": pick}, seeds=2, BEST_EXTRA="--optim.muon_batching padded")
    assert proc.returncode == 0, proc.stderr
    assert "BEST_ARGS=" + tiny in proc.stdout and "best        ok" in (out / "summary.txt").read_text()
    limit = int(re.search(r"== best \(limit (\d+)s\)", proc.stdout).group(1))
    assert limit <= 240 - 30  # the export's 30 s are kept out of the runs' limit
    with tarfile.open(out / "gpu-session.tar.gz") as archive:
        best = json.load(archive.extractfile("./best.json"))
    assert best["complete"] is True and best["seeds"] == [0, 1]
    assert best["config"]["model"]["base_channels"] == 8 and best["config"]["data"]["cutout"] == 4
    assert best["config"]["train"]["compile"] is False and best["config"]["train"]["epochs"] == 2
    assert best["config"]["optim"]["muon_batching"] == "padded"  # BEST_EXTRA, beside the candidate's flags
    assert (out / "weights-best-bf16.pt").is_file()
    from fasttrain.checkpoint import load_checkpoint
    note = load_checkpoint(out / "weights-best-bf16.pt")["export"]["note"]
    # the best run's weights (issue 6): the seed with the higher final accuracy, with best.yaml's TTA
    assert all(r["final_test_acc_tta"] is not None for r in best["runs"])
    by_acc = sorted(best["runs"], key=lambda r: r["final_test_acc_tta"])
    assert by_acc[0]["final_test_acc_tta"] != by_acc[1]["final_test_acc_tta"], "the seeds tie: the pick is untested"
    winner = by_acc[1]["seed"]
    assert winner != 0, "seed 0 won: a runbook exporting the first seed would pass unseen"
    assert note.startswith(f"trained on CIFAR-10 from {cifar_dir}; seed-{winner} of benchmarks/gpu_session.sh best")


def test_recipe_ablation_jobs_run_the_same_runs_in_parallel(repo_root, cifar_dir, tmp_path):
    """--jobs 2: each run in its own process, the same accuracies as one at a time (same seeds, CPU
    determinism), runs listed in the variants' order, each run's output in its own log, times marked shared."""
    variants = tmp_path / "variants.yaml"
    variants.write_text("base: {}\nmore_lr: {optim.lr: 0.5}\n")
    results = {}
    for jobs in (1, 2):
        out, runs = tmp_path / f"ablation-{jobs}.json", tmp_path / f"runs-{jobs}"
        proc = run_script(repo_root, cifar_dir, "benchmarks/recipe_ablation.py", *ABLATION_TINY, "--variants",
                          variants, "--seeds", "1", "--val-size", "100", "--targets", "0", "--jobs", jobs,
                          "--out", out, "--runs-dir", runs)
        results[jobs] = json.loads(out.read_text())
        assert results[jobs]["jobs"] == jobs and results[jobs]["complete"] is True
        assert ("runs at a time: shared-device times" in proc.stdout) == (jobs == 2)
    one, two = results[1], results[2]
    assert [(r["variant"], r["seed"]) for r in two["runs"]] == [("base", 0), ("more_lr", 0)]
    for a, b in zip(one["runs"], two["runs"]):
        assert a["final_val_acc"] == b["final_val_acc"] and a["final_val_acc_tta"] == b["final_val_acc_tta"]
        assert [e["val_acc"] for e in a["epochs"]] == [e["val_acc"] for e in b["epochs"]]
    losses = {(jobs, name): [json.loads(line)["train_loss"] for line in
                             (tmp_path / f"runs-{jobs}" / f"{name}-seed-0" / "metrics.jsonl").read_text().splitlines()]
              for jobs in (1, 2) for name in ("base", "more_lr")}
    assert losses[1, "base"] == losses[2, "base"] and losses[1, "more_lr"] == losses[2, "more_lr"]
    assert losses[2, "base"] != losses[2, "more_lr"]  # each run matched its own twin, not a common one
    for name in ("base", "more_lr"):  # the worker's output went to its log, not lost or interleaved
        log = (tmp_path / "runs-2" / f"{name}-seed-0.log").read_text()
        assert "epoch   2/2" in log and "fasttrain run summary" in log
    assert two["aggregate"]["more_lr"]["delta_val_acc_vs_base"] == pytest.approx(
        two["runs"][1]["final_val_acc"] - two["runs"][0]["final_val_acc"])
    text = ablation_summary(repo_root, tmp_path / "ablation-2.json", tmp_path)  # it says the times were shared
    assert "train s (2 runs at a time: shared-device)" in text


@pytest.mark.parametrize("jobs", [1, 2])
def test_recipe_ablation_records_a_failed_run_names_it_and_carries_on(repo_root, cifar_dir, tmp_path, jobs):
    variants = tmp_path / "variants.yaml"
    variants.write_text("base: {}\ndiverges: {optim.lr: 1.0e+30, optim.clip: none}\n")
    out = tmp_path / "a.json"
    env = dict(os.environ, FASTTRAIN_DATA=str(cifar_dir), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "benchmarks/recipe_ablation.py", *ABLATION_TINY, "--variants",
                           str(variants), "--seeds", "1", "--val-size", "100", "--jobs", str(jobs), "--out", str(out),
                           "--runs-dir", str(tmp_path / "runs")], cwd=repo_root, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr
    assert "error: variant 'diverges' seed 0 failed: TrainingError" in proc.stderr
    if jobs > 1:  # a worker process's log; one at a time, the error is in this process's own output
        assert str(tmp_path / "runs" / "diverges-seed-0.log") in proc.stderr
    assert "error: 1 run(s) failed: diverges seed 0" in proc.stderr
    saved = json.loads(out.read_text())  # the other run went on to the end, and the result says what failed
    assert saved["complete"] is True and [r["variant"] for r in saved["runs"]] == ["base"]
    assert list(saved["aggregate"]) == ["base"] and saved["failed"][0]["variant"] == "diverges"
    assert saved["failed"][0]["error"].startswith("TrainingError")
    assert (saved["failed"][0]["log"] or "").endswith(".log") == (jobs > 1)
    text = ablation_summary(repo_root, out, tmp_path)
    assert "  diverges             FAILED (seed 0): TrainingError" in text
    assert "(PARTIAL: diverges not judged)" in text


def test_recipe_ablation_one_at_a_time_with_every_run_failed_still_reports(repo_root, cifar_dir, tmp_path):
    variants = tmp_path / "variants.yaml"
    variants.write_text("base: {}\nagain: {optim.momentum: 0.8}\n")
    out = tmp_path / "a.json"
    env = dict(os.environ, FASTTRAIN_DATA=str(cifar_dir), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "benchmarks/recipe_ablation.py", *ABLATION_TINY, "--variants",
                           str(variants), "--seeds", "1", "--val-size", "100", "--out", str(out), "--optim.lr",
                           "1.0e+30", "--optim.clip", "none"], cwd=repo_root, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "error: 2 run(s) failed: base seed 0, again seed 0" in proc.stderr
    saved = json.loads(out.read_text())
    assert saved["complete"] is True and saved["runs"] == [] and saved["meta"]["device"]
    text = ablation_summary(repo_root, out, tmp_path)
    assert "next        no variant was judged (PARTIAL: base, again not judged)" in text


def test_recipe_ablation_jobs_name_a_run_whose_process_died(repo_root, cifar_dir, tmp_path):
    """A worker killed outright (here: os._exit at its 3rd step, the distributed tests' fault injection)
    leaves no result: the parent notices by the exit code, names the run and stops; it never waits forever."""
    variants = tmp_path / "variants.yaml"
    variants.write_text("base: {}\nother: {optim.lr: 0.5}\n")
    env = dict(os.environ, FASTTRAIN_DATA=str(cifar_dir), OMP_NUM_THREADS="1", FASTTRAIN_TEST_DIE_RANK="0",
               FASTTRAIN_TEST_DIE_STEP="3")
    proc = subprocess.run([sys.executable, "benchmarks/recipe_ablation.py", *ABLATION_TINY, "--variants",
                           str(variants), "--seeds", "1", "--val-size", "100", "--jobs", "2",
                           "--runs-dir", str(tmp_path / "runs"), "--out", str(tmp_path / "a.json")],
                          cwd=repo_root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr
    assert "failed: its process ended with exit code 1 and no result (crashed or killed)" in proc.stderr
    assert "exits with status 1 at training step 3 (fault injection)" in proc.stderr  # the log's tail
    saved = json.loads((tmp_path / "a.json").read_text())
    assert saved["complete"] is True and sorted(f["variant"] for f in saved["failed"]) == ["base", "other"]


@pytest.mark.parametrize("variants_text, extra, message", [
    ("base: {}\nbad: {optim.lr_typo: 0.2}\n", [], "variant 'bad': unknown key"),
    ("base: {}\nbad: {data.val_size: 10}\n", [], "variant 'bad': data.val_size is set by recipe_ablation"),
    ("base: {}\nbig: {model.max_params: 1000}\n", [], "variant 'big': the model has"),  # over budget
    ("base: {optim.lr: 1.0}\n", [], "'base' is the unchanged recipe"),
    ("base: {}\nok: {optim.lr: 0.2}\n", ["--only", "nope"], "unknown variant(s) nope"),
    ("base: {}\n", ["--jobs", "0"], "--jobs 0: need at least 1"),
    # the tuning protocol's own keys: never silently replaced, never carried into the final run's flags
    ("base: {}\n", ["--data.val_size", "256"], "--data.val_size: set by recipe_ablation itself"),
    ("base: {}\n", ["--train.eval_test", "true"], "--train.eval_test: set by recipe_ablation itself"),
    ("base: {}\nok: {optim.lr: 0.2}\n", ["--runs-dir", "HELD"], "already holds runs (ok-seed-0): pass --overwrite"),
])
def test_recipe_ablation_refuses_bad_variants_before_training(repo_root, cifar_dir, tmp_path, variants_text, extra,
                                                              message):
    variants = tmp_path / "variants.yaml"
    variants.write_text(variants_text)
    held = tmp_path / "held"  # a runs folder that holds one of the runs already
    (held / "ok-seed-0").mkdir(parents=True)
    (held / "ok-seed-0" / "config.yaml").write_text("name: earlier\n")
    runs = held if "HELD" in extra else tmp_path / "runs"
    extra = [a for a in extra if a not in ("--runs-dir", "HELD")]
    env = dict(os.environ, FASTTRAIN_DATA=str(cifar_dir))
    proc = subprocess.run([sys.executable, "benchmarks/recipe_ablation.py", *ABLATION_TINY, "--variants",
                           str(variants), "--runs-dir", str(runs), "--out", str(tmp_path / "a.json"),
                           *extra], cwd=repo_root, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert not (tmp_path / "runs").exists() and not (tmp_path / "a.json").exists()  # nothing trained
    assert not (held / "base-seed-0").exists()


def test_shipped_recipe_variants_all_build(bench):
    """Every variant in benchmarks/recipe_variants.yaml is a valid config of configs/best.yaml under the budget."""
    ra = bench["recipe_ablation"]
    variants = ra.read_variants(ra.DEFAULT_VARIANTS, None)
    assert list(variants)[0] == "base" and len(variants) > 10
    gflops = {}
    for name, changes in variants.items():
        cfg, gflops[name] = ra.variant_config("configs/best.yaml", {}, name, changes, 5000)
        assert cfg.data.val_size == 5000 and not cfg.train.eval_test
    # the verdict's cost of runs side by side: the network's FLOPs, the paper's 798,690,304 multiply-adds x 2
    assert gflops["paper_blocks"] == pytest.approx(2 * 798_690_304 / 1e9, rel=1e-9)
    assert gflops["base"] == pytest.approx(1.144395776, rel=1e-9)  # best.yaml's [3,3,2]
    assert gflops["epochs_60"] == gflops["base"] and gflops["blocks_2_2_2"] < 0.75 * gflops["base"]


# the runbook's first call: best.yaml with the SGD recipe the verdict picks (gpu_session.sh's header)
SGD_RECIPE_FLAGS = "--optim.name=sgd --optim.impl=fused --optim.lr=0.8"


def test_gpu_session_variant_lists_name_shipped_variants(bench, repo_root):
    """gpu_session.sh's ABLATION_ONLY_* and SEARCH_ONLY name variants of benchmarks/recipe_variants.yaml: a
    typo there would end a device call at recipe_ablation's --only check, its minutes spent on staging. Each
    variant changes the recipe its list is for: the SGD list's base is best.yaml with the runbook's SGD flags."""
    from fasttrain.config import parse_overrides
    ra = bench["recipe_ablation"]
    script = (repo_root / "benchmarks" / "gpu_session.sh").read_text().replace("\\\n", "")
    lists = dict(re.findall(r"^(ABLATION_ONLY_MUON|ABLATION_ONLY_SGD|SEARCH_ONLY)=(\S+)$", script, flags=re.M))
    assert set(lists) == {"ABLATION_ONLY_MUON", "ABLATION_ONLY_SGD", "SEARCH_ONLY"}
    sgd = parse_overrides(SGD_RECIPE_FLAGS.split())
    bases = {"ABLATION_ONLY_SGD": sgd, "ABLATION_ONLY_MUON": {}, "SEARCH_ONLY": {}}
    for name, names in lists.items():
        only = names.split(",")
        assert len(only) <= 5, f"{name}: base and at most 5 more start together at JOBS=6"
        variants = ra.read_variants(ra.DEFAULT_VARIANTS, only)
        assert list(variants) == ["base", *only], name
        base, _ = ra.variant_config("configs/best.yaml", bases[name], "base", {}, 5000)
        for variant in only:  # each changes its recipe (no_lookahead did nothing once best.yaml ran Muon)
            cfg, _ = ra.variant_config("configs/best.yaml", bases[name], variant, variants[variant], 5000)
            assert cfg != base, f"{name}: {variant} is its base itself"
    # the SGD list's optimizer rows are the two recipes it is weighed against, whatever best.yaml is by then:
    # each sets every key the SGD flags set, and muon_recipe is the sixth session's Muon key for key (its run's
    # recorded config; keys added since keep their defaults)
    from fasttrain.config import config_to_dict
    rows, on_sgd = ra.read_variants(ra.DEFAULT_VARIANTS, ["muon_recipe", "lookahead_lr0.4"]), {}
    for row in ("muon_recipe", "lookahead_lr0.4"):
        on_sgd[row], _ = ra.variant_config("configs/best.yaml", sgd, row, rows[row], 5000)
        alone, _ = ra.variant_config("configs/best.yaml", {}, row, rows[row], 5000)
        assert on_sgd[row] == alone, f"{row} leaves a key of the SGD flags to its base"
    muon_recipe = config_to_dict(on_sgd["muon_recipe"])["optim"]
    recorded = json.loads((repo_root / "benchmarks" / "results" / "2026-11-28-h200-muon" / "best" / "best.json")
                          .read_text())["config"]["optim"]
    assert {key: muon_recipe[key] for key in recorded} == recorded
    lookahead = on_sgd["lookahead_lr0.4"].optim
    assert (lookahead.name, lookahead.impl, lookahead.lr, lookahead.lookahead_k) == ("sgd", "fused", 0.4, 5)


@pytest.mark.parametrize("optimizer, expected", [("muon", "ABLATION_ONLY_MUON"), ("sgd", "ABLATION_ONLY_SGD"),
                                                 ("adamw", "no take-one-away list for best.yaml's optimizer adamw"),
                                                 ("adam", "optim.name")])
def test_gpu_session_takes_the_write_up_list_for_best_yamls_optimizer(repo_root, tmp_path, optimizer, expected):
    """The writeup and ablation stages take the take-one-away list for the optimizer configs/best.yaml names,
    so making the SGD recipe best.yaml needs no edit of the call; an optimizer with no list is a clear error."""
    script = (repo_root / "benchmarks" / "gpu_session.sh").read_text()
    chooser = script[script.index("ABLATION_ONLY_MUON="):script.index("\n}\n", script.index("best_yaml_ablation()")) + 3]
    (tmp_path / "configs").mkdir()
    best, count = re.subn(r"\n  name: \w+ ", f"\n  name: {optimizer} ",  # optim's: the one indented name key
                          (repo_root / "configs" / "best.yaml").read_text())
    assert count == 1
    (tmp_path / "configs" / "best.yaml").write_text(best)
    proc = subprocess.run(["bash", "-c", chooser + "\nbest_yaml_ablation"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    lists = dict(re.findall(r"^(ABLATION_ONLY_\w+)=(\S+)$", script, flags=re.M))
    if expected not in lists:  # adamw has no list (set ABLATION_ONLY); adam is no optimizer: the config's error
        assert proc.returncode != 0 and proc.stdout == "" and expected in proc.stderr, proc.stderr
        return
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == lists[expected]


def test_gpu_session_runbooks_best_args_make_a_valid_config_other_than_best_yaml(repo_root):
    """Each BEST_ARGS='...' the runbook (gpu_session.sh's header) tells a device call to pass parses and loads
    with configs/best.yaml into another config within the parameter budget: a typo there would cost the call
    (the next session's first, issue 6's measurement) its staging minutes."""
    from fasttrain.config import load_config, parse_overrides
    from fasttrain.model import build_model
    script = (repo_root / "benchmarks" / "gpu_session.sh").read_text()
    lines = re.findall(r"BEST_ARGS='([^']+)'", script)
    assert lines, "the runbook names no BEST_ARGS"
    base = load_config(repo_root / "configs" / "best.yaml", [])
    for line in lines:
        overrides = parse_overrides(line.split())  # gpu_session.sh splits BEST_ARGS on spaces
        cfg = load_config(repo_root / "configs" / "best.yaml", overrides)
        assert cfg != base, line
        build_model(cfg.model)  # refuses a model over model.max_params
    assert SGD_RECIPE_FLAGS in lines


def test_bench_optim_runs_muon_at_each_newton_schulz_count_as_rows_of_their_own(repo_root):
    """--muon-ns-steps 5 3: each Muon impl once per count (a count but 5 named in the row), the SGD ones once;
    the step built for a row runs its count: 3 products an iteration per bank shape (by shape) or per step
    (padded), counted on a two-shape network."""
    sys.path.insert(0, str(repo_root / "benchmarks" / "kernels"))
    try:
        bench_optim = importlib.import_module("bench_optim")
    finally:
        sys.path.remove(str(repo_root / "benchmarks" / "kernels"))
    rows = bench_optim.benchmark_rows(["fused", "muon", "muon-padded"], [5, 3])
    assert rows == [("fused", "fused", None), ("muon", "muon", 5), ("muon-ns3", "muon", 3),
                    ("muon-padded", "muon-padded", 5), ("muon-padded-ns3", "muon-padded", 3)]
    assert bench_optim.benchmark_rows(["muon"], [2]) == [("muon-ns2", "muon", 2)]
    for impl, products_per_iteration in (("muon", 3 * 2), ("muon-padded", 3)):
        for ns_steps in (5, 3, 1):
            params = [torch.randn(8, 4, 3, 3, requires_grad=True), torch.randn(8, 8, 1, 1, requires_grad=True),
                      torch.randn(8, requires_grad=True)]
            for p in params:
                p.grad = torch.randn_like(p)
            step = bench_optim.make_step(impl, params, ns_steps)
            assert bench_optim.count_calls(step)[1] == ns_steps * products_per_iteration, (impl, ns_steps)


def test_muon_ns_check_compares_each_count_with_five_iterations_and_the_polar_factor(repo_root, tmp_path, cifar_dir):
    """benchmarks/muon_ns_check.py on smoke.yaml's network at initialization: a row per count, 5 against itself
    exactly, every figure a cosine in (0, 1] or a ratio, and more iterations nearer U V^T; each bank's figures
    in the file."""
    out = tmp_path / "ns.json"
    proc = subprocess.run([sys.executable, "benchmarks/muon_ns_check.py", "--config", "configs/smoke.yaml",
                           "--batches", "2", "--batch-size", "32", "--steps", "1", "3", "5", "--out", str(out)],
                          cwd=repo_root, env=dict(os.environ, FASTTRAIN_DATA=str(cifar_dir)), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert META_KEYS <= set(report) and report["batches"] == 2 and report["banks_without_gradient"] == []
    rows = {r["ns_steps"]: r for r in report["rows"]}
    assert sorted(rows) == [1, 3, 5]
    assert rows[5]["cos_ns5"] == pytest.approx(1.0) and rows[5]["norm_ratio"] == pytest.approx(1.0)
    assert all(0 < r[k] <= 1 + 1e-9 for r in rows.values() for k in ("cos_ns5", "cos_ns5_min", "cos_polar"))
    assert rows[1]["cos_polar"] < rows[3]["cos_polar"] < rows[5]["cos_polar"]
    assert rows[1]["norm_ratio"] < rows[3]["norm_ratio"]  # one iteration leaves the weak directions short
    smoke_banks = [n for n, p in build_model(load_config("configs/smoke.yaml", []).model).named_parameters()
                   if p.ndim == 4]
    assert sorted(report["banks"]) == sorted(smoke_banks)
    assert "cos U V^T" in proc.stdout and "benchmarks/muon_ns_check.py --config configs/smoke.yaml" in report["command"]


def test_se_gate_check_tells_a_dead_squeeze_from_a_live_one(bench, repo_root, tmp_path, cifar_dir):
    """benchmarks/se_gate_check.py: on a smoke checkpoint, then on the same network with the squeeze's
    pre-activations pushed below 0 for every image (what Muon did to best.yaml's stem SE): 0 units alive and
    a gate that no longer varies over images, sigmoid(fc2.bias) exactly."""
    from fasttrain.trainer import Trainer
    from test_train import quiet, tiny_config

    gate_check = bench["se_gate_check"]
    trainer = Trainer(tiny_config(cifar_dir, tmp_path), device="cpu", console=quiet())
    trainer.save_checkpoint(1)
    torch.manual_seed(0)
    images = torch.randn(64, 3, 32, 32)
    live = gate_check.se_activity(trainer.model, images)["stem_se"]
    assert live["hidden"] == 2 and live["alive"] >= 1 and live["gate_std"] > 0  # smoke.yaml: 8 channels, r 4
    se = trainer.model.stem_se
    with torch.no_grad():
        se.fc1.bias.fill_(-1e3)  # no image's pooled features can lift it over 0
    dead = gate_check.se_activity(trainer.model, images)["stem_se"]
    assert dead["alive"] == 0 and max(dead["pre_max"]) < 0 and dead["gate_std"] == 0
    expected = torch.sigmoid(se.fc2.bias.detach())
    assert (dead["gate_min"], dead["gate_max"]) == (pytest.approx(float(expected.min())),
                                                    pytest.approx(float(expected.max())))
    out = tmp_path / "se.json"
    proc = subprocess.run([sys.executable, "benchmarks/se_gate_check.py", str(tmp_path / "last.pt"), "--images", "100",
                           "--out", str(out)], cwd=repo_root, env=dict(os.environ, FASTTRAIN_DATA=str(cifar_dir)),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["command"].endswith(f"benchmarks/se_gate_check.py {tmp_path / 'last.pt'} --images 100 --out {out}")
    (result,) = report["results"].values()
    assert result["images"] == 100 and result["blocks"]["stem_se"]["alive"] >= 1
    assert "stem_se" in proc.stdout


# ------------------------------------------------------------------------------------- SE tile sweep
def test_tile_sweep_ranks_only_correct_pairs_by_the_stem_then_the_total(repo_root):
    sys.path.insert(0, str(repo_root / "benchmarks" / "kernels"))
    try:
        tune = importlib.import_module("tune_se")
    finally:
        sys.path.remove(str(repo_root / "benchmarks" / "kernels"))

    def row(gate, reduce, placement, ms, correct=True):
        return {"gate_tile": gate, "reduce_tile": reduce, "placement": placement, "forward_backward_ms": ms,
                "correct": correct, "default": (gate, reduce) == (4096, 2048)}

    rows = [row(4096, 2048, "stem", 0.30), row(4096, 2048, "block", 0.50),
            row(2048, 2048, "stem", 0.20), row(2048, 2048, "block", 0.90),
            row(8192, 2048, "stem", 0.20), row(8192, 2048, "block", 0.40),
            row(1024, 1024, "stem", 0.10), row(1024, 1024, "block", 0.10, correct=False)]  # fast but wrong
    ranked = tune.rank_pairs(rows)
    assert [(p["gate_tile"], p["reduce_tile"]) for p in ranked] == [(8192, 2048), (2048, 2048), (4096, 2048)]
    assert ranked[0]["stem_ms"] == pytest.approx(0.20) and ranked[0]["total_ms"] == pytest.approx(0.60)
    assert [p["default"] for p in ranked] == [False, False, True]


def test_tile_sweep_checks_the_backward_too(repo_root, interpreted, monkeypatch):
    """The sweep's correctness check covers the gradients: a backward kernel that drops the pooled path
    of dx (a wrong tile would do as much) is caught, though the forward is untouched."""
    sys.path.insert(0, str(repo_root / "benchmarks" / "kernels"))
    try:
        tune = importlib.import_module("tune_se")
    finally:
        sys.path.remove(str(repo_root / "benchmarks" / "kernels"))
    from fasttrain.kernels import se as se_mod

    torch.manual_seed(0)
    x = torch.randn(2, 16, 4, 4).to(torch.bfloat16).requires_grad_()
    w = [(torch.randn(1, 16) * 0.3).requires_grad_(), torch.zeros(1, requires_grad=True),
         (torch.randn(16, 1) * 0.3).requires_grad_(), torch.zeros(16, requires_grad=True)]
    assert tune.forward_backward_error(se_mod, x, w, None) < 1e-2
    real_gate_backward = se_mod._gate_backward
    monkeypatch.setattr(se_mod, "_gate_backward",
                        lambda g, s, dx_pool, dx, fast: real_gate_backward(g, s, torch.zeros_like(dx_pool), dx, fast))
    assert tune.forward_backward_error(se_mod, x, w, None) > 1e-2


def test_result_files_write_every_non_finite_number_as_null(bench, tmp_path):
    """JSON has no NaN or Infinity (strict parsers refuse them): write_json writes null for each, inside
    lists, tuples and nested dicts as at the top."""
    path = bench["common"].write_json(tmp_path / "r.json", {
        "a": float("nan"), "rows": [1.5, float("inf"), {"ms": float("-inf"), "w": [float("nan"), 2]}],
        "pair": (float("inf"), 3.0), "nested": {"deeper": {"x": float("nan")}}})
    assert json.loads(path.read_text()) == {"a": None, "rows": [1.5, None, {"ms": None, "w": [None, 2]}],
                                            "pair": [None, 3.0], "nested": {"deeper": {"x": None}}}


def test_result_tables_put_each_figure_under_its_own_header(bench, capsys):
    """The printed tables of time_to_accuracy.py, throughput.py and bench_loader.py: each figure of a
    synthetic result sits in its own column (two numbers of one format are easily swapped)."""
    tta = bench["time_to_accuracy"]
    runs = [{"seed": 0, "final_test_acc": 91.25, "final_test_acc_tta": 92.5, "best_test_acc": 93.75,
             "train_seconds": 10.0, "compile_seconds": 1.0, "time_to_target": {"90": 8.0},
             "epochs_to_target": {"90": 4}}]
    tta.print_tables({"config": {"name": "best", "train": {"tta": "flip"}}, "meta": {"device": "cpu"}, "runs": runs,
                      "targets": [90.0], "aggregate": tta.aggregate(runs, [90.0]), "process_wall_seconds": 12.0})
    seed = table_rows(capsys.readouterr().out)[0]
    assert (seed["final %"], seed["final TTA %"], seed["best %"]) == ("91.25", "92.50", "93.75")

    bench["throughput"].print_table({"bf16_peak_tflops": None, "measured_bf16_matmul_tflops": None,
                                     "model": {"name": "seed", "params": 1000}, "meta": {"device": "cpu"},
                                     "rows": [{"step": "1", "name": "plain", "batch_size": 128, "status": "ok",
                                               "images_per_second": 5000.0, "ms_per_step": 25.6, "speedup": 1.0,
                                               "tflops": 0.5, "bf16_peak_fraction": None, "warmup_seconds": 2.0,
                                               "note": None}]})
    row = table_rows(capsys.readouterr().out)[0]
    assert (row["img/s"], row["ms/step"], row["speed-up"]) == ("5,000", "25.60", "1.00x")

    bench["bench_loader"].print_results([{"loader": "torch", "mode": "alone", "images": 2048, "seconds": 0.5,
                                          "images_per_s": 4096.0}])
    row = table_rows(capsys.readouterr().out)[0]
    assert (row["images/s"], row["images"], row["seconds"]) == ("4,096", "2048", "0.500")


def test_gpu_result_files_partial_until_finished(bench, tmp_path, capsys):
    """bench_se/tune_se save a .partial.json as they go; the final write replaces it."""
    common, cpu = bench["common"], torch.device("cpu")
    common.save_partial(tmp_path, "bench_x", cpu, {"rows": [1]})
    partial = common.gpu_result_path(tmp_path, "bench_x", cpu, partial=True)
    assert json.loads(partial.read_text()) == {"rows": [1], "complete": False}
    final = common.finish_gpu_benchmark(tmp_path, "bench_x", cpu, {"rows": [1, 2]}, ("t", ["a"], [["1"]]))
    assert final == common.gpu_result_path(tmp_path, "bench_x", cpu) and final.name.endswith(".json")
    assert json.loads(final.read_text()) == {"rows": [1, 2]} and not partial.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [final.name]


# ------------------------------------------------------------------------------------- kernel benchmarks
@pytest.mark.parametrize("script, rows", [
    ("bench_se.py", [(placement, impl) for placement in ("stem", "block")
                     for impl in ("triton", "eager-ref", "compiled-ref", "eager-module", "compiled-module")]),
    ("bench_optim.py", [(None, impl) for impl in ("fused", "foreach+python", "fused-sgd+lerp", "muon",
                                                   "muon-padded")]),
])
def test_kernel_benchmark_cpu_smoke_runs_every_implementation(repo_root, tmp_path, script, rows):
    """What the GPU session's kernels stage runs, on a CPU: every implementation of each case is built,
    run forward and backward (or stepped) and timed, and the result file is whole and says it is a smoke
    run. The fused kernels take their PyTorch paths here (no interpreter: the script's own process)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, f"benchmarks/kernels/{script}", "--cpu-smoke", "--out", str(tmp_path)],
                          cwd=repo_root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "CPU smoke run, its times mean nothing" in proc.stdout
    (result,) = tmp_path.iterdir()  # no .partial.json left beside it
    report = json.loads(result.read_text())
    assert result.name == f"{script[:-3]}_cpu.json" and report["cpu_smoke"] is True
    assert report["device"].startswith("CPU") and report["git_sha"]
    assert [(r.get("placement"), r["impl"]) for r in report["rows"]] == rows
    times = [r[k] for r in report["rows"] for k in ("forward_ms", "forward_backward_ms", "step_ms", "gpu_step_ms")
             if k in r]
    assert len(times) == len(rows) * 2  # bench_se: forward, forward+backward; bench_optim: with host, GPU alone
    assert all(math.isfinite(t) and t > 0 for t in times)
    if script == "bench_optim.py":
        assert {r["params"] for r in report["rows"]} == {4_697_742}
        # each step's calls, counted: Muon by shape runs 5 x 3 products per bank shape (10 on the seed network),
        # padded 15 in all, in fewer calls; the SGD steps multiply no matrices
        calls = {r["impl"]: (r["aten_calls"], r["matmuls"]) for r in report["rows"]}
        assert calls["muon"][1] == 15 * 10 and calls["muon-padded"][1] == 15
        assert calls["muon-padded"][0] < calls["muon"][0] and calls["fused"][1] == 0


def test_tile_sweep_cpu_smoke_runs_every_pair(repo_root, tmp_path):
    """The tune stage's script on a CPU: every (gate, reduce) tile pair at each smoke shape is checked against
    the reference, timed and ranked, and the result file is whole. (Its make_inputs call once lacked the
    device argument: a TypeError on the first pair that only a GPU session would have met.)"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "benchmarks/kernels/tune_se.py", "--cpu-smoke", "--out", str(tmp_path)],
                          cwd=repo_root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "CPU smoke run, its times mean nothing" in proc.stdout
    (result,) = tmp_path.iterdir()  # no .partial.json left beside it
    report = json.loads(result.read_text())
    assert result.name == "tune_se_cpu.json" and report["cpu_smoke"] is True
    pairs = [(g, r) for g in (64, 128) for r in (64, 128)]
    assert [(row["gate_tile"], row["reduce_tile"]) for row in report["rows"]] == [p for p in pairs for _ in range(2)]
    assert [row["placement"] for row in report["rows"][:2]] == ["stem", "block"]
    assert all(row["correct"] and math.isfinite(row["forward_backward_ms"]) for row in report["rows"])
    assert sorted((p["gate_tile"], p["reduce_tile"]) for p in report["ranked"]) == pairs
    stem_ms = [p["stem_ms"] for p in report["ranked"]]
    assert stem_ms == sorted(stem_ms) and all(t > 0 for t in stem_ms)
