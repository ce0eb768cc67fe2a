"""Reliability (issue 8): no lost work, no crash on bad input, no code run from data.

Real CIFAR-10 from FASTTRAIN_DATA, tiny models. The subprocess runs use one intra-op thread each
(OMP_NUM_THREADS=1), so runs that must agree bit for bit do the same float arithmetic, and so they
do not fight over the 2 CI cores. channels_last is off in these runs: torch 2.14.1's CPU conv
backward crashes on channels_last inputs with 4 channels, and memory layout is not what these
tests are about.
"""
import contextlib
import errno
import io
import json
import os
import pickle
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from fasttrain import cli
from fasttrain import trainer as trainer_module
from fasttrain.checkpoint import (FORMAT, CheckpointError, find_resume_checkpoint, load_checkpoint,
                                  write_checkpoint)
from fasttrain import run_folder
from fasttrain.config import ConfigError, load_config, save_config
from fasttrain.run_folder import LOCK, FolderLock
from fasttrain.signals import RunInterrupted, StopRequest, held_back
from fasttrain.trainer import Trainer, TrainingError
from test_train import assert_identical, quiet, recording_console, stop_mid_epoch, untimed_rows

REPO = Path(__file__).resolve().parents[1]
TINY = ["--data.train_subset", "640", "--data.test_subset", "200", "--model.blocks", "[1,1,1]",
        "--model.base_channels", "4", "--model.se_reduction", "2", "--train.batch_size", "64",
        "--train.eval_batch_size", "100", "--optim.lookahead_k", "3", "--train.epochs", "2",
        "--output.progress", "false", "--train.channels_last", "false"]
STEPS = 10  # 640 images / batch 64
FAULT_ENV = ("FASTTRAIN_INJECT_NAN_STEP", "FASTTRAIN_TEST_STEP_SLEEP")


# ------------------------------------------------------------------------------------------ helpers
def tiny(cifar_dir, run_dir, *extra) -> list[str]:
    """TINY plus data/output dirs, with `extra` ("--key value" pairs) replacing keys already there
    (the config loader refuses a key given twice)."""
    pairs = dict(zip(TINY[::2], TINY[1::2]))
    pairs.update({"--data.dir": str(cifar_dir), "--output.dir": str(run_dir)})
    pairs.update(zip(extra[::2], extra[1::2]))
    return [item for pair in pairs.items() for item in pair]


def cli_args(cifar_dir, run_dir, *extra):
    return ["--config", str(REPO / "configs/smoke.yaml"), "--device", "cpu", *tiny(cifar_dir, run_dir, *extra)]


def tiny_config(cifar_dir, run_dir, *extra):
    return load_config(REPO / "configs/smoke.yaml", tiny(cifar_dir, run_dir, *extra))


def child_env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in FAULT_ENV}
    env.update(OMP_NUM_THREADS="1", **extra)
    return env


def run_cli(args, *, env_extra=None, expect=0):
    proc = subprocess.run([sys.executable, "-m", "fasttrain", *args], cwd=REPO, capture_output=True, text=True,
                          env=child_env(**(env_extra or {})), timeout=300)
    assert proc.returncode == expect, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc


def run_cli_after(prelude: str, *args: str, **env_extra) -> subprocess.CompletedProcess:
    """`python -m fasttrain ARGS` in a fresh interpreter that first runs `prelude`, the fault to inject (a patched
    torch.save, an import hook, an atexit callback); a prelude that takes an argument pops it off sys.argv[1]."""
    code = prelude + '\nimport runpy\nrunpy.run_module("fasttrain", run_name="__main__", alter_sys=True)\n'
    return subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, capture_output=True, text=True,
                          env=child_env(**env_extra), timeout=300)


def start_cli(args, log_dir: Path, **env_extra):
    """A training run in the background; its output goes to files (a full pipe would block it)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    out, err = open(log_dir / "stdout.txt", "w"), open(log_dir / "stderr.txt", "w")
    proc = subprocess.Popen([sys.executable, "-m", "fasttrain", *args], cwd=REPO, stdout=out, stderr=err,
                            env=child_env(**env_extra))
    out.close()
    err.close()
    return proc


def logs(log_dir: Path) -> str:
    return (log_dir / "stdout.txt").read_text() + (log_dir / "stderr.txt").read_text()


def wait_for_checkpoint(proc, path: Path, epoch: int, log_dir: Path, timeout: float = 240.0) -> None:
    """Poll until `path` holds a checkpoint of `epoch` completed epochs. Every read must succeed:
    the file is only ever replaced by a rename, so a reader never sees half of one."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the run ended (exit {proc.returncode}) before {path} reached epoch {epoch}:\n"
                        + logs(log_dir))
        if path.is_file() and load_checkpoint(path)["epoch"] >= epoch:
            return
        time.sleep(0.02)
    proc.kill()
    pytest.fail(f"timed out waiting for {path} to reach epoch {epoch}:\n" + logs(log_dir))


def assert_same_training_state(a: dict, b: dict) -> None:
    """Bit-identical weights, optimizer state (momentum, Lookahead slow weights) and schedule."""
    for key in ("model", "optimizer", "scheduler", "epoch", "step_in_epoch"):
        assert_identical(a[key], b[key], key)


def folder_snapshot(folder: Path) -> dict:
    return {p.relative_to(folder): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))
            if p.is_file()}


def resume_a_copy(cifar_dir, tmp_path, reference_run, *extra) -> tuple[Trainer, list[str]]:
    """reference_run copied to tmp_path/run and resumed there under `extra`: the trainer, and the lines it said."""
    console, said = recording_console()
    run = tmp_path / "run"
    shutil.copytree(reference_run, run)
    return Trainer(tiny_config(cifar_dir, run, *extra), device="cpu", console=console, resume=run / "last.pt"), said


def metric_epochs(run_dir: Path) -> list[int]:
    return [json.loads(line)["epoch"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference_run(cifar_dir, tmp_path_factory) -> Path:
    """The straight 2-epoch run every interrupted run must reproduce exactly."""
    run = tmp_path_factory.mktemp("reference") / "run"
    run_cli(cli_args(cifar_dir, run))
    return run


@pytest.fixture(scope="module")
def good_run(reference_run, tmp_path_factory) -> Path:
    """A finished run folder (config.yaml, last.pt, prev.pt, metrics, summary) for bad-input tests."""
    run = tmp_path_factory.mktemp("good") / "run"
    shutil.copytree(reference_run, run)
    return run


# ------------------------------------------------------------------------------------------ crash safety
def test_kill_9_mid_epoch_then_resume_auto_matches_a_straight_run(cifar_dir, tmp_path, reference_run):
    run, log = tmp_path / "run", tmp_path / "log"
    proc = start_cli(cli_args(cifar_dir, run), log, FASTTRAIN_TEST_STEP_SLEEP="0.1")
    wait_for_checkpoint(proc, run / "last.pt", 1, log)
    time.sleep(0.3)  # a few steps into epoch 2 (each step sleeps 0.1 s, an epoch takes > 1 s)
    proc.kill()  # SIGKILL: no handler, no cleanup
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    killed = load_checkpoint(run / "last.pt")
    assert (killed["epoch"], killed["step_in_epoch"]) == (1, 0), "the kill must land inside epoch 2"

    resumed = run_cli(["--config", str(run / "config.yaml"), "--resume", "auto", "--output.dir", str(run),
                       "--device", "cpu"])
    assert f"resumed {run / 'last.pt'} after epoch 1" in resumed.stdout
    assert_same_training_state(load_checkpoint(run / "last.pt"), load_checkpoint(reference_run / "last.pt"))
    assert metric_epochs(run) == [1, 2]


def test_sigterm_mid_epoch_saves_the_position_and_the_printed_command_resumes_exactly(
        cifar_dir, tmp_path, reference_run):
    run, log = tmp_path / "run", tmp_path / "log"
    proc = start_cli(cli_args(cifar_dir, run), log, FASTTRAIN_TEST_STEP_SLEEP="0.1")
    wait_for_checkpoint(proc, run / "last.pt", 1, log)
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 143, logs(log)
    err = (log / "stderr.txt").read_text()
    assert "stopped by SIGTERM at epoch 2, step" in err and "Traceback" not in err

    stopped = load_checkpoint(run / "last.pt")
    assert stopped["epoch"] == 1 and 0 < stopped["step_in_epoch"] < STEPS, stopped["step_in_epoch"]
    previous = load_checkpoint(run / "prev.pt")  # the epoch-1 checkpoint, kept one generation
    assert (previous["epoch"], previous["step_in_epoch"]) == (1, 0)
    assert metric_epochs(run) == [1]  # no row for half an epoch

    # the message's own command resumes the run
    line = next(s for s in err.splitlines() if "--resume" in s and "auto" not in s)
    command = shlex.split(line)
    assert command[:3] == ["python", "-m", "fasttrain"] and command[-1] == str(run / "last.pt")
    run_cli(command[3:] + ["--device", "cpu"])
    assert_same_training_state(load_checkpoint(run / "last.pt"), load_checkpoint(reference_run / "last.pt"))
    assert metric_epochs(run) == [1, 2]
    auto = next(s for s in err.splitlines() if "--resume auto" in s)
    assert shlex.split(auto)[-2:] == ["--output.dir", str(run)]


def test_sigint_in_process_stops_after_the_step_and_resume_is_exact(cifar_dir, tmp_path):
    """A deterministic stop point (step 3 of epoch 2): the mid-epoch position, Lookahead's period
    (k=3) and the schedule all travel in the checkpoint, and the rest of the epoch replays exactly."""
    straight = Trainer(tiny_config(cifar_dir, tmp_path / "a"), device="cpu", console=quiet())
    straight.fit()

    trainer = Trainer(tiny_config(cifar_dir, tmp_path / "b"), device="cpu", console=quiet())
    handler_before = signal.getsignal(signal.SIGINT)
    stop, steps_run = stop_mid_epoch(trainer, STEPS + 3)
    assert signal.getsignal(signal.SIGINT) is handler_before  # handlers are restored after fit
    assert stop.exit_code == 130 and steps_run == STEPS + 3
    assert "stopped by SIGINT at epoch 2, step 3/10" in str(stop)
    saved = load_checkpoint(tmp_path / "b" / "last.pt")
    assert (saved["epoch"], saved["step_in_epoch"], saved["steps_per_epoch"]) == (1, 3, STEPS)

    resumed = Trainer(tiny_config(cifar_dir, tmp_path / "b"), device="cpu", console=quiet(),
                      resume=tmp_path / "b" / "last.pt")
    assert (resumed.start_epoch, resumed.start_step) == (1, 3)
    resumed.fit()
    for key, value in straight.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key
    rows = untimed_rows(tmp_path / "b")
    assert [r["epoch"] for r in rows] == [1, 2] and [r["train_steps"] for r in rows] == [STEPS, STEPS]
    # the stopped epoch's row is the uninterrupted run's: its first 3 steps' sums came with the checkpoint
    assert rows == untimed_rows(tmp_path / "a")

    # the resumed run kept its own line: prev.pt is now the mid-epoch checkpoint it resumed from
    assert load_checkpoint(tmp_path / "b" / "prev.pt")["step_in_epoch"] == 3
    # a mid-epoch position is refused with another batch count per epoch (it would skip other batches)
    other = tiny_config(cifar_dir, tmp_path / "c", "--train.batch_size", "32")
    with pytest.raises(CheckpointError, match="steps per epoch"):
        Trainer(other, device="cpu", console=quiet(), resume=tmp_path / "b" / "prev.pt")


def test_a_resume_takes_the_runs_clocks_best_accuracy_loss_scale_and_rng_from_its_checkpoint(cifar_dir, tmp_path):
    """Besides the weights and the optimizer, a resume takes from its checkpoint what the summary of the whole
    run adds up (train, compile and wall seconds, each epoch's images per second, the best test accuracy so
    far: an epoch before the stop may have been the best), the fp16 loss scale (restarted at 65536, the
    resumed run would skip steps the straight one took) and the CPU generator (dropout mid-epoch). The values
    are set by hand, each unlike a fresh run's (0, None, [], 65536), so that one not restored shows."""
    run = tmp_path / "run"
    cfg = tiny_config(cifar_dir, run, "--train.precision", "fp16")  # a GradScaler (for GPUs; the CPU has one too)
    trainer = Trainer(cfg, device="cpu", console=quiet())
    trainer.best_test_acc, trainer.train_seconds, trainer.compile_seconds = 41.5, 12.25, 3.5
    trainer._earlier_wall_seconds, trainer.epoch_images_per_second = 20.0, [1500.0]
    trainer.scaler.scale(torch.ones((), requires_grad=True))  # the scale exists from the first step on
    trainer.scaler.update(new_scale=512.0)  # as lowered by overflowing steps
    torch.rand(100)  # the generator moved on while training (else a fresh run's set-up would leave it as saved)
    trainer.save_checkpoint(1)
    drawn = torch.rand(5)  # what the saved generator draws next
    torch.manual_seed(12345)
    resumed = Trainer(cfg, device="cpu", console=quiet(), resume=run / "last.pt")
    assert torch.equal(torch.rand(5), drawn)
    assert (resumed.best_test_acc, resumed.train_seconds, resumed.compile_seconds, resumed.wall_seconds(),
            resumed.epoch_images_per_second) == (41.5, 12.25, 3.5, 20.0, [1500.0])
    assert resumed.scaler.get_scale() == 512.0


def test_a_stop_right_after_an_epochs_checkpoint_writes_no_second_copy(cifar_dir, tmp_path):
    """A signal during epoch 1's evaluation: the run stops before epoch 2 on the checkpoint it has just
    written. Written again, that same position would be rotated into prev.pt, the one fallback, in place of
    an older one. A stop before the first step saves the start. Both messages say where, and the command
    they print (this run's config and device, quoted: a folder name with a space) continues the run."""
    run = tmp_path / "my run"
    trainer = Trainer(tiny_config(cifar_dir, run), device="cpu", console=quiet())
    evaluate_into = trainer._evaluate_into
    trainer._evaluate_into = lambda row: (trainer._stop.request(signal.SIGTERM), evaluate_into(row))
    with pytest.raises(RunInterrupted) as stop:
        trainer.fit()
    message = str(stop.value)
    assert f"stopped by SIGTERM at the end of epoch 1; checkpoint saved: {run / 'last.pt'}" in message
    saved = load_checkpoint(run / "last.pt")
    assert (saved["epoch"], saved["step_in_epoch"]) == (1, 0) and not (run / "prev.pt").exists()
    assert stop.value.exit_code == 143 and stop.value.checkpoint == run / "last.pt"
    resume = next(s for s in message.splitlines() if "--resume" in s and "auto" not in s)
    auto = next(s for s in message.splitlines() if "--resume auto" in s)
    command = ["python", "-m", "fasttrain", "--config", str(run / "config.yaml"), "--device", "cpu", "--resume"]
    assert shlex.split(resume) == command + [str(run / "last.pt")]
    assert shlex.split(auto) == command + ["auto", "--output.dir", str(run)]

    fresh = tmp_path / "fresh"
    trainer = Trainer(tiny_config(cifar_dir, fresh), device="cpu", console=quiet())
    trainer._stop.request(signal.SIGINT)  # came before the first step
    with pytest.raises(RunInterrupted, match="stopped by SIGINT at the start of training; checkpoint saved"):
        trainer.fit()
    assert (load_checkpoint(fresh / "last.pt")["epoch"], load_checkpoint(fresh / "last.pt")["step_in_epoch"]) == (0, 0)


def test_a_resume_with_another_batch_count_replans_the_schedule_from_its_epoch(cifar_dir, tmp_path, reference_run):
    """An epoch-boundary checkpoint resumed with another train.batch_size (or on another number of ranks: the
    global batch) is allowed, with warnings: the learning-rate schedule goes on from the checkpoint's epoch
    counted in the new steps per epoch (its saved step count is in the old ones)."""
    resumed, said = resume_a_copy(cifar_dir, tmp_path, reference_run, "--train.batch_size", "32")
    assert resumed.steps_per_epoch == 2 * STEPS and resumed.start_epoch == 2
    assert resumed.schedule.step_count == 2 * resumed.steps_per_epoch
    assert resumed.optimizer.param_groups[0]["lr"] == resumed.schedule.lr_at(2 * resumed.steps_per_epoch)
    said = " ".join(" ".join(said).split())  # rich wraps long lines
    assert f"{STEPS} steps per epoch on 1 rank(s); this run has {2 * STEPS} on 1" in said
    assert "the learning-rate schedule continues from epoch 2" in said
    assert "train.batch_size 64 -> 32" in said and "(the learning-rate schedule follows its epochs" in said


def test_a_resume_on_another_data_subset_says_what_changed_and_not_to_pass_another_data_dir(cifar_dir, tmp_path,
                                                                                            reference_run):
    """Another data.train_subset under the same batch size gives another number of steps per epoch: the
    global batch is the same (64), and the data is read from the same folder, so neither "the global batch
    changes" nor "pass the --data.dir it was trained on" may be said (the config warning names the subset)."""
    resumed, said = resume_a_copy(cifar_dir, tmp_path, reference_run, "--data.train_subset", "1280")
    assert resumed.steps_per_epoch == 2 * STEPS and resumed.cfg.train.batch_size == 64
    said = " ".join(" ".join(said).split())  # rich wraps long lines
    assert "data.train_subset 640 -> 1280" in said
    assert f"{STEPS} steps per epoch on 1 rank(s); this run has {2 * STEPS} on 1" in said
    assert "the global batch changes" not in said, said
    assert "--data.dir" not in said, said


def test_a_mid_epoch_checkpoint_of_two_ranks_with_other_steps_per_epoch_names_the_ranks_as_the_cause(cifar_dir,
                                                                                                     tmp_path):
    """A mid-epoch checkpoint of a 2-rank run (5 steps per epoch each) cannot go on in one process (10): the
    refusal must name the ranks, not another batch size or data subset, and not send the user to the run
    folder's config.yaml, which is the very config this resume used."""
    from fasttrain.distributed import DistInfo

    run = tmp_path / "run"
    cfg = tiny_config(cifar_dir, run)
    trainer = Trainer(cfg, device="cpu", console=quiet())
    trainer.dist, trainer.steps_per_epoch = DistInfo(rank=0, world_size=2), STEPS // 2  # a 2-rank run's shard
    partial = {"loss_sum": 6.5, "correct": 40, "seen": 384, "steps": 3}
    write_checkpoint(trainer.checkpoint_state(0, 3, rank_rng=None, partial=partial), run / "last.pt")
    save_config(cfg, run / "config.yaml")
    with pytest.raises(CheckpointError) as refused:
        Trainer(load_config(run / "config.yaml"), device="cpu", console=quiet(), resume=run / "last.pt")
    message = str(refused.value)
    assert f"{STEPS // 2} steps per epoch" in message and "2 rank(s)" in message, message
    assert "another train.batch_size or data subset" not in message and "config.yaml" not in message, message


def test_a_mid_epoch_resume_restores_each_ranks_own_rng_and_says_when_it_cannot():
    """torchrun without the minutes of a torchrun run: _restore_rng and the mid-epoch warning on a stand-in
    trainer (its rank, world size and console). A rank takes its own saved state when the checkpoint holds
    one per rank for as many ranks, else rank 0's ("rng"); any other resume is said not to be exact."""
    from types import SimpleNamespace

    from fasttrain.checkpoint import rng_state
    from fasttrain.distributed import DistInfo

    cpu = torch.device("cpu")
    states = []
    for seed in (1, 2, 3):  # three distinct states, so the test can tell which one was taken
        torch.manual_seed(seed)
        states.append(rng_state(cpu))
    ckpt = {"rng": states[0], "rng_per_rank": states[1:], "world_size": 2}

    def taken(dist) -> tuple[int, bool]:
        stand_in = SimpleNamespace(dist=dist, device=cpu)
        Trainer._restore_rng(stand_in, ckpt)
        now = torch.get_rng_state()
        return next(i for i, s in enumerate(states) if torch.equal(s["torch"], now)), stand_in._rank_rng_restored

    assert taken(DistInfo(rank=1, world_size=2, local_rank=1)) == (2, True)
    assert taken(DistInfo(rank=0, world_size=2)) == (1, True)
    assert taken(DistInfo(rank=1, world_size=3, local_rank=1)) == (0, False)  # another number of ranks
    assert taken(DistInfo()) == (0, False)  # one process

    def warnings(dist, saved_world, restored) -> list[str]:
        said = []
        stand_in = SimpleNamespace(dist=dist, _rank_rng_restored=restored, start_epoch=1,
                                   console=SimpleNamespace(warn=said.append))
        Trainer._warn_inexact_mid_epoch(stand_in, Path("last.pt"), {"world_size": saved_world})
        return said

    assert warnings(DistInfo(), 1, False) == []  # one process, as saved
    assert warnings(DistInfo(world_size=2), 2, True) == []  # each rank's own state restored
    [same] = warnings(DistInfo(world_size=2), 2, False)  # as many ranks, no per-rank states (hand-made)
    assert "without each rank's RNG state" in same and "not an exact continuation" in same
    [fewer] = warnings(DistInfo(), 2, False)
    assert "by 2 rank(s) and is resumed on 1" in fewer and "(resume on 2 rank(s) for one)" in fewer
    [more] = warnings(DistInfo(world_size=2), 1, False)
    assert "by 1 rank(s) and is resumed on 2" in more and "(resume on 1 rank(s) for one)" in more


@pytest.mark.parametrize("world, local_world, launcher", [
    (1, None, "python"),
    (4, None, "torchrun --standalone --nproc_per_node=4"),
    (4, "4", "torchrun --standalone --nproc_per_node=4"),
    (8, "4", "torchrun --nnodes=2 --nproc_per_node=4 [this job's --rdzv-* options, on every node]"),
])
def test_the_printed_resume_command_launches_as_many_ranks_as_the_run_had(monkeypatch, world, local_world, launcher):
    """On as many ranks a mid-epoch stop continues exactly; a job over several nodes keeps its node count and
    names what only the job knows (its rendezvous options)."""
    from types import SimpleNamespace

    from fasttrain.distributed import DistInfo

    if local_world is None:
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", local_world)
    assert Trainer._resume_launcher(SimpleNamespace(dist=DistInfo(world_size=world))) == launcher


def test_a_mid_epoch_checkpoint_of_two_ranks_resumed_by_one_process_is_said_not_to_be_exact(cifar_dir, tmp_path):
    """The data goes on where the 2-rank run stopped (the same steps per epoch), but not each rank's
    randomness: allowed (a preempted job restarted on another allocation), with the warning. The checkpoint
    is the Trainer's own state as a 2-rank run records it (no process group needed to build it)."""
    from fasttrain.distributed import DistInfo

    run = tmp_path / "run"
    cfg = tiny_config(cifar_dir, run)
    trainer = Trainer(cfg, device="cpu", console=quiet())
    trainer.dist = DistInfo(rank=0, world_size=2)
    partial = {"loss_sum": 6.5, "correct": 40, "seen": 384, "steps": 3}  # 3 steps of 2 x 64 images
    write_checkpoint(trainer.checkpoint_state(0, 3, rank_rng=None, partial=partial), run / "last.pt")
    console, said = recording_console()
    resumed = Trainer(cfg, device="cpu", console=console, resume=run / "last.pt")
    # the loss summed 2 batch losses per step: 1 per step here, or the epoch's train_loss would be 2x theirs
    assert (resumed.start_epoch, resumed.start_step, resumed._epoch_partial) == (0, 3, {**partial, "loss_sum": 3.25})
    said = " ".join(" ".join(said).split())  # rich wraps long lines
    assert "saved in the middle of epoch 1 by 2 rank(s) and is resumed on 1" in said, said
    assert "not an exact continuation (resume on 2 rank(s) for one)" in said


def test_only_rank_0_announces_a_stop_and_its_resume_command():
    """Under torchrun every rank stops and exits 128 + signal, but the command is printed once: rank 1 of a
    stopped run (a Trainer's state without its set-up, at the position the ranks agreed on and saved)."""
    from fasttrain.distributed import DistInfo

    for rank, announce in ((0, True), (1, False)):
        stand_in = Trainer.__new__(Trainer)
        stand_in.dist = DistInfo(rank=rank, world_size=2, local_rank=rank)
        stand_in.run_dir, stand_in._device_flag, stand_in.steps_per_epoch = Path("run"), "", STEPS
        stand_in._last_saved = ((1, 4), Path("run/last.pt"))  # saved by every rank together (save_checkpoint)
        stand_in._stop = StopRequest()
        stand_in._stop.request(signal.SIGTERM)
        with pytest.raises(RunInterrupted, match=f"stopped by SIGTERM at epoch 2, step 4/{STEPS}") as stop:
            stand_in._stop_run(1, 4)
        assert stop.value.announce is announce and stop.value.exit_code == 143


def test_the_eta_after_a_mid_epoch_resume_counts_whole_epochs():
    """Resumed at step 8 of 10, the first epoch ran 2 steps in 1 s: the 2 epochs still to come take
    10 s, not 2 s (the eta was their count times that short epoch's time)."""
    assert trainer_module.eta_seconds(1.0, 2, 10, 2) == pytest.approx(10.0)
    assert trainer_module.eta_seconds(3.0, 10, 10, 2) == pytest.approx(6.0)  # a whole epoch
    assert trainer_module.eta_seconds(3.0, 10, 10, 0) == 0.0


def test_a_run_resumed_mid_epoch_reports_its_eta_and_clocks_and_ends_at_train_epochs(cifar_dir, tmp_path,
                                                                                     monkeypatch):
    """fit() of a run resumed at step 4 of epoch 1 (its position and compile seconds set as _load sets them):
    * eta_seconds gets the steps the epoch just ran (that epoch: its rest, 10 - 4) and the epochs after it:
      none after the last, whose line must not promise another epoch's time;
    * the compile warmup (a stand-in of 2.5 s: compiling takes minutes on a CPU) adds to the checkpoint's
      compile seconds: the summary's clocks cover all of a resumed run's processes;
    * a stop_after_epochs beyond train.epochs ends the run at train.epochs (complete: its summary written),
      never trains past the end of its learning-rate schedule."""
    calls = []
    monkeypatch.setattr(trainer_module, "eta_seconds", lambda *args: calls.append(args) or 0.0)
    trainer = Trainer(tiny_config(cifar_dir, tmp_path), device="cpu", console=quiet())
    trainer.start_step, trainer.compile_seconds = 4, 3.5
    trainer.cfg.train.compile = True  # the net stays eager: the warmup is the stand-in
    trainer._stoppable_warmup = lambda: 2.5
    summary = trainer.fit(stop_after_epochs=3)
    assert [(steps, per_epoch, left) for _, steps, per_epoch, left in calls] == [(STEPS - 4, STEPS, 1),
                                                                                (STEPS, STEPS, 0)]
    assert summary["compile_seconds"] == 6.0
    assert metric_epochs(tmp_path) == [1, 2] and (tmp_path / "summary.json").is_file()


@contextlib.contextmanager
def disposition(signum: int, handler):
    """The test process as a launcher might start a run: `handler` for `signum`, the test's own put back after."""
    previous = signal.signal(signum, handler)
    try:
        yield
    finally:
        signal.signal(signum, previous)


def signal_self(signum: int) -> None:
    """Send this process `signum`, and give Python the moment its handler runs in."""
    os.kill(os.getpid(), signum)
    time.sleep(0.05)


def test_second_signal_restores_the_default_behaviour():
    # Python's own SIGINT handler first: a process started in the background by a non-interactive
    # shell inherits SIGINT ignored, and then "the previous behaviour" would be to ignore it
    with disposition(signal.SIGINT, signal.default_int_handler):
        stop = StopRequest()
        with stop.installed():
            os.kill(os.getpid(), signal.SIGINT)
            assert stop.requested and stop.signum == signal.SIGINT and stop.name == "SIGINT"
            with pytest.raises(KeyboardInterrupt):  # Ctrl-C twice: quit now
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(1)  # the handler runs at the next bytecode; never reached


def test_sighup_stops_like_sigterm_unless_the_run_was_started_under_nohup():
    """A closed terminal or a dropped ssh session (SIGHUP) saves and stops like a scheduler's SIGTERM
    (exit 129); under nohup, which starts the run with SIGHUP ignored, it stays ignored."""
    with disposition(signal.SIGHUP, signal.SIG_DFL):
        stop = StopRequest()
        with stop.installed():
            signal_self(signal.SIGHUP)
            assert stop.requested and stop.name == "SIGHUP"
        assert RunInterrupted("stopped", stop.signum, None).exit_code == 129
        assert RunInterrupted("stopped", None, None).exit_code == 143  # no signal named: a stop request, as SIGTERM
    with disposition(signal.SIGHUP, signal.SIG_IGN):  # nohup
        stop = StopRequest()
        with stop.installed():
            assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
            signal_self(signal.SIGHUP)
            assert not stop.requested


def test_a_closed_stdout_pipe_never_stops_the_run(cifar_dir, tmp_path):
    """`fasttrain ... | head -1`: the reader goes away after the first line. The run goes on silently to
    its end (rich alone would exit 1 mid-epoch, between an epoch's metrics row and its checkpoint)."""
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "fasttrain", *cli_args(cifar_dir, run)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=child_env())
    proc.stdout.readline()
    proc.stdout.close()  # like head after its line
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err.decode()
    assert metric_epochs(run) == [1, 2] and load_checkpoint(run / "last.pt")["epoch"] == 2
    assert (run / "summary.json").exists()


def test_the_handlers_from_before_are_back_after_the_block():
    """After a run (a notebook, a benchmark's loop of runs), Ctrl-C must work as before it: a leftover
    handler would only set the flag of a run that is over."""
    from fasttrain.signals import HANDLED

    before = {signum: signal.getsignal(signum) for signum in HANDLED}
    with StopRequest().installed():
        assert signal.getsignal(signal.SIGINT) != before[signal.SIGINT]
    assert {signum: signal.getsignal(signum) for signum in HANDLED} == before


def test_a_repeat_after_the_launchers_window_ends_the_process_by_the_default_action(monkeypatch):
    """Under torchrun a repeat within the window is the agent's copy; a later one is a second signal:
    the default action, which for SIGTERM is to end the process (re-raised, here recorded)."""
    raised = []
    # recorded with the disposition it meets: the default one, else the signal would come back to the
    # handler, which would raise it again, forever, instead of ending the process
    monkeypatch.setattr(signal, "raise_signal", lambda signum: raised.append((signum, signal.getsignal(signum))))
    with disposition(signal.SIGTERM, signal.SIG_DFL):
        stop = StopRequest(repeat_window_s=0.01)
        with stop.installed():
            signal_self(signal.SIGTERM)
            assert stop.requested and raised == []
            signal_self(signal.SIGTERM)
        assert raised == [(signal.SIGTERM, signal.SIG_DFL)]


def test_an_inherited_ignored_sigterm_is_still_handled():
    """Only SIGHUP keeps an ignored disposition it inherits (nohup asks for that): a run started with
    SIGTERM ignored still saves and stops on the scheduler's SIGTERM, and is left ignoring it after."""
    with disposition(signal.SIGTERM, signal.SIG_IGN):
        stop = StopRequest()
        with stop.installed():
            signal_self(signal.SIGTERM)
            assert stop.requested and stop.name == "SIGTERM"
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN


def test_a_handler_python_cannot_name_is_given_back_as_the_default(monkeypatch):
    """signal.getsignal says None for a handler installed outside Python (an embedding program, a C
    extension), which signal.signal cannot take back: the block ends with the default action there
    instead of failing on its way out (and masking what the run raised)."""
    real_getsignal = signal.getsignal
    with disposition(signal.SIGTERM, signal.SIG_IGN):
        monkeypatch.setattr(signal, "getsignal",
                            lambda signum: None if signum == signal.SIGTERM else real_getsignal(signum))
        with StopRequest().installed():
            assert real_getsignal(signal.SIGTERM) not in (signal.SIG_IGN, signal.SIG_DFL)
        assert real_getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_a_stop_request_outside_the_main_thread_installs_nothing():
    """Python refuses signal handlers outside the main thread (ValueError): a Trainer fitted in a worker
    thread (a notebook's background job, a benchmark's pool) runs without them instead of failing."""
    import threading

    from fasttrain.signals import HANDLED

    before = {signum: signal.getsignal(signum) for signum in HANDLED}
    seen, errors = [], []

    def fit_in_a_thread():
        try:
            with StopRequest().installed() as stop:
                seen.append((stop.requested, {signum: signal.getsignal(signum) for signum in HANDLED}))
        except Exception as e:  # recorded: an exception in a thread would not fail the test
            errors.append(e)

    worker = threading.Thread(target=fit_in_a_thread)
    worker.start()
    worker.join(timeout=30)
    assert errors == [] and seen == [(False, before)]


def test_raising_block_turns_a_signal_into_the_error_at_once():
    """StopRequest.raising: inside the block a signal raises where the program is (the flag set too);
    outside it only sets the flag; a stop requested just before the block raises on entry."""
    class Stopped(Exception):
        pass

    stop = StopRequest()
    with stop.installed():
        with pytest.raises(Stopped, match=str(int(signal.SIGTERM))):
            with stop.raising(lambda signum: Stopped(signum)):
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(1)  # the handler runs at the next bytecode; never reached
        assert stop.requested and stop.name == "SIGTERM"
        with pytest.raises(Stopped):  # requested before: raised on entry, the block never runs
            with stop.raising(lambda signum: Stopped(signum)):
                raise AssertionError("the block ran after a stop")
    later = StopRequest()
    with later.installed():
        with later.raising(lambda signum: Stopped(signum)):
            pass
        signal_self(signal.SIGTERM)  # after the block: the flag only
        assert later.requested


@pytest.mark.parametrize("resumed", [False, True])
@pytest.mark.parametrize("inside", ["step", "compiler"])
def test_a_stop_during_the_compile_warmup_is_honoured_at_once_and_writes_nothing(cifar_dir, tmp_path, reference_run,
                                                                                  resumed, inside):
    """The compile warmup (minutes on a CPU) is not waited for: nothing of the run has trained, so a
    SIGTERM in it stops the run at once, writes nothing (a resumed run's folder stays byte for byte as
    it was: the warmup's throwaway steps changed the weights) and says the same command starts again.
    The signal comes at the warmup's first step, or inside the compiler (a backend of torch.compile,
    where dynamo wraps whatever is raised in BackendCompilerFailed)."""
    run = tmp_path / "run"
    if resumed:
        shutil.copytree(reference_run, run)
    cfg = tiny_config(cifar_dir, run, "--train.compile", "true", "--train.epochs", "3")
    before = folder_snapshot(run) if resumed else None
    trainer = Trainer(cfg, device="cpu", console=quiet(), resume=run / "last.pt" if resumed else None)
    calls, went_on = [], []

    def signal_now():
        calls.append(1)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(1)  # the handler runs at the next bytecode and raises
        # Reached only if the stop was not honoured at once. Recorded, not raised: the trainer would
        # turn any exception after a signal into the very RunInterrupted this test expects.
        went_on.append(1)

    if inside == "step":
        trainer._train_step = lambda images, labels: signal_now()
    else:
        def backend(graph_module, example_inputs):
            signal_now()

        trainer.net = trainer.eval_net = torch.compile(trainer.model, backend=backend)
    t0 = time.perf_counter()
    with pytest.raises(RunInterrupted) as stop:
        trainer.fit()
    assert time.perf_counter() - t0 < 60 and len(calls) == 1 and not went_on
    assert stop.value.exit_code == 143 and "stopped by SIGTERM during the compile warmup" in str(stop.value)
    assert "nothing of the run was written" in str(stop.value)
    assert stop.value.checkpoint == (run / "last.pt" if resumed else None)
    if resumed:
        assert f"the same command (it resumes {run / 'last.pt'} again)" in str(stop.value)
        assert folder_snapshot(run) == before  # not even config.yaml or metrics.jsonl rewritten
    else:
        assert not run.exists() and "(it starts the run afresh)" in str(stop.value)


def test_truncated_last_checkpoint_falls_back_to_prev_with_a_warning(cifar_dir, tmp_path, reference_run):
    run = tmp_path / "run"
    shutil.copytree(reference_run, run)
    data, good_prev = (run / "last.pt").read_bytes(), (run / "prev.pt").read_bytes()
    (run / "last.pt").write_bytes(data[: len(data) // 2])
    proc = run_cli(["--config", str(run / "config.yaml"), "--resume", "auto", "--output.dir", str(run),
                    "--device", "cpu"])
    assert f"warning: skipping {run / 'last.pt'}" in proc.stderr and "truncated" in proc.stderr
    assert f"resumed {run / 'prev.pt'} after epoch 1" in proc.stdout
    assert_same_training_state(load_checkpoint(run / "last.pt"), load_checkpoint(reference_run / "last.pt"))
    assert (run / "prev.pt").read_bytes() == good_prev  # the damaged file was replaced, not rotated in


@pytest.mark.parametrize("name, fallback", [("last.pt", True), ("prev.pt", False), ("weights.pt", False)])
def test_a_truncated_checkpoint_names_prev_pt_as_the_fallback_only_for_last_pt(tmp_path, good_run, name, fallback):
    """"The run folder keeps the checkpoint before as RUN/prev.pt ... falls back to it" is the way out for a
    damaged last.pt whose prev.pt is there; for prev.pt itself (or another file) there is no such fallback."""
    data = (good_run / "last.pt").read_bytes()
    (tmp_path / name).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="is corrupt, truncated or not a fasttrain checkpoint") as refused:
        load_checkpoint(tmp_path / name)
    assert "falls back to" not in str(refused.value)  # no prev.pt here: no fallback to promise
    if name != "prev.pt":
        shutil.copy(good_run / "prev.pt", tmp_path / "prev.pt")
    with pytest.raises(CheckpointError, match="is corrupt, truncated or not a fasttrain checkpoint") as refused:
        load_checkpoint(tmp_path / name)
    assert ("falls back to" in str(refused.value)) == fallback, str(refused.value)


def test_a_truncated_last_pt_names_a_fallback_that_resumes_a_default_named_run(cifar_dir, tmp_path, good_run,
                                                                                capsys):
    """The fallback the error names must run as written, also for a run in a default folder
    (runs/<config>-<time>), whose config.yaml saves output.dir null: a bare --resume auto there stops
    at "--resume auto needs the run folder"."""
    run = tmp_path / "run"
    shutil.copytree(good_run, run)
    cfg = load_config(run / "config.yaml")
    cfg.output.dir = None
    save_config(cfg, run / "config.yaml")
    data = (run / "last.pt").read_bytes()
    (run / "last.pt").write_bytes(data[: len(data) // 2])
    command = ["--config", str(run / "config.yaml"), "--device", "cpu"]
    assert cli.main(command + ["--resume", str(run / "last.pt")]) == cli.EXIT_ERROR
    err = capsys.readouterr().err
    fallback = re.search(r"\((--resume auto[^()]*) falls back to it\)", err)
    assert fallback, err
    assert cli.main(command + shlex.split(fallback.group(1))) == 0, capsys.readouterr().err
    assert f"resumed {run / 'prev.pt'} after epoch 1" in capsys.readouterr().out
    assert load_checkpoint(run / "last.pt")["epoch"] == 2


@pytest.mark.parametrize("damage", ["flipped-bit", "random-bytes", "zeroed"])
def test_every_kind_of_damaged_last_pt_names_prev_pt(tmp_path, good_run, damage):
    """Not only a truncated last.pt: a flipped bit (the checksum's case), bytes that are no pickle, a zeroed
    file (torch reads it as an old tar format) each name prev.pt as the way out; and none passes on torch's
    own text, which goes on to advise loading with weights_only=False."""
    import random

    last = tmp_path / "last.pt"
    shutil.copy(good_run / "last.pt", last)
    shutil.copy(good_run / "prev.pt", tmp_path / "prev.pt")
    if damage == "flipped-bit":
        _flip_byte_inside_largest_tensor(last)
    else:
        size = last.stat().st_size
        last.write_bytes(random.Random(0).randbytes(size) if damage == "random-bytes" else bytes(size))
    with pytest.raises(CheckpointError, match="is corrupt") as refused:
        load_checkpoint(last)
    message = str(refused.value)
    assert "falls back to it" in message and "False" not in message, message


def _flip_byte_inside_largest_tensor(path: Path) -> None:
    """Flip one bit in the middle of the biggest tensor's bytes: torch's zip reader does not check CRCs."""
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    raw = bytearray(path.read_bytes())
    name_len = int.from_bytes(raw[info.header_offset + 26:info.header_offset + 28], "little")
    extra_len = int.from_bytes(raw[info.header_offset + 28:info.header_offset + 30], "little")
    start = info.header_offset + 30 + name_len + extra_len
    raw[start + info.file_size // 2] ^= 0x10
    path.write_bytes(bytes(raw))


def test_checksum_catches_what_the_zip_reader_does_not(tmp_path, good_run):
    path = tmp_path / "last.pt"
    shutil.copy(good_run / "last.pt", path)
    _flip_byte_inside_largest_tensor(path)
    torch.load(path, weights_only=True)  # loads "fine": the damage is invisible without the checksum
    with pytest.raises(CheckpointError, match="does not match the checksum"):
        load_checkpoint(path)

    # a value changed and re-saved without its checksum entry being recomputed
    ckpt = torch.load(good_run / "last.pt", weights_only=True)
    ckpt["epoch"] = 7
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError, match="does not match the checksum"):
        load_checkpoint(path)
    del ckpt["checksum"]
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError, match="no checksum"):
        load_checkpoint(path)


def test_resume_auto_takes_the_newest_other_checkpoint_when_last_and_prev_are_unusable(tmp_path):
    """After last.pt and prev.pt, a folder's other *.pt (a copy kept by hand) are tried newest first."""
    for name, epoch, mtime in (("kept-early.pt", 1, 1_000_000), ("kept-late.pt", 2, 2_000_000)):
        write_checkpoint({"format": FORMAT, "model": {}, "epoch": epoch}, tmp_path / name, previous=None)
        os.utime(tmp_path / name, (mtime, mtime))
    (tmp_path / "last.pt").write_bytes(b"damaged")
    found = find_resume_checkpoint(tmp_path, warn=lambda m: None)
    assert found == tmp_path / "kept-late.pt" and load_checkpoint(found)["epoch"] == 2


def test_no_usable_checkpoint_names_a_fresh_start_that_works(cifar_dir, tmp_path, good_run, capsys):
    """Every checkpoint of the folder damaged: the error's fresh start must be a command that runs. Adding
    --overwrite to the --resume auto command fails the same way, so the message says to use it instead."""
    run = tmp_path / "run"
    shutil.copytree(good_run, run)
    for name in ("last.pt", "prev.pt"):
        (run / name).write_bytes(b"damaged")
    auto = cli_args(cifar_dir, run, "--resume", "auto")
    assert cli.main(auto) == cli.EXIT_ERROR
    err = capsys.readouterr().err
    assert "no usable checkpoint" in err and "--overwrite instead of --resume auto" in err, err
    assert cli.main(auto + ["--overwrite"]) == cli.EXIT_ERROR  # what "with --overwrite" alone would lead to
    capsys.readouterr()
    assert cli.main(cli_args(cifar_dir, run) + ["--overwrite"]) == 0  # what the message says now
    assert load_checkpoint(run / "last.pt")["epoch"] == 2


def test_no_usable_checkpoint_names_a_good_copy_that_resumes(cifar_dir, tmp_path, good_run, capsys):
    """The other way out, a good copy kept elsewhere: `--resume COPY` is refused in a folder that holds a
    run of its own (it would be a run continued into another folder), so the message says to copy it in."""
    run, backup = tmp_path / "run", tmp_path / "backup" / "epoch1.pt"
    shutil.copytree(good_run, run)
    backup.parent.mkdir()
    shutil.copy(good_run / "prev.pt", backup)
    for name in ("last.pt", "prev.pt"):
        (run / name).write_bytes(b"damaged")
    auto = cli_args(cifar_dir, run, "--resume", "auto")
    assert cli.main(auto) == cli.EXIT_ERROR
    err = capsys.readouterr().err
    assert f"Copy a good checkpoint into {str(run)!r} and run the same command again" in err, err
    assert cli.main(cli_args(cifar_dir, run, "--resume", str(backup))) == cli.EXIT_USAGE  # the copy where it is
    capsys.readouterr()
    shutil.copy(backup, run / backup.name)
    assert cli.main(auto) == 0
    assert f"resumed {run / backup.name} after epoch 1" in capsys.readouterr().out
    assert load_checkpoint(run / "last.pt")["epoch"] == 2 and metric_epochs(run) == [1, 2]


def test_find_resume_checkpoint_order_and_failures(tmp_path, good_run):
    run = tmp_path / "run"
    run.mkdir()
    assert find_resume_checkpoint(run) is None  # nothing to resume: start over
    shutil.copy(good_run / "last.pt", run / "last.pt")
    shutil.copy(good_run / "prev.pt", run / "prev.pt")
    os.utime(run / "last.pt", (1, 1))  # file times must not matter (a copied folder resets them)
    assert find_resume_checkpoint(run) == run / "last.pt"

    _flip_byte_inside_largest_tensor(run / "last.pt")
    warnings = []
    assert find_resume_checkpoint(run, warn=warnings.append) == run / "prev.pt"
    assert len(warnings) == 1 and str(run / "last.pt") in warnings[0]

    (run / "prev.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="no usable checkpoint"):
        find_resume_checkpoint(run, warn=lambda m: None)


def test_a_resume_reads_its_checkpoint_once(tmp_path, good_run, monkeypatch):
    """The CLI reads the checkpoint it resumes from for its config (--resume PATH without --config) or to choose
    it (--resume auto verifies each candidate); the trainer resumes from that content instead of reading the file
    again. With --config and a path, the trainer alone reads it."""
    run = tmp_path / "run"
    shutil.copytree(good_run, run)
    last, prev, config = run / "last.pt", run / "prev.pt", str(run / "config.yaml")
    reads, resumed = [], []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda f, *args, **kw: reads.append(Path(f)) or real_load(f, *args, **kw))
    monkeypatch.setattr(Trainer, "fit", lambda self: resumed.append((self.resume_path, self.start_epoch)))
    for args, path in ((["--resume", str(prev)], prev),
                       (["--config", config, "--resume", "auto", "--output.dir", str(run)], last),
                       (["--config", config, "--resume", str(last)], last)):
        reads.clear()
        assert cli.main([*args, "--device", "cpu"]) == 0
        assert reads == [path], args
        assert resumed.pop() == (path, load_checkpoint(path)["epoch"]), args


def test_a_checkpoint_read_for_another_file_than_rank_0_chose_is_not_used(tmp_path, good_run, monkeypatch):
    """Under torchrun the run resumes from rank 0's choice (broadcast): a rank whose CLI read another file (its
    --resume auto looked at the folder a moment apart) drops what it read and reads rank 0's file itself."""
    run = tmp_path / "run"
    shutil.copytree(good_run, run)
    last, prev = run / "last.pt", run / "prev.pt"
    assert load_checkpoint(last)["epoch"] != load_checkpoint(prev)["epoch"]
    real_broadcast = trainer_module.broadcast_object
    monkeypatch.setattr(trainer_module, "broadcast_object",  # rank 0 chose last.pt where this rank found prev.pt
                        lambda obj, dist: last if obj == prev else real_broadcast(obj, dist))
    reads = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda f, *args, **kw: reads.append(Path(f)) or real_load(f, *args, **kw))
    cfg = load_config(run / "config.yaml", ["--output.dir", str(run)])
    trainer = Trainer(cfg, device="cpu", resume=prev, resume_checkpoint=load_checkpoint(prev), console=quiet())
    assert trainer.resume_path == last and trainer.start_epoch == load_checkpoint(last)["epoch"]
    assert reads[:2] == [prev, last]  # this rank's own read (the test's), then rank 0's file, read by the trainer


def test_a_run_folder_given_for_a_checkpoint_names_the_files_in_it(good_run, tmp_path, capsys):
    """`eval --checkpoint runs/X`: the folder, not "not found" (it exists), with the checkpoints to pick."""
    with pytest.raises(CheckpointError, match=rf"is a folder, not a checkpoint: pass a checkpoint file "
                                              rf"\({re.escape(str(good_run / 'last.pt'))}, "):
        load_checkpoint(good_run)
    with pytest.raises(CheckpointError, match=r"is a folder, not a checkpoint: .* \(it holds none\)"):
        load_checkpoint(tmp_path)
    assert cli.main(["eval", "--checkpoint", str(good_run), "--device", "cpu"]) == cli.EXIT_USAGE  # as --resume's
    assert "is a folder, not a checkpoint" in capsys.readouterr().err


def test_a_checkpoint_that_is_not_there_names_what_its_folder_holds(good_run, tmp_path, capsys):
    """A typo in a checkpoint's name: the files its folder holds (or that the folder is missing), and
    --resume auto only where it applies, for training; eval and export are not told to resume."""
    typo = good_run / "lats.pt"
    with pytest.raises(CheckpointError, match=rf"{re.escape(repr(str(typo)))} not found: "
                                              rf"{re.escape(repr(str(good_run)))} holds last.pt, prev.pt$"):
        load_checkpoint(typo)
    with pytest.raises(CheckpointError, match=r"not found: there is no folder .*nowhere'$"):
        load_checkpoint(tmp_path / "nowhere" / "last.pt")
    with pytest.raises(CheckpointError, match=r"not found: .* holds no checkpoint \(\*\.pt\)$"):
        load_checkpoint(tmp_path / "last.pt")
    for command in (["eval", str(typo)], ["export", str(typo), str(tmp_path / "w.pt")]):
        assert cli.main(command) == cli.EXIT_USAGE  # a bad command line, as --resume's typo
        err = capsys.readouterr().err
        assert "holds last.pt, prev.pt" in err and "--resume" not in err
    for config in ([], ["--config", str(good_run / "config.yaml")]):  # refused before the config is even read
        assert cli.main(["--device", "cpu", "--resume", str(typo), *config]) == cli.EXIT_USAGE
        err = capsys.readouterr().err
        assert "holds last.pt, prev.pt (--resume auto --output.dir RUN_DIR takes the newest good" in err
    assert cli.main(["--device", "cpu", "--resume", str(good_run)]) == cli.EXIT_USAGE
    assert "is a folder, not a checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "w.pt").exists() and not (good_run / "lats.pt").exists()


def test_the_checksum_covers_dtypes_keys_and_the_format(tmp_path):
    """Damage that keeps the bytes (a dtype, a key's name: "ema" read as "emb" would resume without its
    EMA) changes the checksum; a file of another format version is refused even with a valid one."""
    from fasttrain.checkpoint import state_checksum

    assert state_checksum({"a": torch.zeros(2)}) != state_checksum({"a": torch.zeros(2, dtype=torch.int32)})
    assert state_checksum({"ema": 1}) != state_checksum({"emb": 1})
    # and the nesting: the same keys and values, one of them moved out of its section
    assert state_checksum({"model": {"w": 1, "b": 2}}) != state_checksum({"model": {"w": 1}, "b": 2})
    future = tmp_path / "future.pt"
    write_checkpoint({"format": FORMAT + "-v2", "model": {}}, future)
    with pytest.raises(CheckpointError, match="not a fasttrain checkpoint"):
        load_checkpoint(future)
    # the marker without weights (a hand-made file): refused here, not a KeyError in the middle of a resume
    weightless = tmp_path / "weightless.pt"
    write_checkpoint({"format": FORMAT, "epoch": 1}, weightless)
    with pytest.raises(CheckpointError, match="not a fasttrain checkpoint"):
        load_checkpoint(weightless)


def test_without_hard_links_the_previous_checkpoint_is_still_kept(tmp_path, monkeypatch):
    """exFAT, FAT and some network mounts have no hard links: prev.pt is then kept by a rename."""
    def no_links(src, dst):
        raise OSError(errno.EPERM, "Operation not permitted", str(src))

    monkeypatch.setattr(os, "link", no_links)
    write_checkpoint({"format": FORMAT, "model": {}, "epoch": 1}, tmp_path / "last.pt")
    write_checkpoint({"format": FORMAT, "model": {}, "epoch": 2}, tmp_path / "last.pt")
    assert load_checkpoint(tmp_path / "prev.pt")["epoch"] == 1 and load_checkpoint(tmp_path / "last.pt")["epoch"] == 2


def test_weights_with_keys_the_model_lacks_are_another_architecture():
    from fasttrain.checkpoint import check_architecture

    model = torch.nn.Linear(2, 2)
    with pytest.raises(CheckpointError, match="not in model: extra.weight"):
        check_architecture(model, {**model.state_dict(), "extra.weight": torch.zeros(1)}, "f.pt")


def test_weights_lacking_keys_of_the_model_are_another_architecture():
    """A checkpoint of a smaller network (no SE block, one block fewer): the keys it lacks are listed, a
    CheckpointError, not load_state_dict's RuntimeError halfway through a resume."""
    from fasttrain.checkpoint import check_architecture

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("1.")}
    with pytest.raises(CheckpointError, match=r"missing in checkpoint: 1\.weight, 1\.bias"):
        check_architecture(model, state, "f.pt")


def test_the_cpu_generator_is_restored_exactly():
    """What draws from the global CPU generator inside an epoch (dropout on a CPU run) replays exactly
    after a mid-epoch resume."""
    from fasttrain.checkpoint import rng_state, set_rng_state

    saved = rng_state(torch.device("cpu"))
    drawn = torch.rand(4)
    set_rng_state(saved, torch.device("cpu"))
    assert torch.equal(torch.rand(4), drawn)


def test_a_folder_holding_only_checkpoints_is_a_run(tmp_path, cifar_dir):
    """A fresh run there would delete them (it starts its folder afresh): refused like a config.yaml."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "last.pt").write_bytes(b"someone's checkpoint")
    with pytest.raises(ConfigError, match="already holds a run"):
        run_folder.choose_run_dir(tiny_config(cifar_dir, run), None, None, overwrite=False)


def test_a_resume_without_an_output_dir_continues_in_the_checkpoints_folder(tmp_path, cifar_dir):
    """--config FILE --resume RUN/last.pt, FILE naming no output.dir: the run goes on in RUN, not in a new
    runs/<name>-<time> (which would start afresh and leave RUN's own run behind)."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "last.pt").write_bytes(b"the run's checkpoint")
    cfg = tiny_config(cifar_dir, run)
    cfg.output.dir = None
    assert run_folder.choose_run_dir(cfg, None, run / "last.pt", overwrite=False) == run


def test_a_run_may_be_continued_into_a_folder_that_holds_no_run(tmp_path, cifar_dir):
    """--resume A/last.pt --output.dir B: only a run of B's own is in the way; a new folder, or one holding
    other files, takes the continued run."""
    source = tmp_path / "A" / "last.pt"
    source.parent.mkdir()
    source.write_bytes(b"A's checkpoint")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "README").write_text("not a run")
    for target in (tmp_path / "B", tmp_path / "notes"):
        assert run_folder.choose_run_dir(tiny_config(cifar_dir, target), None, source, overwrite=False) == target


def test_a_run_continued_into_another_folder_starts_it_afresh(tmp_path, cifar_dir):
    """--resume A/last.pt --output.dir B --overwrite: B's old checkpoints and summary go (they would be the
    new run's fallback, or its figures), and a source run without metrics leaves B's rows none."""
    source, target = tmp_path / "A", tmp_path / "B"
    source.mkdir()
    target.mkdir()
    for name in ("last.pt", "prev.pt", "summary.json"):
        (target / name).write_text("the old run's")
    (target / "metrics.jsonl").write_text('{"epoch": 1}\n{"epoch": 2}\n')
    cfg = tiny_config(cifar_dir, target)
    assert run_folder.prepare_run_dir(target, cfg, source / "last.pt", 1, warn=print) is True
    assert not any((target / name).exists() for name in ("last.pt", "prev.pt", "summary.json"))
    assert (target / "metrics.jsonl").read_text() == ""


def test_file_errors_name_the_destination_and_leave_no_temp_file(tmp_path):
    from fasttrain.files import file_error_line, write_text_atomic

    rename = OSError(errno.EACCES, "Permission denied", str(tmp_path / ".a.x.tmp"), None, str(tmp_path / "a"))
    assert file_error_line(rename) == f"error: {tmp_path / 'a'}: Permission denied"
    assert file_error_line(OSError(errno.EPIPE, "Broken pipe")) is None  # names no file: keeps its traceback
    blocked = tmp_path / "summary.json"
    blocked.mkdir()  # a folder where the file goes: the rename fails
    with pytest.raises(OSError):
        write_text_atomic(blocked, "{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


def test_a_temp_file_is_a_new_hidden_file_on_disk_before_its_rename(tmp_path, monkeypatch):
    """write_text_atomic's temp file: created anew (O_EXCL: a name already there, another writer's, is
    passed over for the next, never written into), hidden beside its target (.NAME.<hex>.tmp), and its
    whole text on disk when fsync runs (flushed first: fsync does not reach Python's buffer)."""
    from fasttrain import files

    names = iter(["aaaaaaaaaaaa", "bbbbbbbbbbbb"])
    monkeypatch.setattr(files.secrets, "token_hex", lambda nbytes: next(names))
    taken = tmp_path / ".summary.json.aaaaaaaaaaaa.tmp"
    taken.write_text("another writer's")
    synced, real_fsync = [], os.fsync

    def fsync(fd):
        synced.append((os.fstat(fd).st_size, sorted(p.name for p in tmp_path.iterdir())))
        real_fsync(fd)

    monkeypatch.setattr(files.os, "fsync", fsync)
    files.write_text_atomic(tmp_path / "summary.json", "{}\n")
    assert synced == [(3, [taken.name, ".summary.json.bbbbbbbbbbbb.tmp"])]
    assert (tmp_path / "summary.json").read_text() == "{}\n" and taken.read_text() == "another writer's"
    assert sorted(p.name for p in tmp_path.iterdir()) == [taken.name, "summary.json"]


class _Crash(BaseException):
    """Stands in for kill -9 at one point inside write_checkpoint."""


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_a_checkpoint_gets_the_mode_of_any_file_the_umask_allows(tmp_path, umask):
    """Not mkstemp's 0600: a team's shared run folder must be readable as its umask says."""
    state = {"format": FORMAT, "model": {"w": torch.ones(2)}, "epoch": 1}
    previous = os.umask(umask)
    try:
        write_checkpoint(state, tmp_path / "last.pt")
        write_checkpoint(state, tmp_path / "last.pt")  # the second write moves the first to prev.pt
    finally:
        os.umask(previous)
    for name in ("last.pt", "prev.pt"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask, name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "prev.pt"]  # no temp file left


@pytest.mark.parametrize("crash_at", range(4))
def test_a_crash_at_any_point_of_a_save_leaves_a_valid_checkpoint(tmp_path, monkeypatch, crash_at):
    """write_checkpoint does link(last -> tmp), replace(tmp -> prev), replace(new -> last): stop it
    before each file-system operation (and after the last) and a resumable checkpoint must remain,
    the old one or the new one."""
    def state(epoch):
        return {"format": FORMAT, "model": {"w": torch.full((4,), float(epoch))}, "epoch": epoch}

    write_checkpoint(state(1), tmp_path / "last.pt")
    write_checkpoint(state(2), tmp_path / "last.pt")
    ops = []
    real_link, real_replace = os.link, os.replace

    def counted(real):
        def op(*args):
            if len(ops) == crash_at:
                raise _Crash()
            ops.append(real.__name__)
            return real(*args)
        return op

    monkeypatch.setattr(os, "link", counted(real_link))
    monkeypatch.setattr(os, "replace", counted(real_replace))
    with pytest.raises(_Crash) if crash_at < 3 else contextlib.nullcontext():
        write_checkpoint(state(3), tmp_path / "last.pt")
    monkeypatch.undo()
    found = find_resume_checkpoint(tmp_path, warn=lambda m: pytest.fail(m))
    epoch = load_checkpoint(found)["epoch"]
    assert epoch == (3 if crash_at == 3 else 2)
    assert load_checkpoint(tmp_path / "prev.pt")["epoch"] in (1, 2)
    # the new checkpoint's temp file goes with the failed save (every later save would leave one more)
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".last.pt.")]


# a Ctrl-C while Python exits, from an atexit callback (registered before fasttrain's imports, it runs after
# torch's own)
CTRL_C_AT_EXIT = """
import atexit, os, signal

atexit.register(lambda: os.kill(os.getpid(), signal.SIGINT))
"""


def test_ctrl_c_while_python_exits_after_a_command_ends_it_without_a_traceback(cifar_dir, tmp_path):
    """A Ctrl-C just after a command finished (a run's summary printed, Python running torch's atexit callbacks)
    printed "Exception ignored in atexit callback" with a KeyboardInterrupt traceback. It ends the process by
    the signal, as SIGTERM does then; what the command printed and wrote is complete (stdout a buffered pipe)."""
    proc = run_cli_after(CTRL_C_AT_EXIT, *cli_args(cifar_dir, tmp_path / "run"), "--dry-run", "--json",
                         PYTHONUNBUFFERED="")
    assert proc.returncode == -signal.SIGINT and proc.stderr == "", proc.stderr
    assert json.loads(proc.stdout)["config"]["train"]["epochs"] == 2


# a Ctrl-C (SIGINT to the process) at the first call or return event of a function of fasttrain/cli.py: sys.argv[1]
# names it, "FUNCTION:call" or "FUNCTION:return"
CTRL_C_AT_CLI_EVENT = """
import os, signal, sys
name, _, when = sys.argv.pop(1).partition(":")


def profile(frame, event, arg):
    code = frame.f_code
    if event == when and code.co_name == name and code.co_filename.endswith(os.path.join("fasttrain", "cli.py")):
        sys.setprofile(None)
        os.kill(os.getpid(), signal.SIGINT)


sys.setprofile(profile)
"""


@pytest.mark.parametrize("moment", ["main:call", "main:return"])
def test_a_ctrl_c_as_cli_main_starts_or_returns_is_one_line(cifar_dir, tmp_path, moment):
    """A Ctrl-C at main's first instruction (before its own try) or as it returned (before __main__ gave SIGINT
    its default action) was a KeyboardInterrupt traceback out of __main__ and exit -2. It is the one line and 130;
    what the command printed is complete."""
    proc = run_cli_after(CTRL_C_AT_CLI_EVENT, moment, *cli_args(cifar_dir, tmp_path / "run"), "--dry-run", "--json")
    assert proc.returncode == cli.EXIT_INTERRUPTED and proc.stderr == "interrupted\n", proc.stderr
    if moment == "main:return":
        assert json.loads(proc.stdout)["config"]["train"]["epochs"] == 2
    assert not (tmp_path / "run").exists()


# killed (SIGKILL) inside the sys.argv[1]-th torch.save, with part of that file written: what kill -9 during a
# checkpoint leaves behind
KILL_9_IN_SAVE = """
import os, signal, sys
import torch

at, real_save, saves = int(sys.argv.pop(1)), torch.save, []


def save(obj, f, *args, **kwargs):
    saves.append(f)
    if len(saves) == at:
        f.write(b"PK partial")
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save(obj, f, *args, **kwargs)


torch.save = save
"""


def test_kill_9_during_a_checkpoint_leaves_no_temp_file_once_resumed(cifar_dir, tmp_path, reference_run):
    """kill -9 while epoch 2's checkpoint is written leaves its hidden temp file (.last.pt.*.tmp), which
    stayed in the run folder for good: the resumed run (under the folder's lock) deletes it, and ends as
    the straight run."""
    run = tmp_path / "run"
    proc = run_cli_after(KILL_9_IN_SAVE, "2", *cli_args(cifar_dir, run))
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert [p.name for p in run.glob(".last.pt.*.tmp")] and load_checkpoint(run / "last.pt")["epoch"] == 1
    run_cli(cli_args(cifar_dir, run, "--resume", "auto"))
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml", "last.pt", "metrics.jsonl", "prev.pt",
                                                     "summary.json"]
    assert_same_training_state(load_checkpoint(run / "last.pt"), load_checkpoint(reference_run / "last.pt"))
    assert untimed_rows(run) == untimed_rows(reference_run)


# ------------------------------------------------------------------------------------------ numerical faults
def test_injected_nan_stops_the_run_and_keeps_the_last_good_checkpoint(cifar_dir, tmp_path):
    run = tmp_path / "run"
    proc = run_cli(cli_args(cifar_dir, run, "--train.epochs", "3"), expect=1,
                   env_extra={"FASTTRAIN_INJECT_NAN_STEP": str(STEPS + 5)})
    assert "error: the training loss became NaN or infinite at epoch 2, step 5" in proc.stderr
    assert f"The last good checkpoint ({run / 'last.pt'}) is kept" in proc.stderr
    assert "Lower optim.lr, raise optim.warmup_epochs" in proc.stderr
    # a log (not a terminal): the header is one line however long, its run folder on it
    assert any(line.startswith("fasttrain: smoke | ") and line.endswith(f"| run {run}")
               for line in proc.stdout.splitlines()), proc.stdout
    assert "train.precision" not in proc.stderr  # an fp32 run: no advice it has already taken
    assert "warning: training on the CPU: this is slow" in proc.stdout  # said before the run starts
    assert "Traceback" not in proc.stderr
    kept = load_checkpoint(run / "last.pt")
    assert (kept["epoch"], kept["step_in_epoch"]) == (1, 0)
    assert all(torch.isfinite(t).all() for t in kept["model"].values() if t.is_floating_point())
    assert not (run / "prev.pt").exists()  # epoch 2 never reached the disk
    assert metric_epochs(run) == [1]


def test_a_divergence_after_resume_auto_skipped_a_damaged_last_pt_names_the_good_checkpoint(cifar_dir, tmp_path,
                                                                                             reference_run):
    """--resume auto skipped a damaged last.pt and went on from prev.pt: when that run then diverges, the
    checkpoint it keeps is prev.pt, not the damaged last.pt."""
    run = tmp_path / "run"
    shutil.copytree(reference_run, run)
    data = (run / "last.pt").read_bytes()
    (run / "last.pt").write_bytes(data[: len(data) // 2])
    proc = run_cli(["--config", str(run / "config.yaml"), "--resume", "auto", "--output.dir", str(run),
                    "--device", "cpu"], expect=1, env_extra={"FASTTRAIN_INJECT_NAN_STEP": str(STEPS + 5)})
    assert f"resumed {run / 'prev.pt'} after epoch 1" in proc.stdout
    assert "error: the training loss became NaN or infinite at epoch 2, step 5" in proc.stderr
    assert f"The last good checkpoint ({run / 'prev.pt'}) is kept." in proc.stderr, proc.stderr
    assert load_checkpoint(run / "prev.pt")["epoch"] == 1


def test_non_finite_weights_are_never_checkpointed(cifar_dir, tmp_path):
    trainer = Trainer(tiny_config(cifar_dir, tmp_path, "--train.epochs", "1"), device="cpu", console=quiet())
    trainer.fit()
    before = (tmp_path / "last.pt").read_bytes()
    with torch.no_grad():
        next(trainer.model.parameters()).view(-1)[0] = float("inf")
    with pytest.raises(TrainingError, match=r"not saving a checkpoint.*NaN or infinite.*last good checkpoint"):
        trainer.save_checkpoint(1)
    assert (tmp_path / "last.pt").read_bytes() == before and not (tmp_path / "prev.pt").exists()


def test_a_non_finite_loss_at_an_epochs_first_step_stops_the_run_with_the_fixes_not_yet_taken(tmp_path):
    """_check_finite on a stand-in trainer: a bad loss at the epoch's first step (index 0; -1 alone means
    none) stops the run like one at any other step, named 1-based with that step's learning rate. The
    advice names only what the run has not done: clipping when optim.clip is none (else a lower clip
    value), and bf16 or fp32 only for an fp16 run."""
    from types import SimpleNamespace

    stand_in = Trainer.__new__(Trainer)
    stand_in.run_dir, stand_in.steps_per_epoch, stand_in._last_saved = tmp_path, STEPS, None  # nothing saved
    stand_in.schedule = SimpleNamespace(lr_at=lambda step: 0.01 * step)
    stand_in.cfg = SimpleNamespace(optim=SimpleNamespace(clip="value"))
    stand_in.precision = SimpleNamespace(name="fp32")
    stand_in._check_finite(2, -1)  # no bad step
    with pytest.raises(TrainingError, match=r"NaN or infinite at epoch 3, step 1 \(learning rate 0\.2\)") as failed:
        stand_in._check_finite(2, 0)
    assert "No checkpoint was written for this run." in str(failed.value)
    assert str(failed.value).endswith("Lower optim.lr, raise optim.warmup_epochs or lower optim.clip_value.")
    stand_in.cfg.optim.clip, stand_in.precision.name = "none", "fp16"
    assert stand_in._divergence_fixes() == ("Lower optim.lr, raise optim.warmup_epochs, enable gradient clipping "
                                           "(optim.clip) or use train.precision bf16 or fp32.")


def test_the_first_bad_step_of_a_resumed_epoch_counts_the_steps_it_skipped(cifar_dir, tmp_path, monkeypatch):
    """A run resumed at step 3 of an epoch that then diverges at its 2nd step of its own: the bad step is
    the epoch's 5th (index 4), as the uninterrupted run would report it, not the process's 2nd."""
    monkeypatch.setenv("FASTTRAIN_INJECT_NAN_STEP", "2")
    trainer = Trainer(tiny_config(cifar_dir, tmp_path), device="cpu", console=quiet())
    sums = trainer.train_epoch(0, skip=3)
    assert (int(sums["first_bad_step"]), sums["steps"]) == (4, STEPS - 3)


def test_out_of_memory_becomes_a_clear_error(cifar_dir, tmp_path, monkeypatch, capsys):
    def out_of_memory(self, images, labels):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(Trainer, "_train_step", out_of_memory)
    assert cli.main(cli_args(cifar_dir, tmp_path / "run")) == cli.EXIT_ERROR
    err = capsys.readouterr().err
    assert "error: out of GPU memory with train.batch_size 64" in err
    for hint in ("--train.batch_size (e.g. 32, and optim.lr with it)", "--train.precision bf16",
                 "Tried to allocate 20.00 GiB"):
        assert hint in err
    assert "max-autotune" not in err  # compile is off: nothing to change there
    assert not (tmp_path / "run" / "last.pt").exists()
    assert "No checkpoint was written for this run." in err and "is kept" not in err


@pytest.mark.parametrize("settings, taken", [
    (("--train.precision", "bf16"), "--train.precision bf16"),
    (("--train.batch_size", "1", "--train.eval_batch_size", "1"), "lower --train.batch_size"),
    (("--train.compile", "false", "--train.compile_mode", "max-autotune"), "--train.compile_mode default"),
])
def test_out_of_memory_names_no_fix_the_run_already_has(cifar_dir, tmp_path, monkeypatch, capsys, settings, taken):
    """Each fix the error names must change something: bf16 for a bf16 run, half of a batch of 1 or compile
    mode default for an uncompiled run would send the user back with the same command."""
    def out_of_memory(self, images, labels):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(Trainer, "_train_step", out_of_memory)
    assert cli.main(cli_args(cifar_dir, tmp_path / "run", *settings)) == cli.EXIT_ERROR
    err = capsys.readouterr().err
    assert "error: out of GPU memory" in err and taken not in err, err
    if "--train.eval_batch_size" in settings:  # neither batch can be halved
        assert "lower --train.eval_batch_size" not in err, err


def test_out_of_memory_names_each_fix_the_run_can_take(cifar_dir, tmp_path):
    """The other side: a run that could take every fix is told each of them (without a compile: the
    fixes are read from the config, so a stand-in trainer of max-autotune settings will do)."""
    from types import SimpleNamespace

    cfg = tiny_config(cifar_dir, tmp_path, "--train.batch_size", "64", "--train.eval_batch_size", "256",
                      "--train.compile", "true", "--train.compile_mode", "max-autotune")
    fixes = Trainer._oom_fixes(SimpleNamespace(cfg=cfg, precision=SimpleNamespace(name="fp32")))
    assert fixes == ("lower --train.batch_size (e.g. 32, and optim.lr with it); lower --train.eval_batch_size; "
                     "do not use compile mode max-autotune (--train.compile_mode default); use --train.precision bf16")
    cfg.train.batch_size = cfg.train.eval_batch_size = 1
    cfg.train.compile_mode = "default"
    assert Trainer._oom_fixes(SimpleNamespace(cfg=cfg, precision=SimpleNamespace(name="bf16"))) == \
        "free the GPU's memory held by other processes (nvidia-smi lists them)"


def test_the_out_of_memory_detail_is_the_first_line_of_torchs_message_bounded():
    """The `(...)` an out-of-memory error line ends with: what torch tried to allocate (its first line),
    not the allocator statistics and advice that follow, and never more than 300 characters."""
    message = ("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.1 GiB\n"
               "Of the allocated memory 70.2 GiB is allocated by PyTorch\nSee documentation for Memory Management")
    assert trainer_module.oom_detail(torch.OutOfMemoryError(message)) == message.splitlines()[0]
    assert trainer_module.oom_detail(torch.OutOfMemoryError("x" * 1000)) == "x" * 300
    assert trainer_module.oom_detail(torch.OutOfMemoryError("")) == "no detail"


def test_out_of_memory_while_setting_up_the_run_is_a_clear_error(cifar_dir, tmp_path, monkeypatch, capsys):
    """Before fit(): the data set's copy to the device can run out of memory too (another process holding
    the GPU); one error line with the fixes, not a traceback."""
    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 150.00 MiB")

    monkeypatch.setattr(trainer_module, "build_data", out_of_memory)
    assert cli.main(cli_args(cifar_dir, tmp_path / "run")) == cli.EXIT_ERROR
    err = capsys.readouterr().err
    assert err.startswith("error: out of GPU memory in `train` (CUDA out of memory. Tried to allocate 150.00 MiB)")
    assert "nvidia-smi" in err and "--train.batch_size" in err and "Traceback" not in err


def _full_disk_save(real_save):
    """torch.save on a full disk, as seen on a 480 KiB tmpfs: the write fails with a nameless ENOSPC, the
    zip writer's close then raises "unexpected pos" over it."""
    def save(obj, f, *args, **kwargs):
        try:
            real_save(obj, io.BytesIO(), *args, **kwargs)
            f.write(b"PK\x03\x04 part of a zip")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        finally:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 200704 vs 200528")
    return save


def test_a_full_disk_at_a_checkpoint_keeps_the_last_one_and_says_how_to_continue(cifar_dir, tmp_path, monkeypatch,
                                                                                 capsys):
    run = tmp_path / "run"
    trainer = Trainer(tiny_config(cifar_dir, run), device="cpu", console=quiet())
    trainer.save_checkpoint(1)
    before = (run / "last.pt").read_bytes()
    monkeypatch.setattr(torch, "save", _full_disk_save(torch.save))
    with pytest.raises(TrainingError) as failed:
        trainer.save_checkpoint(2)
    message = str(failed.value)
    assert message.startswith(f"could not write the checkpoint {run / 'last.pt'}: No space left on device.")
    assert f"The last good checkpoint ({run / 'last.pt'}) is kept." in message
    assert message.endswith(f"--resume auto --output.dir {run}")
    assert (run / "last.pt").read_bytes() == before
    assert not [p.name for p in run.iterdir() if p.name.startswith(".")]  # no temp file left


def test_a_full_disk_at_the_first_checkpoint_of_a_run_continued_elsewhere_says_how_to_continue_it(
        cifar_dir, tmp_path, monkeypatch, reference_run):
    """--resume A/last.pt --output.dir B, and B's first checkpoint fails (a full disk): B holds no checkpoint,
    so `--resume auto` there would start the run over from epoch 0. The printed command must continue from
    A's checkpoint, and it does."""
    run = tmp_path / "B"
    trainer = Trainer(tiny_config(cifar_dir, run, "--train.epochs", "3"), device="cpu", console=quiet(),
                      resume=reference_run / "last.pt")
    monkeypatch.setattr(torch, "save", _full_disk_save(torch.save))
    with pytest.raises(TrainingError) as failed:
        trainer.fit()
    monkeypatch.undo()
    message = str(failed.value)
    assert f"The last good checkpoint ({reference_run / 'last.pt'}) is kept." in message, message
    command = shlex.split(message.splitlines()[-1])
    assert command[:3] == ["python", "-m", "fasttrain"]
    proc = run_cli(command[3:])
    assert f"resumed {reference_run / 'last.pt'} after epoch 2" in proc.stdout, proc.stdout + proc.stderr
    assert metric_epochs(run) == [1, 2, 3] and load_checkpoint(run / "last.pt")["epoch"] == 3


def test_a_stop_before_the_first_step_of_a_run_continued_elsewhere_prints_commands_that_continue_it(
        cifar_dir, tmp_path, reference_run):
    """--resume A/last.pt --output.dir B, stopped before B's first step: the position is A's checkpoint, but
    B (which now holds config.yaml) refuses `--resume A/last.pt` without --overwrite, and `--resume auto`
    there would start over. So the stop saves the position in B, and both printed commands continue."""
    run = tmp_path / "B"
    trainer = Trainer(tiny_config(cifar_dir, run, "--train.epochs", "3"), device="cpu", console=quiet(),
                      resume=reference_run / "last.pt")
    trainer._stop.request(signal.SIGTERM)
    with pytest.raises(RunInterrupted) as stop:
        trainer.fit()
    message = str(stop.value)
    assert f"checkpoint saved: {run / 'last.pt'}" in message, message
    assert load_checkpoint(run / "last.pt")["epoch"] == 2
    resume = next(s for s in message.splitlines() if "--resume" in s and "auto" not in s)
    auto = next(s for s in message.splitlines() if "--resume auto" in s)
    for i, line in enumerate((resume, auto)):
        work = tmp_path / f"copy{i}"  # each command on its own copy of B
        shutil.copytree(run, work)
        command = [part.replace(str(run), str(work)) for part in shlex.split(line)]
        proc = run_cli(command[3:])
        assert "after epoch 2" in proc.stdout, proc.stdout + proc.stderr
        assert metric_epochs(work) == [1, 2, 3] and load_checkpoint(work / "last.pt")["epoch"] == 3


@pytest.mark.parametrize("write", ["config", "metrics"])
def test_a_full_disk_rewriting_a_run_file_leaves_the_old_one_whole(tmp_path, monkeypatch, write):
    """config.yaml (which the printed resume command reads) and metrics.jsonl's rewrite on resume (like
    summary.json) are replaced in one step: a write that fails part way leaves the old file, not an empty one."""
    from fasttrain import files
    from fasttrain.config import Config, save_config
    from fasttrain.run_folder import keep_metrics

    path = tmp_path / {"config": "config.yaml", "metrics": "metrics.jsonl"}[write]
    old = '{"epoch": 1}\n{"epoch": 2}\n' if write == "metrics" else "old: contents\n"
    path.write_text(old)
    real_fsync = os.fsync

    def full_disk(fd):
        real_fsync(fd)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(files.os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space left") as failed:
        if write == "config":
            save_config(Config(), path)
        else:
            keep_metrics(tmp_path, 1, None, warn=print)  # drops epoch 2
    assert path.read_text() == old and [p.name for p in tmp_path.iterdir()] == [path.name]
    assert files.file_error_line(failed.value) == f"error: {path}: No space left on device"  # not a traceback


def test_a_full_disk_appending_a_metrics_row_names_the_file(tmp_path):
    """An epoch's metrics row appended on a full disk: the write fails at close with an ENOSPC that names no file
    (seen on a full tmpfs under torchrun: a traceback instead of the CLI's one error line). It names metrics.jsonl.
    /dev/full is a real full disk: every write to it fails with ENOSPC."""
    from fasttrain.files import file_error_line
    from fasttrain.run_folder import METRICS, append_metrics

    (tmp_path / METRICS).symlink_to("/dev/full")
    with pytest.raises(OSError) as failed:
        append_metrics(tmp_path, {"epoch": 1})
    assert file_error_line(failed.value) == f"error: {tmp_path / METRICS}: No space left on device"


def test_a_full_disk_during_export_names_the_file(tmp_path, monkeypatch, capsys, good_run):
    monkeypatch.setattr(torch, "save", _full_disk_save(torch.save))
    out = tmp_path / "weights.pt"
    assert cli.main(["export", str(good_run / "last.pt"), str(out)]) == cli.EXIT_ERROR
    assert capsys.readouterr().err == f"error: {out}: No space left on device\n"
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------ bad input
def _cifar_copy(cifar_dir: Path, dest: Path, edit) -> Path:
    """A binary-version CIFAR folder: symlinks to the real files, then `edit(folder)` damages it."""
    src, folder = Path(cifar_dir) / "cifar-10-batches-bin", dest / "cifar-10-batches-bin"
    folder.mkdir(parents=True)
    for f in src.iterdir():
        (folder / f.name).symlink_to(f.resolve())
    edit(folder)
    return dest


def _truncate(folder):
    target = folder / "data_batch_2.bin"
    data = target.read_bytes()
    target.unlink()
    target.write_bytes(data[:-3073])


def _bad_label(folder):
    target = folder / "data_batch_1.bin"
    data = bytearray(target.read_bytes())
    target.unlink()
    data[0] = 12  # the first record's label byte
    target.write_bytes(bytes(data))


BAD_INPUT = [  # (extra args, exit code, message); each run targets a good run folder with --resume,
    # so the error must come from the bad input itself, after the folder check
    (["--optim.lr", "-1"], 2, "optim.lr = -1.0 is out of range"),
    (["--train.epochs", "0"], 2, "train.epochs = 0 is out of range"),
    (["--data.crop_padding", "40"], 2, "data.crop_padding = 40 is out of range"),
    (["--train.batch_size", "1000"], 2, "train.batch_size = 1000 is out of range"),  # > train_subset 640
    (["--model.max_params", "1000"], 2, "over the budget"),
    (["--model.base_channels", "8"], 1, "another architecture"),
]


@pytest.mark.parametrize("extra, code, message", BAD_INPUT, ids=lambda v: str(v)[:30])
def test_bad_input_is_one_clear_error_and_leaves_the_run_folder_alone(cifar_dir, good_run, capsys,
                                                                      extra, code, message):
    before = folder_snapshot(good_run)
    assert cli.main(cli_args(cifar_dir, good_run, "--resume", str(good_run / "last.pt"), *extra)) == code
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err, err
    if "architecture" in message:  # the mismatched keys are listed
        assert "shape mismatch" in err and "stem" in err
    assert folder_snapshot(good_run) == before


@pytest.mark.parametrize("change, message", [
    (lambda c: c.pop("config"), r"holds no config \(the settings it was trained with\)"),
    (lambda c: c.update(epoch="x"), r"its 'epoch' is str, not a whole number"),
    (lambda c: c.update(model=[1, 2]), r"its 'model' is not a state dict of named tensors"),
    (lambda c: c["config"]["model"].update(nonsense_key=1),
     r"the config saved in .* is not one this version of fasttrain reads \(unknown key 'model\.nonsense_key'"),
], ids=["no-config", "epoch-str", "model-list", "unknown-config-key"])
def test_a_sealed_file_of_another_layout_is_one_error_naming_it(good_run, tmp_path, capsys, change, message):
    """A file with the right marker and a valid checksum (sealed by other code, or a newer fasttrain) but
    another layout: eval and export say what is wrong with the file, exit 1; they ended in KeyError,
    ValueError or TypeError tracebacks, and a newer config's key read as one the user had typed (exit 2)."""
    ckpt = load_checkpoint(good_run / "last.pt")
    change(ckpt)
    path = write_checkpoint(ckpt, tmp_path / "odd.pt", previous=None)
    for command in (["eval", str(path), "--device", "cpu"], ["export", str(path), str(tmp_path / "w.pt")]):
        assert cli.main(command) == cli.EXIT_ERROR
        err = capsys.readouterr().err
        assert re.search(message, err) and "Traceback" not in err, err


def test_weights_trained_with_dali_are_scored_where_dali_is_missing(cifar_dir, good_run, tmp_path, monkeypatch,
                                                                     capsys):
    """eval reads the test set with the torch loader whatever data.loader trained the weights: the same
    images in the same order, and no DALI needed on the machine that scores them (it was refused, and eval
    takes no --data.loader to get round it)."""
    import sys as system

    ckpt = load_checkpoint(good_run / "last.pt")
    ckpt["config"]["data"]["loader"] = "dali"
    path = write_checkpoint(ckpt, tmp_path / "dali.pt", previous=None)
    for name in [m for m in system.modules if m == "nvidia.dali" or m.startswith("nvidia.dali.")]:
        monkeypatch.delitem(system.modules, name)
    monkeypatch.setitem(system.modules, "nvidia.dali", None)  # import nvidia.dali raises ImportError
    assert cli.main(["eval", str(path), "--device", "cpu", "--data.dir", str(cifar_dir), "--json"]) == 0, \
        capsys.readouterr().err
    dali = json.loads(capsys.readouterr().out)
    assert cli.main(["eval", str(good_run / "last.pt"), "--device", "cpu", "--data.dir", str(cifar_dir), "--json"]) == 0
    assert dali["test_acc"] == json.loads(capsys.readouterr().out)["test_acc"]


def test_a_resume_may_switch_the_se_implementation_and_the_budget(cifar_dir, tmp_path, reference_run, capsys):
    """model.se_impl (how SE runs) and model.max_params (the budget) are engine switches: a resume under
    another value goes on with a warning, as for other switches; another architecture is refused."""
    run = tmp_path / "run"
    shutil.copytree(reference_run, run)
    # the finished run resumed under the other switches (nothing left to train: no minutes of the SE
    # kernel under the interpreter): the checkpoint is taken, with the warning
    assert cli.main(cli_args(cifar_dir, run, "--model.se_impl", "triton", "--model.max_params", "4000000",
                             "--resume", str(run / "last.pt"))) == 0
    said = " ".join(capsys.readouterr().out.split())
    assert "model.se_impl 'torch' -> 'triton'" in said and "model.max_params" in said and "not an exact continuation" in said
    assert "nothing to train" in said
    assert cli.main(cli_args(cifar_dir, run, "--train.epochs", "4", "--model.dropout", "0.1",  # same shapes
                             "--resume", str(run / "last.pt"))) == 1
    err = " ".join(capsys.readouterr().err.split())
    # the key the command line changed is named: the config file given is often the run's own config.yaml
    assert "another model section than this config's (model.dropout 0.0 -> 0.1): drop the flag" in err, err


@pytest.mark.parametrize("edit, message", [
    (_truncate, "bytes, expected 30,730,000"),
    (_bad_label, "label 12 of image 0 is outside 0..9"),
    (lambda folder: (folder / "test_batch.bin").unlink(), "test_batch.bin is missing"),
], ids=["wrong-size", "label-out-of-range", "missing-file"])
def test_bad_data_is_one_clear_error_and_leaves_the_run_folder_alone(cifar_dir, good_run, tmp_path, capsys,
                                                                     edit, message):
    data = _cifar_copy(cifar_dir, tmp_path / "data", edit)
    before = folder_snapshot(good_run)
    args = cli_args(cifar_dir, good_run, "--resume", str(good_run / "last.pt"), "--data.dir", str(data),
                    "--data.download", "false")
    assert cli.main(args) == cli.EXIT_ERROR
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err, err
    assert folder_snapshot(good_run) == before
    assert cli.main(args + ["--dry-run"]) == cli.EXIT_ERROR  # what training refuses, the dry run refuses
    assert message in capsys.readouterr().err


def test_a_folder_holding_another_run_is_refused_without_resume_or_overwrite(cifar_dir, good_run, capsys):
    before = folder_snapshot(good_run)
    assert cli.main(cli_args(cifar_dir, good_run, "--name", "another-run")) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert "already holds a run" in err and "--resume" in err and "--overwrite" in err
    assert folder_snapshot(good_run) == before


def test_a_folder_in_use_by_another_run_is_refused_and_free_again_when_it_ends(cifar_dir, tmp_path, capsys):
    """Two runs started at once into one folder: both pass the first check (nothing is written before the
    warmup ends), so the folder is locked from the first write and checked again under the lock. The lock
    is the other run's here (a second descriptor: flock excludes it like another process)."""
    run = tmp_path / "run"
    other, _ = FolderLock.take(run)
    try:
        assert cli.main(cli_args(cifar_dir, run, "--train.epochs", "1")) == cli.EXIT_USAGE
        err = capsys.readouterr().err
        assert f"'{run}' is in use by another fasttrain run (pid {os.getpid()} on " in err, err
        assert sorted(p.name for p in run.iterdir()) == [LOCK]  # nothing of the refused run
    finally:
        other.release()
    assert not run.exists() or not any(run.iterdir())
    assert cli.main(cli_args(cifar_dir, run, "--train.epochs", "1")) == 0
    assert metric_epochs(run) == [1] and not (run / LOCK).exists()  # released at the end


def test_a_stale_lock_file_of_a_killed_run_blocks_nothing(cifar_dir, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / LOCK).write_text("pid 1 on a-killed-host\n")  # the kernel dropped its lock with the process
    assert cli.main(cli_args(cifar_dir, run, "--train.epochs", "1")) == 0
    assert metric_epochs(run) == [1] and not (run / LOCK).exists()


def test_a_lock_file_names_its_holder_alone_after_a_longer_stale_one(tmp_path):
    """The lock file of a killed run on another host says more than this run's "pid N on HOST": the new
    holder's line replaces it whole, or a refused run would name a mix of the two."""
    import socket

    run = tmp_path / "run"
    run.mkdir()
    (run / LOCK).write_text("pid 4194304 on a-killed-host-with-a-much-longer-name.cluster.example.org\n")
    lock, _ = FolderLock.take(run)
    try:
        other, holder = FolderLock.take(run)
        assert other is None and holder == f"pid {os.getpid()} on {socket.gethostname()}"
    finally:
        lock.release()


def test_a_lock_on_a_file_its_holder_removed_meanwhile_is_taken_again(tmp_path, monkeypatch):
    """The holder removes its lock file, then unlocks. A run that opened the file just before and locks
    it just after holds a lock on a file no longer in the folder, which excludes nobody: take() sees that
    and locks the file at the path instead, so the next run is refused."""
    run = tmp_path / "run"
    real_open, opened = os.open, []

    def open_as_the_holder_ends(path, *args):
        fd = real_open(path, *args)
        if not opened:  # the holder's release, between this open and the flock
            Path(path).unlink()
        opened.append(path)
        return fd

    monkeypatch.setattr(run_folder.os, "open", open_as_the_holder_ends)
    lock, _ = FolderLock.take(run)
    monkeypatch.undo()
    try:
        assert len(opened) == 2 and (run / LOCK).is_file()
        other, holder = FolderLock.take(run)
        assert other is None and holder.startswith(f"pid {os.getpid()} on ")
    finally:
        lock.release()


def test_a_released_lock_never_takes_the_next_runs_lock_file_with_it(tmp_path, monkeypatch):
    """release() removes the lock file, then unlocks: a run that locks the folder the moment it is free
    (here, inside release's close) makes a file of its own, which stays. Unlocked first, that run could
    lock the old file and see it removed under it: a third run would then get the folder too."""
    run = tmp_path / "run"
    lock, _ = FolderLock.take(run)
    real_close, held_fd, next_run = os.close, lock._fd, []

    def close_then_the_next_run_starts(fd):
        real_close(fd)
        if fd == held_fd and not next_run:
            next_run.append(None)
            next_run[0] = FolderLock.take(run)[0]

    monkeypatch.setattr(run_folder.os, "close", close_then_the_next_run_starts)
    lock.release()
    monkeypatch.undo()
    [following] = next_run
    try:
        assert following is not None and (run / LOCK).is_file()
        third, _ = FolderLock.take(run)
        assert third is None
    finally:
        following.release()


def test_releasing_a_lock_twice_closes_no_other_file(tmp_path):
    """A second release() does nothing: the descriptor number it held is reused at once (the lowest free
    one) by whatever opens a file next, and closing it again would close that file."""
    lock, _ = FolderLock.take(tmp_path / "run")
    lock.release()
    fd = os.open(tmp_path / "another-file", os.O_RDWR | os.O_CREAT)
    try:
        lock.release()
        os.fstat(fd)  # still open
    finally:
        os.close(fd)


def test_a_default_run_folder_that_cannot_be_written_says_so(cifar_dir, tmp_path, monkeypatch):
    """Under the lock a default-named folder gives way to <name>-2 only when a run took it; one refused
    for another reason (here: it cannot be written) is that refusal, not 99 folders tried and "all taken"."""
    first = tmp_path / "runs" / "smoke-20261127-000000"
    monkeypatch.setattr(run_folder.os, "access", lambda path, mode: False)
    with pytest.raises(ConfigError, match="is not writable"):
        run_folder.claim_run_dir(tiny_config(cifar_dir, first), first, None, overwrite=False, default_name=True)
    assert [p.name for p in (tmp_path / "runs").iterdir()] == [first.name]


@pytest.mark.parametrize("taken_by", ["a running run", "a finished run"])
def test_a_default_run_folder_taken_meanwhile_gives_way_to_the_next_name(cifar_dir, tmp_path, monkeypatch, taken_by):
    """runs/<config>-<second>: two runs launched in the same second (a job array) pick the same name; the
    one that writes second moves to <name>-2 instead of mixing its files into the other's: its TensorBoard
    event file included (opened after the move, and the other run's folder is not cleared of old ones)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(run_folder.time, "strftime", lambda fmt: "20261127-000000")
    cfg = tiny_config(cifar_dir, "unused", "--train.epochs", "1")
    cfg.output.dir, cfg.output.tensorboard = None, True
    trainer = Trainer(cfg, device="cpu", console=quiet())
    first = Path("runs/smoke-20261127-000000")
    assert trainer.run_dir == first
    holder = None
    if taken_by == "a running run":
        holder, _ = FolderLock.take(first)
    else:
        (first / "config.yaml").parent.mkdir(parents=True)
        (first / "config.yaml").write_text("name: smoke\n")
    try:
        summary = trainer.fit()
    finally:
        if holder is not None:
            holder.release()
    assert summary["run_dir"] == "runs/smoke-20261127-000000-2" and metric_epochs(Path(summary["run_dir"])) == [1]
    assert len(list(Path(summary["run_dir"]).glob("events.out.tfevents.*"))) == 1
    assert sorted(p.name for p in first.iterdir()) == ([] if holder else ["config.yaml"])


def test_resume_without_a_config_continues_with_the_checkpoints_own(cifar_dir, tmp_path, reference_run, capsys):
    """`--resume RUN/last.pt` alone: not the defaults (the paper's 4.7M network, which the checkpoint's
    weights do not fit) but the config it was trained with, overrides on top, in the folder it lies in."""
    run = tmp_path / "moved"
    shutil.copytree(reference_run, run)
    assert cli.main(["--device", "cpu", "--resume", str(run / "last.pt"), "--train.epochs", "3"]) == 0
    assert f"using the config saved in {run / 'last.pt'}" in capsys.readouterr().err
    assert metric_epochs(run) == [1, 2, 3] and load_checkpoint(run / "last.pt")["epoch"] == 3
    assert load_config(run / "config.yaml").train.epochs == 3


@pytest.mark.parametrize("change, schedule_note", [(("--train.eval_every", "2"), False),
                                                   (("--optim.lr", "0.05"), True),
                                                   (("--train.epochs", "3"), True)])
def test_a_resume_under_a_changed_config_names_the_change(cifar_dir, tmp_path, reference_run, change, schedule_note):
    """Each change is named; the note on the learning-rate schedule only where it is concerned."""
    _, said = resume_a_copy(cifar_dir, tmp_path, reference_run, *change)
    warning = next(line for line in said if "was trained with another config" in line)
    assert f"{change[0][2:]} " in warning and "not an exact continuation" in warning
    assert ("learning-rate schedule" in warning) == schedule_note, warning


def test_a_resume_that_trains_in_another_precision_says_so(cifar_dir, tmp_path, reference_run):
    """train.precision auto is bf16 on a GPU and fp32 on the CPU: a run stopped on a GPU and continued on the
    CPU keeps its config but not its arithmetic, which the config-change warning cannot show. The checkpoint
    records the precision it trained in, and a resume that resolves another names it and the flag that keeps
    it; where they agree, nothing is said."""
    trainer, said = resume_a_copy(cifar_dir, tmp_path, reference_run, "--train.precision", "auto")
    assert trainer.precision.name == "fp32" and not any("was trained in" in line for line in said)
    gpu_run = {**trainer.checkpoint_state(2), "precision": "bf16"}  # what auto saved on a GPU
    write_checkpoint(gpu_run, tmp_path / "run" / "last.pt")
    console, said = recording_console()
    Trainer(tiny_config(cifar_dir, tmp_path / "run", "--train.precision", "auto"), device="cpu", console=console,
            resume=tmp_path / "run" / "last.pt")
    said = " ".join(" ".join(said).split())  # rich wraps long lines
    assert "was trained in bf16; train.precision auto gives fp32 on cpu: not an exact continuation" in said, said
    assert "pass --train.precision bf16 to go on in bf16" in said


def test_a_resume_that_reads_other_data_says_so(cifar_dir, tmp_path, reference_run, capsys):
    """A resume in a shell with another FASTTRAIN_DATA (or none: ./data, downloaded there) would go on
    training on other images unnoticed: the warning names both sources and the fix."""
    run = tmp_path / "run"
    shutil.copytree(reference_run, run)
    elsewhere = tmp_path / "elsewhere"  # the same files under another name: all the warning can see
    elsewhere.symlink_to(Path(cifar_dir).resolve(), target_is_directory=True)
    assert cli.main(cli_args(elsewhere, run, "--train.epochs", "3", "--resume", str(run / "last.pt"))) == 0
    said = " ".join(capsys.readouterr().out.split())
    assert f"{run / 'last.pt'} was trained on CIFAR-10" in said and "this run reads CIFAR-10" in said, said
    assert str(elsewhere) in said and "pass the --data.dir it was trained on" in said
    assert metric_epochs(run) == [1, 2, 3]


def test_a_run_continued_from_another_folder_never_replaces_a_run_there(cifar_dir, tmp_path, reference_run, capsys):
    """--resume A --output.dir B: B holding a run of its own is refused (nothing of it touched); with
    --overwrite that run goes entirely (no old prev.pt left as a fallback) and B's curves start with
    A's epochs. A itself is only read. A changed setting is named in a warning."""
    other = tmp_path / "other"
    shutil.copytree(reference_run, other)
    source, before = folder_snapshot(reference_run), folder_snapshot(other)
    args = cli_args(cifar_dir, other, "--train.epochs", "3", "--resume", str(reference_run / "prev.pt"))
    assert cli.main(args) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert "continues a run of another folder" in err and "already holds a run of its own" in err
    # the way back names the source folder: "leave it out" would not help with an --output.dir from a config.yaml
    assert f"--output.dir {reference_run} to continue it there" in " ".join(err.split())
    assert folder_snapshot(other) == before

    assert cli.main(args + ["--overwrite"]) == 0
    said = " ".join(capsys.readouterr().out.split())  # the run's console; rich wraps long lines
    assert "was trained with another config: train.epochs 2 -> 3" in said and "not an exact continuation" in said
    assert "was trained on" not in said  # the same data
    assert metric_epochs(other) == [1, 2, 3]
    first = (reference_run / "metrics.jsonl").read_text().splitlines()[0]
    assert (other / "metrics.jsonl").read_text().splitlines()[0] == first  # epoch 1 is the source run's
    assert load_checkpoint(other / "last.pt")["epoch"] == 3
    assert load_checkpoint(other / "prev.pt")["epoch"] == 2  # this run's, not the replaced run's epoch 1
    assert folder_snapshot(reference_run) == source

    # a finished run continued elsewhere with nothing to train: refused before anything is written,
    # never reported with the other folder's figures (even with --overwrite)
    done = folder_snapshot(other)
    args = cli_args(cifar_dir, other, "--resume", str(reference_run / "last.pt")) + ["--overwrite"]
    assert cli.main(args) == cli.EXIT_USAGE
    assert "already completed 2 of 2 epochs: nothing to continue in" in capsys.readouterr().err
    assert folder_snapshot(other) == done

    # a link to a folder's checkpoint resumes that folder: not "another folder", nothing deleted
    link = tmp_path / "links" / "current.pt"
    link.parent.mkdir()
    link.symlink_to(other / "last.pt")
    assert cli.main(cli_args(cifar_dir, other, "--train.epochs", "4", "--resume", str(link))) == 0
    assert metric_epochs(other) == [1, 2, 3, 4] and load_checkpoint(other / "last.pt")["epoch"] == 4


def test_resuming_a_finished_run_again_leaves_its_files_alone(cifar_dir, tmp_path, reference_run, capsys):
    """A scheduler restarting `--resume auto` after the run finished: nothing to train, and the run's
    summary (its accuracies) and config are kept, not rewritten with nothing."""
    run = tmp_path / "run"
    shutil.copytree(reference_run, run)
    before = folder_snapshot(run)
    assert cli.main(cli_args(cifar_dir, run, "--resume", "auto")) == 0
    assert "nothing to train" in capsys.readouterr().out
    assert folder_snapshot(run) == before
    assert json.loads((run / "summary.json").read_text())["final_test_acc"] is not None


def test_resuming_a_run_killed_after_its_summary_removes_its_stale_lock_file(cifar_dir, tmp_path, reference_run,
                                                                            capsys):
    """kill -9 between the summary and the end of the process leaves the folder's lock file (the kernel drops
    the lock, not the file). The resume that finds the run finished writes nothing, so the file stayed for
    good: it goes now, and the run's files are kept as they are."""
    run = tmp_path / "run"
    shutil.copytree(reference_run, run)
    before = folder_snapshot(run)
    (run / LOCK).write_text("pid 1 on a-killed-host\n")
    assert cli.main(cli_args(cifar_dir, run, "--resume", "auto")) == 0
    assert "its summary is kept" in capsys.readouterr().out
    assert folder_snapshot(run) == before and not (run / LOCK).exists()


def test_a_finished_run_without_its_summary_measures_it_again(cifar_dir, tmp_path, reference_run, capsys):
    """Killed between the final checkpoint and summary.json (e.g. in the final TTA pass): the restart has
    nothing to train and rebuilds the summary from the final model, not a summary of nulls."""
    run = tmp_path / "run"
    shutil.copytree(reference_run, run)
    kept = json.loads((run / "summary.json").read_text())
    (run / "summary.json").unlink()
    assert cli.main(cli_args(cifar_dir, run, "--resume", "auto", "--train.tta", "flip")) == 0
    assert "nothing to train" in capsys.readouterr().out
    rebuilt = json.loads((run / "summary.json").read_text())
    assert rebuilt["final_test_acc"] == pytest.approx(kept["final_test_acc"])  # the same model, measured again
    assert rebuilt["final_test_acc_tta"] is not None and rebuilt["epochs"] == 2


def test_overwrite_drops_the_old_runs_summary(cifar_dir, tmp_path, reference_run):
    """--overwrite replaces the whole run: killed after two epochs, the new run's checkpoints must not
    be described by the old run's summary.json (export stamps its accuracy on the weights), nor its
    curves shown by the old run's plot."""
    from fasttrain.distributed import DIE_RANK_ENV, DIE_STEP_ENV
    from fasttrain.export import export_weights

    run = tmp_path / "run"
    shutil.copytree(reference_run, run)
    (run / "curves.png").write_bytes(b"the old run's plot")
    steps = load_checkpoint(run / "last.pt")["steps_per_epoch"]
    run_cli(cli_args(cifar_dir, run, "--train.epochs", "3", "--optim.lr", "0.01") + ["--overwrite"],
            env_extra={DIE_RANK_ENV: "0", DIE_STEP_ENV: str(2 * steps + 1)}, expect=1)  # dies in epoch 3
    assert load_checkpoint(run / "last.pt")["epoch"] == 2
    assert not (run / "summary.json").exists() and not (run / "curves.png").exists()
    assert export_weights(run / "last.pt", tmp_path / "weights.pt")["run"] == {}


def test_overwrite_drops_the_old_runs_tensorboard_curves_also_without_tensorboard(tmp_path, reference_run):
    """--overwrite replaces the whole run, its TensorBoard event files too, also when the new run writes none
    (output.tensorboard false): `tensorboard --logdir runs/` would show the old run's curves under this
    folder's name. A run resumed in its own folder keeps its own."""
    run = tmp_path / "run"
    shutil.copytree(reference_run, run)
    (run / "events.out.tfevents.1.host.1.0").write_bytes(b"the old run's curves")
    cfg = load_config(run / "config.yaml")
    assert not cfg.output.tensorboard
    run_folder.prepare_run_dir(run, cfg, None, 0, warn=print)  # a fresh run (--overwrite)
    assert not list(run.glob("events.out.tfevents.*"))
    (run / "events.out.tfevents.2.host.1.0").write_bytes(b"this run's curves")
    run_folder.prepare_run_dir(run, cfg, run / "last.pt", 0, warn=print)  # resumed in its own folder
    assert [p.name for p in run.glob("events.out.tfevents.*")] == ["events.out.tfevents.2.host.1.0"]


def test_export_takes_a_summary_only_for_its_own_checkpoint(tmp_path, reference_run):
    """The summary describes a checkpoint when both its epochs and its training seconds are the
    checkpoint's: a summary of another run with the same epochs is not taken."""
    from fasttrain.export import export_weights

    run = tmp_path / "run"
    shutil.copytree(reference_run, run)
    summary = json.loads((run / "summary.json").read_text())
    assert export_weights(run / "last.pt", tmp_path / "a.pt")["run"]["final_test_acc"] == summary["final_test_acc"]
    (run / "summary.json").write_text(json.dumps(dict(summary, train_seconds=summary["train_seconds"] + 1.0)))
    assert export_weights(run / "last.pt", tmp_path / "b.pt")["run"] == {}


def test_metrics_kept_on_resume_are_the_rows_up_to_the_checkpoint(tmp_path):
    """keep_metrics keeps a row only when its epoch is the checkpoint's or before; a line that is no row of
    the run (plot leaves it out too: an object without a whole-number epoch, bytes that are no UTF-8) is
    dropped with a warning (an epoch "4" ended the resume in a TypeError, bad bytes in a UnicodeDecodeError)."""
    from fasttrain.run_folder import keep_metrics

    (tmp_path / "metrics.jsonl").write_bytes(b'{"epoch": 1}\n{"note": "no epoch"}\n{"epoch": "4"}\n\xff\xfe\n'
                                             b'{"epoch": 2}\n{"epoch": 3}\n')
    warned = []
    keep_metrics(tmp_path, 2, None, warn=warned.append)
    assert (tmp_path / "metrics.jsonl").read_text() == '{"epoch": 1}\n{"epoch": 2}\n'
    assert warned == [f"{tmp_path / 'metrics.jsonl'}: dropped 3 unreadable line(s)"]
    keep_metrics(tmp_path, 2, None, warn=pytest.fail)  # nothing unreadable left: no warning


def test_a_torn_metrics_line_is_dropped_on_resume(cifar_dir, tmp_path, reference_run, capsys):
    """A kill (or a full disk) in the middle of appending a metrics row: the resumed run drops the torn
    line with a warning instead of failing on it."""
    run = tmp_path / "run"
    shutil.copytree(reference_run, run)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 3, "lr": 0.1, "train_lo')
    assert cli.main(cli_args(cifar_dir, run, "--train.epochs", "3", "--resume", "auto")) == 0
    assert "dropped 1 unreadable line(s)" in " ".join(capsys.readouterr().out.split())
    assert metric_epochs(run) == [1, 2, 3]


def test_a_folder_whose_run_saved_no_checkpoint_says_overwrite(cifar_dir, tmp_path, capsys):
    """A run that failed before its first checkpoint left config.yaml: retrying with a changed setting
    is told to --overwrite, not to resume a last.pt that does not exist."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("name: failed-before-its-first-checkpoint\n")
    assert cli.main(cli_args(cifar_dir, run)) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert "saved no checkpoint" in err and "--overwrite" in err and "last.pt" not in err


def test_a_folder_of_exported_weights_is_not_called_a_run(cifar_dir, tmp_path, capsys, good_run):
    """A folder holding only `fasttrain export`'s weights file: the refusal names that file and does not
    offer to resume a last.pt that is not there; --overwrite writes the run beside it, keeping it."""
    run = tmp_path / "exp1"
    assert cli.main(["export", str(good_run / "last.pt"), str(run / "weights.pt")]) == 0
    capsys.readouterr()
    assert cli.main(cli_args(cifar_dir, run)) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert "holds weights.pt but no run (no config.yaml or last.pt) to continue" in err and "--resume" not in err, err
    weights = (run / "weights.pt").read_bytes()
    assert cli.main(cli_args(cifar_dir, run, "--train.epochs", "1") + ["--overwrite"]) == 0
    assert (run / "last.pt").is_file() and (run / "weights.pt").read_bytes() == weights


def test_resume_auto_starts_over_when_killed_before_the_first_checkpoint(cifar_dir, tmp_path, capsys):
    """A scheduler restarting `--resume auto` after a kill in epoch 1 must not be stuck on
    "already holds a run": the folder has this run's config.yaml and no checkpoint."""
    run = tmp_path / "run"
    args = cli_args(cifar_dir, run, "--train.epochs", "1")
    run.mkdir()
    save_config(load_config(args[1], [a for a in args[2:] if a not in ("--device", "cpu")]), run / "config.yaml")
    assert cli.main(args + ["--resume", "auto"]) == 0, capsys.readouterr().err
    assert load_checkpoint(run / "last.pt")["epoch"] == 1


def test_resume_auto_knows_its_run_whatever_its_saved_output_dir(cifar_dir, tmp_path, capsys):
    """A run in a default folder (runs/<name>-<time>) saves output.dir null: restarted with its own
    config.yaml and --output.dir after a kill before the first checkpoint, it is still its own run."""
    run = tmp_path / "run"
    args = cli_args(cifar_dir, run, "--train.epochs", "1")
    run.mkdir()
    saved = load_config(args[1], [a for a in args[2:] if a not in ("--device", "cpu")])
    saved.output.dir = None
    save_config(saved, run / "config.yaml")
    assert cli.main(args + ["--resume", "auto"]) == 0, capsys.readouterr().err
    assert load_checkpoint(run / "last.pt")["epoch"] == 1


# a config.yaml this version cannot read (an unknown key) cannot be shown to be this run's: refused alike
@pytest.mark.parametrize("config_yaml", ["name: someone-else\n", "train:\n  epochz: 1\n"], ids=["another", "unreadable"])
def test_resume_auto_refuses_a_folder_of_another_run_without_checkpoints(cifar_dir, tmp_path, capsys, config_yaml):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(config_yaml)
    before = folder_snapshot(run)
    assert cli.main(cli_args(cifar_dir, run, "--resume", "auto")) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert "holds no checkpoint and the config.yaml of another run" in err
    assert "with --overwrite instead of --resume auto" in err  # --overwrite beside --resume auto is not taken
    assert folder_snapshot(run) == before


def test_command_line_mistakes_are_usage_errors_that_name_the_fix(cifar_dir, tmp_path, good_run, capsys):
    """Exit 2 and one line, nothing trained or written: --json without --dry-run (it would train and print
    nothing of it), a test subset eval cannot take, a misspelt command."""
    run = tmp_path / "run"
    assert cli.main(cli_args(cifar_dir, run) + ["--json"]) == cli.EXIT_USAGE
    assert "pass --dry-run --json" in capsys.readouterr().err and not run.exists()
    for n in ("-5", "20000"):
        assert cli.main(["eval", "--checkpoint", str(good_run / "last.pt"), "--device", "cpu",
                         "--data.test_subset", n]) == cli.EXIT_USAGE
        assert "data.test_subset" in capsys.readouterr().err
    assert cli.main(["evaluate", "--checkpoint", str(good_run / "last.pt")]) == cli.EXIT_USAGE
    assert "the commands: train (the default), eval, plot, export" in capsys.readouterr().err
    # eval takes its checkpoint as export does, or as --checkpoint: one of them
    for two in ([], [str(good_run / "last.pt"), "--checkpoint", str(good_run / "prev.pt")]):
        with pytest.raises(SystemExit) as stop:
            cli.main(["eval", *two, "--device", "cpu"])
        assert stop.value.code == cli.EXIT_USAGE
        assert ("two checkpoints named" if two else "name one checkpoint: python -m fasttrain eval RUN_DIR/last.pt"
                ) in capsys.readouterr().err
    # --dry-run refuses what training would: a device that is not there, a checkpoint that is not there
    assert cli.main(cli_args(cifar_dir, run) + ["--dry-run", "--resume", str(tmp_path / "none.pt")]) == cli.EXIT_USAGE
    assert f"--resume: checkpoint {str(tmp_path / 'none.pt')!r} not found" in capsys.readouterr().err
    assert cli.main(["--config", str(tmp_path), "--dry-run"]) == cli.EXIT_USAGE
    assert "is not a file: name a YAML config" in capsys.readouterr().err


def test_resume_auto_without_a_run_folder_is_a_usage_error(cifar_dir, tmp_path, monkeypatch, capsys):
    """--resume auto looks in the run folder, which a config without output.dir does not name: one line
    saying to pass it (not a traceback), and nothing trained or written."""
    monkeypatch.chdir(tmp_path)  # where a default runs/<name>-<time> would go
    args = ["--config", str(REPO / "configs/smoke.yaml"), "--device", "cpu", *TINY, "--data.dir", str(cifar_dir)]
    assert cli.main(args + ["--resume", "auto"]) == cli.EXIT_USAGE
    assert "--resume auto needs the run folder: pass --output.dir RUN_DIR" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_resume_without_a_config_needs_a_checkpoint_that_holds_one(tmp_path, capsys):
    """A checkpoint without its config (written by other code): the defaults would be another network, so
    the fix is named, not a traceback."""
    path = write_checkpoint({"format": FORMAT, "model": {}}, tmp_path / "last.pt", previous=None)
    assert cli.main(["--device", "cpu", "--resume", str(path), "--dry-run"]) == cli.EXIT_ERROR
    assert f"{path} holds no config: pass the --config it was trained with" in capsys.readouterr().err


@pytest.mark.parametrize("spelling", ["--output.dir DIR", "--output.dir=DIR", "--output {dir: DIR}"])
def test_resume_without_a_config_goes_where_output_dir_says(cifar_dir, tmp_path, capsys, spelling):
    """`--resume RUN/last.pt` alone continues in RUN (the checkpoint's config names the folder it started
    in); an --output.dir, in any spelling the config flags take, is the folder the run goes on in (the
    section mapping was missed: the run went on in RUN, and changed the run it was to branch from)."""
    from fasttrain.config import config_to_dict

    run, elsewhere = tmp_path / "run", str(tmp_path / "elsewhere")
    run.mkdir()
    saved = config_to_dict(tiny_config(cifar_dir, tmp_path / "where-it-started"))
    path = write_checkpoint({"format": FORMAT, "model": {}, "config": saved}, run / "last.pt", previous=None)
    flag = {"--output.dir DIR": ["--output.dir", elsewhere], "--output.dir=DIR": [f"--output.dir={elsewhere}"],
            "--output {dir: DIR}": ["--output", f"{{dir: {elsewhere}}}"]}[spelling]
    assert cli.main(["--device", "cpu", "--resume", str(path), "--dry-run", "--json", *flag]) == 0
    assert json.loads(capsys.readouterr().out)["config"]["output"]["dir"] == elsewhere
    assert cli.main(["--device", "cpu", "--resume", str(path), "--dry-run", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["config"]["output"]["dir"] == str(run)


def test_a_dry_run_takes_resume_auto_and_refuses_a_missing_gpu(cifar_dir, tmp_path, monkeypatch, capsys):
    """--dry-run refuses what training would, and only that: --resume auto (what a scheduler's restart
    passes, with the config or without: the paper's recipe) is not a checkpoint file named "auto"; --device
    cuda where PyTorch sees no GPU is refused at once (the GPU hidden here, so that a GPU machine agrees)."""
    run = tmp_path / "run"
    assert cli.main(cli_args(cifar_dir, run, "--resume", "auto") + ["--dry-run", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["config"]["model"]["base_channels"] == 4
    assert cli.main(["--device", "cpu", "--resume", "auto", "--output.dir", str(run), "--data.dir", str(cifar_dir),
                     "--dry-run", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["config"]["model"]["blocks"] == [4, 4, 3]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    on_gpu = ["--config", str(REPO / "configs/smoke.yaml"), "--device", "cuda", *tiny(cifar_dir, run), "--dry-run"]
    assert cli.main(on_gpu) == cli.EXIT_USAGE
    assert "--device cuda: no CUDA GPU is visible" in capsys.readouterr().err
    assert not run.exists()


def test_an_output_folder_that_cannot_be_written_is_refused_before_training(cifar_dir, tmp_path, capsys,
                                                                           monkeypatch):
    """Its first write comes after the first epoch (and the compile warmup): refused at once instead."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert cli.main(cli_args(cifar_dir, blocker / "run")) == cli.EXIT_USAGE
    assert "is a file; choose another --output.dir" in capsys.readouterr().err
    import fasttrain.run_folder as run_folder  # root may write anywhere: the refusal as a user would get it

    # a folder that may be read and entered, not written (mode r-x): the check asks for writing
    monkeypatch.setattr(run_folder.os, "access", lambda path, mode: not mode & os.W_OK)
    assert cli.main(cli_args(cifar_dir, tmp_path / "run")) == cli.EXIT_USAGE
    assert "is not writable" in capsys.readouterr().err and not (tmp_path / "run").exists()


def test_a_moved_run_folder_resumes_where_it_lies_now(cifar_dir, tmp_path, capsys):
    """The README's "continue a run exactly" command after `mv runs/A runs/B`: its saved config.yaml still
    names runs/A (output.dir), but the run goes on in runs/B, and runs/A is not made again. Another
    output key on the command line (--output.progress) changes nothing of that: only --output.dir does."""
    first = tmp_path / "A"
    assert cli.main(cli_args(cifar_dir, first, "--train.epochs", "1")) == 0
    moved = tmp_path / "B"
    first.rename(moved)
    args = ["--config", str(moved / "config.yaml"), "--device", "cpu", "--resume", str(moved / "last.pt"),
            "--train.epochs", "2", "--output.progress", "false"]
    assert cli.main(args) == 0
    assert "continuing in" in capsys.readouterr().err and not first.exists()
    assert [json.loads(r)["epoch"] for r in (moved / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert load_checkpoint(moved / "last.pt")["epoch"] == 2


def test_a_moved_run_is_followed_unless_output_dir_says_otherwise(cifar_dir, tmp_path, capsys):
    """The rule above, in a dry run (which prints the folder training would write): a config.yaml naming
    another folder than the one it lies in, beside the checkpoint resumed, continues where both lie now,
    with a note; an --output.dir given wins, without one; a run in its own folder gets no note."""
    moved = tmp_path / "B"
    moved.mkdir()
    save_config(tiny_config(cifar_dir, tmp_path / "A"), moved / "config.yaml")
    (moved / "last.pt").write_bytes(b"a dry run only checks that it is a file")
    command = ["--config", str(moved / "config.yaml"), "--device", "cpu", "--resume", str(moved / "last.pt"),
               "--dry-run", "--json"]

    def planned(*extra):
        assert cli.main(command + list(extra)) == 0
        out, err = capsys.readouterr()
        return json.loads(out)["config"]["output"]["dir"], "continuing in" in err

    assert planned() == (str(moved), True)
    assert planned("--output.dir", str(tmp_path / "C")) == (str(tmp_path / "C"), False)
    # a section mapping names it too: it was missed, and the run went on in (and changed) the old folder
    assert planned("--output", f"{{dir: {tmp_path / 'D'}}}") == (str(tmp_path / "D"), False)
    save_config(tiny_config(cifar_dir, moved), moved / "config.yaml")  # a run in the folder it started in
    assert planned() == (str(moved), False)


@pytest.mark.parametrize("moment", ["last evaluation", "lock release"])
def test_a_signal_after_the_last_step_finishes_the_run_and_says_so(cifar_dir, tmp_path, monkeypatch, moment):
    """A stop during the final evaluation, or as fit ends (the run folder's lock released, after the summary): the
    run is complete by then (exit 0, its files written), and the console says the signal was seen rather than
    ignoring it silently (which it did at the lock's release: exit 0 and no word of the Ctrl-C)."""
    from fasttrain.console import RunConsole

    warned = []
    console = RunConsole(progress=False, enabled=True)
    console.warn = warned.append
    trainer = Trainer(tiny_config(cifar_dir, tmp_path / "run", "--train.epochs", "1"), device="cpu", console=console)
    if moment == "last evaluation":
        evaluate_into = trainer._evaluate_into
        trainer._evaluate_into = lambda row: (trainer._stop.request(signal.SIGINT), evaluate_into(row))
    else:
        release = FolderLock.release
        monkeypatch.setattr(FolderLock, "release", lambda lock: (signal_self(signal.SIGINT), release(lock)))
    summary = trainer.fit()
    assert summary["final_test_acc"] is not None and (tmp_path / "run" / "summary.json").is_file()
    assert any("SIGINT came after the last training step" in w for w in warned), warned


# a Ctrl-C (SIGINT sent to the process, as a terminal or `kill -INT` does; "MODULE:SIGTERM" another signal) where
# the module sys.argv[1] names is first imported (found: its spec is looked for)
CTRL_C_AT_IMPORT = """
import os, signal, sys
target, _, signame = sys.argv.pop(1).partition(":")


class CtrlC:
    def find_spec(self, name, path=None, target_module=None):
        if name == target:
            sys.meta_path.remove(self)  # one signal: not again where a failed import is retried
            os.kill(os.getpid(), signal.Signals[signame or "SIGINT"])
        return None


sys.meta_path.insert(0, CtrlC())
"""


@pytest.mark.parametrize("inherited", [signal.default_int_handler, signal.SIG_IGN], ids=["terminal", "background"])
@pytest.mark.parametrize("module", ["torch", "numpy", "fasttrain.trainer"])
def test_ctrl_c_while_the_modules_load_is_one_line_and_writes_nothing(cifar_dir, tmp_path, module, inherited):
    """A Ctrl-C in the first seconds of `python -m fasttrain` (importing torch in __main__, the trainer's
    modules in cli.main) was a KeyboardInterrupt traceback and exit -2. It is the interrupt: exit 130 and one
    line that says nothing was read or written, which holds. Also for a run started in the background by a
    script (`python -m fasttrain ... &` in a non-interactive shell), which inherits SIGINT ignored: that SIGINT
    had no effect and the run trained to its end (exit 0), while one during training stopped it.
    numpy: first imported by torch's C++ initialisation, which clears any error it meets there: a Ctrl-C in that
    moment was lost, and torch went on without numpy (signals.held_back holds it until torch is imported)."""
    run = tmp_path / "run"
    with disposition(signal.SIGINT, inherited):  # what the child inherits: a handler becomes the default
        proc = run_cli_after(CTRL_C_AT_IMPORT, module, *cli_args(cifar_dir, run))
    assert proc.returncode == cli.EXIT_INTERRUPTED, proc.stderr
    assert proc.stderr == "interrupted while starting: nothing was read or written\n"
    assert proc.stdout == "" and not run.exists()


@pytest.mark.parametrize("module", ["torch", "fasttrain.trainer"])
def test_under_torchrun_a_ctrl_c_while_the_modules_load_is_said_by_local_rank_0_alone(cifar_dir, tmp_path, module):
    """torchrun's agent forwards a Ctrl-C to every worker: the line of one that comes while the modules load
    (__main__'s import of torch, cli.main's of the trainer) was printed once per rank. Local rank 0 says it; rank 1
    exits 130 at once, quietly (the test_ctrl_c_while_the_modules_load_... above is local rank 0's, one process's)."""
    proc = run_cli_after(CTRL_C_AT_IMPORT, module, *cli_args(cifar_dir, tmp_path / "run"), RANK="1", LOCAL_RANK="1",
                         WORLD_SIZE="2")
    assert (proc.returncode, proc.stderr, proc.stdout) == (cli.EXIT_INTERRUPTED, "", "")


class NoTraining:
    """In place of the Trainer: cli.main's part of a run alone (no process group, no training)."""

    def __init__(self, cfg, **kwargs):
        pass

    def fit(self) -> None:
        pass


def test_under_torchrun_the_notes_and_warnings_every_rank_computes_alike_are_printed_by_rank_0(
        rank_of_a_torchrun_job, tmp_path, monkeypatch, capsys, good_run):
    """--resume auto's warning that it skips a damaged last.pt, the note that a resume without --config takes the
    checkpoint's, the note that a moved run folder is followed: every rank computes them from the same command line
    and files (and the run takes rank 0's choice of checkpoint), and each rank printed them. Rank 0 alone does, as
    the run's console prints (the lines themselves are test_resume_auto_..., test_a_moved_run_... 's)."""
    from fasttrain import distributed
    from fasttrain.distributed import launch_info

    run = tmp_path / "moved"  # a copy of good_run: its config.yaml names good_run's folder
    shutil.copytree(good_run, run)
    (run / "last.pt").write_bytes(b"not a checkpoint")
    monkeypatch.setattr(distributed, "init_distributed", lambda device_type: launch_info())
    monkeypatch.setattr(trainer_module, "Trainer", NoTraining)
    config, prev = str(run / "config.yaml"), str(run / "prev.pt")
    commands = (["--config", config, "--resume", "auto", "--output.dir", str(run)], ["--resume", prev],
                ["--config", config, "--resume", prev])
    said = {}
    for rank in (0, 1):
        rank_of_a_torchrun_job(rank)
        said[rank] = []
        for args in commands:
            assert cli.main([*args, "--device", "cpu"]) == 0
            said[rank].append(capsys.readouterr().err)
    assert said[1] == ["", "", ""]
    skipped, no_config, moved = said[0]
    assert skipped.startswith(f"warning: skipping {run / 'last.pt'}: ") and skipped.count("\n") == 1, skipped
    assert no_config == f"note: no --config given: using the config saved in {prev}\n"
    assert moved.startswith(f"note: {config} names the run folder ") and moved.count("\n") == 1, moved


def test_under_torchrun_a_ctrl_c_outside_training_is_said_once_per_node(rank_of_a_torchrun_job, monkeypatch,
                                                                        capsys, tmp_path):
    """A Ctrl-C outside the training loop (here while the config is read) reaches every worker, forwarded by
    torchrun's agent: each rank printed its `interrupted` line. Each node's local rank 0 says it, as it says an error
    every rank hits, but the others exit 130 at once, without report_error's wait: the agent that forwarded the
    signal waits for every worker, so none is stopped before it prints."""
    def ctrl_c(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "load_config", ctrl_c)
    said = {}
    for rank in (0, 1, 2):  # rank 2: local rank 0 of the second node
        rank_of_a_torchrun_job(rank, nodes=2)
        t0 = time.monotonic()
        assert cli.main(["--config", str(tmp_path / "any.yaml")]) == cli.EXIT_INTERRUPTED
        said[rank] = capsys.readouterr().err
        assert time.monotonic() - t0 < 5
    assert said[0] == said[2] == cli.INTERRUPTED["train"] + "\n" and said[1] == ""


def test_under_torchrun_a_one_process_command_runs_on_rank_0_alone(rank_of_a_torchrun_job, tmp_path, capsys,
                                                                   good_run):
    """eval, export, plot and --dry-run are one process's work: under torchrun each rank did all of it and printed
    the same result, and export's ranks raced to write OUT (the one that came second found it there: an error, exit
    2). Rank 0 runs it; the others exit 0 at once, print nothing and write nothing."""
    out, curves = tmp_path / "weights.pt", tmp_path / "curves.png"
    commands = (["export", str(good_run / "last.pt"), str(out)], ["eval", str(out), "--device", "cpu"],
                ["plot", str(good_run), "--out", str(curves)],
                ["--config", str(REPO / "configs/smoke.yaml"), "--dry-run", "--json", "--device", "cpu"])
    rank_of_a_torchrun_job(1)
    for args in commands:
        assert cli.main(args) == 0
        assert capsys.readouterr() == ("", "") and not out.exists() and not curves.exists()
    rank_of_a_torchrun_job(0)
    for args in commands:
        assert cli.main(args) == 0
        assert capsys.readouterr().out.count("\n") == 1
    assert out.is_file() and curves.is_file()


def test_held_back_delivers_a_signal_sent_inside_the_block_when_the_block_ends():
    """What __main__ wraps torch's import in: a SIGINT sent inside the block interrupts nothing there (the code
    after it runs), and is a KeyboardInterrupt as the block ends; the mask is as before afterwards."""
    ran_on = []
    with disposition(signal.SIGINT, signal.default_int_handler), pytest.raises(KeyboardInterrupt):
        with held_back(signal.SIGINT):
            # to this thread: the mask is a thread's (python -m fasttrain has one thread when it starts; pytest more)
            signal.pthread_kill(threading.get_ident(), signal.SIGINT)
            time.sleep(0.05)
            ran_on.append("after the signal")
    assert ran_on == ["after the signal"]
    assert signal.SIGINT not in signal.pthread_sigmask(signal.SIG_BLOCK, [])


def test_an_inherited_ignored_sigterm_ends_a_run_that_has_not_started_training(cifar_dir, tmp_path):
    """A run started with SIGTERM ignored saves and stops on SIGTERM during training (StopRequest handles it
    whatever was inherited); one before training (while the modules load) had no effect and the run trained to
    its end. It ends the process, as SIGTERM does then to any run: nothing was written yet."""
    run = tmp_path / "run"
    with disposition(signal.SIGTERM, signal.SIG_IGN):
        proc = run_cli_after(CTRL_C_AT_IMPORT, "fasttrain.trainer:SIGTERM", *cli_args(cifar_dir, run))
    assert proc.returncode == -signal.SIGTERM, proc.stderr
    assert proc.stdout == "" and not run.exists()


def test_ctrl_c_inside_torch_save_is_an_interrupt_and_leaves_no_file(tmp_path, monkeypatch, capsys, good_run):
    """Ctrl-C while torch.save writes: its zip writer's close then fails with a RuntimeError ("unexpected
    pos"), which hid the KeyboardInterrupt behind a traceback and exit 1. It is the interrupt (exit 130, one
    line), and neither the target nor a temp file is left."""
    real_save = torch.save

    def interrupted_save(obj, f, *args, **kwargs):
        try:
            real_save(obj, f, *args, **kwargs)
            raise KeyboardInterrupt
        finally:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 9397248 vs 9397144")

    monkeypatch.setattr(torch, "save", interrupted_save)
    out = tmp_path / "weights.pt"
    assert cli.main(["export", str(good_run / "last.pt"), str(out)]) == cli.EXIT_INTERRUPTED
    assert capsys.readouterr().err == "interrupted: OUT was not written\n"
    assert list(tmp_path.iterdir()) == []


SIGNAL_AT_FSYNC = """
import os, signal, sys
signum = signal.Signals[sys.argv.pop(1)]
real_fsync = os.fsync


def fsync_then_signal(fd):  # the temp file is whole: a kill now leaves it behind unless it is cleaned up
    real_fsync(fd)
    os.fsync = real_fsync
    os.kill(os.getpid(), signum)


os.fsync = fsync_then_signal
"""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
@pytest.mark.parametrize("command, said", [("export", "interrupted: OUT was not written"),
                                           ("plot", "interrupted: the image was not written")])
def test_a_stop_signal_while_export_or_plot_writes_leaves_no_temp_file(tmp_path, good_run, command, said, signum):
    """SIGTERM (`timeout`, a scheduler) or SIGHUP (a closed terminal) while export or plot wrote their temp file ended
    the process at once (their default action): the whole temp file (.OUT.*.tmp) stayed beside OUT for good. They are
    interrupts there now: the temp file goes, one line says what was not written, and the exit code is 128 + the
    signal's."""
    run = tmp_path / "run"
    shutil.copytree(good_run, run)
    out = tmp_path / "out" / ("weights.pt" if command == "export" else "curves.png")
    out.parent.mkdir()
    args = [str(run / "last.pt"), str(out)] if command == "export" else [str(run), "--out", str(out)]
    with disposition(signum, signal.SIG_DFL):  # what the child inherits
        proc = run_cli_after(SIGNAL_AT_FSYNC, signum.name, command, *args)
    assert (proc.returncode, proc.stderr) == (128 + signum, said + "\n"), proc.stderr
    assert list(out.parent.iterdir()) == [] and proc.stdout == ""


@contextlib.contextmanager
def ctrl_c_at(moment):
    """A Ctrl-C (SIGINT to this process; Python's handler: a KeyboardInterrupt in the main thread) at the first call
    or return event of this thread's Python code that moment(frame, event) picks, as the N-th of a deterministic
    sweep. Yields where it came ([(function, event)]; empty: never); "escaped" is added when it arrived only after
    the block, not inside it."""
    hit = []

    def profile(frame, event, arg):
        if event in ("call", "return") and not hit and moment(frame, event):
            hit.append((frame.f_code.co_qualname, event))
            sys.setprofile(None)
            os.kill(os.getpid(), signal.SIGINT)

    with disposition(signal.SIGINT, signal.default_int_handler):
        sys.setprofile(profile)
        try:
            yield hit
        finally:
            sys.setprofile(None)
            try:
                time.sleep(0)  # a signal sent in the block's last moment arrives here, not later in the test
            except KeyboardInterrupt:
                hit.append("escaped")


def nth_event_in(files: tuple[str, ...], n: int):
    """moment() for ctrl_c_at: the n-th call/return event (1-based) of code in fasttrain's `files` inside cli.main
    (its own entry and return are __main__'s to take: test_a_ctrl_c_as_cli_main_starts_or_returns_is_one_line), but
    the checksum's recursion over every tensor (hundreds of events alike)."""
    roots = tuple(str(REPO / "fasttrain" / name) for name in files)
    seen = [0]

    def moment(frame, event):
        if frame.f_code.co_filename.startswith(roots) and frame.f_code.co_name not in ("main", "_digest"):
            seen[0] += 1
        return seen[0] == n
    return moment


def test_a_ctrl_c_at_any_moment_of_an_export_leaves_out_whole_or_absent_and_says_which(tmp_path, good_run, capsys):
    """Ctrl-C at each call/return event of an export's own code (the CLI, the export, the atomic write). A Ctrl-C
    as the temp file's writer returned it (before its caller's try block) left the whole temp file beside OUT, for
    good; one after the rename (the directory's fsync, the returns, the printed line) said "OUT was not written" of
    an OUT that was. Each stop: exit 130, OUT absent or complete as the one line says, and nothing else there."""
    files, outcomes, n = ("cli.py", "export.py", "checkpoint.py", "files.py"), set(), 0
    while True:
        n += 1
        out = tmp_path / str(n) / "weights.pt"
        out.parent.mkdir()
        with ctrl_c_at(nth_event_in(files, n)) as hit:
            code = cli.main(["export", str(good_run / "last.pt"), str(out)])
        err = capsys.readouterr().err
        if not hit:  # past the export's last event
            break
        assert code == cli.EXIT_INTERRUPTED and "escaped" not in hit, (n, hit, code, err)
        assert sorted(out.parent.iterdir()) == ([out] if out.exists() else []), (n, hit)
        if out.exists():
            assert err == f"interrupted after {out} was written: the file is complete\n", (n, hit, err)
            assert load_checkpoint(out)["kind"] == "weights"
        else:
            assert err == "interrupted: OUT was not written\n", (n, hit, err)
        outcomes.add(out.exists())
    assert n > 20 and outcomes == {False, True}


def test_a_ctrl_c_while_plot_writes_the_image_keeps_the_earlier_one_whole(tmp_path, good_run, capsys):
    """savefig wrote RUN/curves.png in place: a Ctrl-C while PIL wrote its chunks left it torn (0 bytes, or the
    header), the earlier plot lost. The image goes through a temp file renamed over it, as every run file does."""
    run = tmp_path / "run"
    shutil.copytree(good_run, run)
    assert cli.main(["plot", str(run)]) == 0
    before = folder_snapshot(run)
    capsys.readouterr()

    def inside_the_image_write(frame, event):  # PIL's PNG writer, after the header chunks
        return event == "call" and frame.f_code.co_name == "_save" and frame.f_code.co_filename.endswith(
            os.path.join("PIL", "ImageFile.py"))

    with ctrl_c_at(inside_the_image_write) as hit:
        code = cli.main(["plot", str(run)])
    assert hit == [("_save", "call")] and code == cli.EXIT_INTERRUPTED
    assert folder_snapshot(run) == before
    assert capsys.readouterr().err == "interrupted: the image was not written\n"


def test_a_second_ctrl_c_during_a_checkpoint_says_what_the_folder_holds(cifar_dir, tmp_path, monkeypatch, capsys):
    """A second Ctrl-C while epoch 2's checkpoint is written (a KeyboardInterrupt out of the save: exit 130).
    Epoch 2's metrics row is on disk already (rows are written before their checkpoint), so the message must
    not say that nothing was written after the last checkpoint; what it says instead holds: --resume auto goes
    on from epoch 1's checkpoint and drops that row."""
    from fasttrain import resuming as resuming_module

    run = tmp_path / "run"
    real, calls = resuming_module.write_checkpoint, []

    def interrupted(state, path, previous=None):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(state, path, previous=previous)

    monkeypatch.setattr(resuming_module, "write_checkpoint", interrupted)
    assert cli.main(cli_args(cifar_dir, run, "--train.epochs", "3")) == cli.EXIT_INTERRUPTED
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert load_checkpoint(run / "last.pt")["epoch"] == 1 and metric_epochs(run) == [1, 2]
    assert "nothing was written after" not in err, err
    assert "--resume auto" in err and "dropped" in err, err
    assert cli.main(cli_args(cifar_dir, run, "--train.epochs", "3", "--resume", "auto")) == 0
    assert metric_epochs(run) == [1, 2, 3] and load_checkpoint(run / "last.pt")["epoch"] == 3


# ------------------------------------------------------------------------------------------ security
class _Payload:
    """Unpickling this object calls open(path, "w"): it creates `path`. Code run from data."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


class _ShellPayload(_Payload):
    """The classic one: os.system("touch path"). torch refuses its module outright, in other words."""

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(self.path)}",)


def test_payloads_are_live(tmp_path):
    """The malicious files below really run code when loaded the unsafe way (so the tests can fail)."""
    pickle.loads(pickle.dumps({b"data": _Payload(tmp_path / "a")}))
    torch.save({"format": FORMAT, "model": _Payload(tmp_path / "b")}, tmp_path / "evil.pt")
    torch.load(tmp_path / "evil.pt", weights_only=False)
    torch.save({"format": FORMAT, "model": _ShellPayload(tmp_path / "c")}, tmp_path / "shell.pt")
    torch.load(tmp_path / "shell.pt", weights_only=False)
    assert (tmp_path / "a").exists() and (tmp_path / "b").exists() and (tmp_path / "c").exists()


def test_malicious_cifar_pickle_is_refused(tmp_path, capsys):
    sentinel = tmp_path / "pwned"
    folder = tmp_path / "data" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    evil = pickle.dumps({b"data": np.zeros((1, 3072), np.uint8), b"labels": [0], b"x": _Payload(sentinel)})
    for name in ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch",
                 "batches.meta"):
        (folder / name).write_bytes(evil)
    code = cli.main(["--config", str(REPO / "configs/smoke.yaml"), *TINY, "--data.dir", str(tmp_path / "data"),
                     "--data.download", "false", "--output.dir", str(tmp_path / "run"), "--device", "cpu"])
    assert code == cli.EXIT_ERROR
    err = capsys.readouterr().err
    assert "refused to unpickle the global" in err and "may be malicious" in err
    assert not sentinel.exists()
    assert not (tmp_path / "run").exists()  # nothing was written


def test_malicious_checkpoint_is_refused_by_eval_and_resume(cifar_dir, tmp_path, good_run, capsys):
    sentinel = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    state = load_checkpoint(good_run / "last.pt")  # a real checkpoint, with one poisoned entry
    state["model"]["stem.0.weight"] = _Payload(sentinel)
    torch.save(state, evil)

    assert cli.main(["eval", "--checkpoint", str(evil), "--device", "cpu", "--data.dir", str(cifar_dir)]) == 1
    err = capsys.readouterr().err
    assert "holds pickled Python objects" in err and "refused, nothing in it ran" in err and not sentinel.exists()
    # one line, and never torch's advice to load it again with weights_only=False
    assert len(err.strip().splitlines()) == 1 and "weights_only=False" not in err and "False" not in err

    run = tmp_path / "run"
    assert cli.main(cli_args(cifar_dir, run, "--resume", str(evil))) == cli.EXIT_ERROR
    assert "holds pickled Python objects" in capsys.readouterr().err and not sentinel.exists()
    state["model"]["stem.0.weight"] = _ShellPayload(sentinel)  # torch words this refusal differently
    torch.save(state, evil)
    with pytest.raises(CheckpointError, match="holds pickled Python objects"):
        load_checkpoint(evil)
    assert not sentinel.exists()
    # random bytes fail to unpickle too, but they are a corrupt file, not a crafted one
    noise = tmp_path / "noise.pt"
    noise.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(CheckpointError, match="is corrupt or not a checkpoint") as refused:
        load_checkpoint(noise)
    assert "pickled" not in str(refused.value)

    # as the newest file of a run folder: skipped with a warning, the good one is used
    shutil.copytree(good_run, run, dirs_exist_ok=True)
    shutil.copy(evil, run / "last.pt")
    warnings = []
    assert find_resume_checkpoint(run, warn=warnings.append) == run / "prev.pt"
    assert str(run / "last.pt") in warnings[0] and not sentinel.exists()
