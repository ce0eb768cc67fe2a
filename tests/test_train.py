"""The trainer end to end on real data (FASTTRAIN_DATA): it learns, resumes exactly, and the CLI works."""
import contextlib
import gc
import json
import os
import signal
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch

from fasttrain.checkpoint import CheckpointError, load_checkpoint
from fasttrain.config import ConfigError, load_config
from fasttrain.console import RunConsole
from fasttrain.data import build_data
from fasttrain.model import build_model
from fasttrain.signals import RunInterrupted
from fasttrain.trainer import Trainer

TINY_SETTINGS = {"data.train_subset": "640", "data.test_subset": "200", "model.blocks": "[1,1,1]",
                 "model.base_channels": "8", "model.se_reduction": "4", "train.batch_size": "64",
                 "train.eval_batch_size": "100", "optim.lookahead_k": "3", "train.epochs": "2",
                 "output.progress": "false"}


def tiny_args(**changes) -> list[str]:
    """TINY_SETTINGS with some keys changed (train__epochs="1"), as dotted flags, each key once."""
    settings = {**TINY_SETTINGS, **{k.replace("__", "."): v for k, v in changes.items()}}
    return [arg for key, value in settings.items() for arg in (f"--{key}", value)]


TINY = tiny_args()


def tiny_config(cifar_dir, tmp_path, **changes):
    return load_config("configs/smoke.yaml", tiny_args(**changes) + ["--data.dir", str(cifar_dir),
                                                                     "--output.dir", str(tmp_path)])


def quiet():
    return RunConsole(progress=False, enabled=False)


def recording_console() -> tuple[RunConsole, list[str]]:
    """A quiet console that keeps each line it prints (markup included), and that list."""
    said = []
    console = quiet()
    console.print = lambda *args, **kwargs: said.append(" ".join(map(str, args)))
    return console, said


def untimed_rows(run_dir) -> list[dict]:
    """A run's metrics.jsonl rows without their timing fields: what an exact resume must reproduce."""
    timing = ("epoch_seconds", "images_per_second", "eval_ema_bn_seconds")
    return [{k: v for k, v in json.loads(line).items() if k not in timing}
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def run_cli(*args, env_extra=None, check=True):
    env = dict(os.environ, **(env_extra or {}))
    proc = subprocess.run([sys.executable, "-m", "fasttrain", *args], capture_output=True, text=True, env=env,
                          timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def test_the_training_clock_leaves_out_evaluation_and_checkpoints(cifar_dir, tmp_path, monkeypatch):
    """Issue 5: per-epoch evaluations, checkpoints and logging are off the training clock. The trainer's
    clock is made to jump 1000 s whenever one of them runs: no epoch_seconds, nor train_seconds, may
    hold a jump (an epoch of this tiny run takes well under a second)."""
    import time as real_time
    from types import SimpleNamespace

    import fasttrain.trainer as trainer_module

    jumps = []
    fake_time = SimpleNamespace(**{name: getattr(real_time, name) for name in dir(real_time) if not name.startswith("_")})
    fake_time.perf_counter = lambda: real_time.perf_counter() + 1000.0 * len(jumps)
    monkeypatch.setattr(trainer_module, "time", fake_time)

    def jumping(fn, what):
        def wrapped(*args, **kwargs):
            jumps.append(what)
            return fn(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(trainer_module, "evaluate", jumping(trainer_module.evaluate, "evaluate"))
    monkeypatch.setattr(Trainer, "save_checkpoint", jumping(Trainer.save_checkpoint, "checkpoint"))
    monkeypatch.setattr(trainer_module, "append_metrics", jumping(trainer_module.append_metrics, "log"))
    summary = Trainer(tiny_config(cifar_dir, tmp_path, train__epochs="3"), device="cpu", console=quiet()).fit()
    assert {"evaluate", "checkpoint", "log"} <= set(jumps)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(0 < row["epoch_seconds"] < 100 for row in rows), rows
    assert 0 < summary["train_seconds"] < 100


def test_smoke_config_learns(cifar_dir, tmp_path):
    cfg = load_config("configs/smoke.yaml", ["--data.dir", str(cifar_dir), "--output.dir", str(tmp_path)])
    trainer = Trainer(cfg, device="cpu", console=quiet())
    step_lrs = []  # the learning rate each step trains with
    step_body = trainer._step_body
    trainer._step_body = lambda *batch: (step_lrs.append(trainer.optimizer.param_groups[0]["lr"]), step_body(*batch))[1]
    summary = trainer.fit()
    assert summary["final_test_acc"] > 25.0, summary  # chance is 10%
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    # the epoch's mean loss per batch (cross-entropy of 10 classes starts near ln 10 = 2.3) and its share of
    # correct training images, both over the whole epoch: above chance once it learns, never above 100
    assert all(0.5 < r["train_loss"] < 2.5 for r in rows), rows
    assert 20.0 < rows[-1]["train_acc"] <= 100.0 and rows[-1]["train_acc"] > rows[0]["train_acc"]
    # step t trains with the schedule's lr_at(t), from the first warmup step; a row's lr is its epoch's first
    steps = trainer.steps_per_epoch
    assert step_lrs == pytest.approx([trainer.schedule.lr_at(t) for t in range(4 * steps)], rel=1e-12)
    assert step_lrs[0] > 0 and [r["lr"] for r in rows] == [step_lrs[e * steps] for e in range(4)]
    assert summary["best_test_acc"] == max(r["test_acc"] for r in rows)
    for key in ("epoch", "lr", "train_loss", "train_acc", "test_acc", "epoch_seconds", "images_per_second"):
        assert rows[-1][key] is not None
    saved = json.loads((tmp_path / "summary.json").read_text())
    for key in ("params", "final_test_acc", "best_test_acc", "epochs", "train_seconds", "device", "torch", "git_sha"):
        assert key in saved
    assert saved["params"] == 19_996 and saved["best_test_acc"] >= saved["final_test_acc"]
    assert (saved["eval_weights"], saved["ema_bn"], saved["ema_bn_seconds"]) == ("model", None, None)  # no EMA
    assert load_config(tmp_path / "config.yaml", ["--name", "smoke"]) == cfg  # the resolved config is saved


def test_summary_names_the_code_the_run_started_with(cifar_dir, tmp_path, monkeypatch):
    """git_sha is read when the trainer starts: a commit made while a run trains (the tree's next change) must
    not relabel the run in summary.json. Each read of the fake sha returns a new one."""
    reads = iter(f"sha-{i}" for i in range(100))
    monkeypatch.setattr("fasttrain.trainer.git_sha", lambda: next(reads))
    summary = Trainer(tiny_config(cifar_dir, tmp_path, train__epochs="1"), device="cpu", console=quiet()).fit()
    assert summary["git_sha"] == "sha-0"
    assert json.loads((tmp_path / "summary.json").read_text())["git_sha"] == "sha-0"


def test_smoke_config_learns_through_the_dali_loader(cifar_dir, tmp_path, one_torch_thread):
    """data.loader=dali end to end (DALI CPU-only here): same recipe, clearly above chance."""
    cfg = load_config("configs/smoke.yaml", ["--data.dir", str(cifar_dir), "--output.dir", str(tmp_path),
                                             "--data.loader", "dali"])
    trainer = Trainer(cfg, device="cpu", console=quiet())
    assert "DaliLoader" in trainer.data.source
    assert trainer.fit()["final_test_acc"] > 25.0  # chance is 10%


@pytest.mark.parametrize("extra", [{}, {"train__ema_decay": "0.9", "train__ema_warmup_steps": "15"},
                                 {"model__stem_init": "whiten", "model__stem_frozen": "true"},
                                 {"train__eval_every": "2"}],
                         ids=["no-ema", "ema", "whitened-frozen-stem", "eval-every-2"])
def test_resume_is_exact(cifar_dir, tmp_path, extra):
    """2 epochs in one go == 1 epoch, stop, resume from last.pt, 1 more epoch (CPU, fixed seed).

    Lookahead k=3 with 10 steps per epoch puts the checkpoint mid-period, so the slow weights and
    the step count must travel in the checkpoint too; with EMA (warmup 15 steps: mid-ramp at the
    checkpoint) the EMA weights and buffers must too, and the evaluated accuracy is the EMA's; with a
    whitened, frozen stem the resumed run takes the filters from the checkpoint, unchanged. The metrics
    rows are the uninterrupted run's too (timing aside): with eval_every 2 the stop after epoch 1 must
    not add an evaluation there, nor write a summary.json for a run that has not finished.
    """
    torch.manual_seed(123)  # the global RNG must not leak into the run
    straight = Trainer(tiny_config(cifar_dir, tmp_path / "a", **extra), device="cpu", console=quiet())
    full = straight.fit()
    half = Trainer(tiny_config(cifar_dir, tmp_path / "b", **extra), device="cpu", console=quiet())
    half.fit(stop_after_epochs=1)
    assert not (tmp_path / "b" / "summary.json").exists()
    saved = load_checkpoint(tmp_path / "b" / "last.pt")
    assert saved["epoch"] == 1 and (saved["ema"] is not None) == ("train__ema_decay" in extra)
    torch.manual_seed(999)
    resumed = Trainer(tiny_config(cifar_dir, tmp_path / "b", **extra), device="cpu", console=quiet(),
                      resume=tmp_path / "b" / "last.pt")
    assert resumed.start_epoch == 1
    summary = resumed.fit()
    # the clocks and the rate cover both processes: the first's come with its checkpoint
    timed = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert summary["images_per_second"] == pytest.approx(sum(r["images_per_second"] for r in timed) / 2)
    assert summary["wall_seconds"] > saved["wall_seconds"] > 0
    # the stem's whitening is the first process's work alone: a resumed run takes its filters from the checkpoint
    whitened = "model__stem_init" in extra
    assert summary["stem_init_seconds"] is None and (full["stem_init_seconds"] is not None) == whitened
    assert summary["train_seconds"] > saved["train_seconds"] > 0
    pairs = [(straight.model.state_dict(), resumed.model.state_dict())]
    if "train__ema_decay" in extra:
        pairs.append((straight.ema.state_dict(), resumed.ema.state_dict()))
        assert not torch.equal(straight.ema.state_dict()["fc.weight"], straight.model.state_dict()["fc.weight"])
        assert straight.eval_net is straight.ema.module and full["eval_weights"] == "ema"
    for a, b in pairs:
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), k
    assert summary["final_test_acc"] == full["final_test_acc"] and summary["best_test_acc"] == full["best_test_acc"]
    rows = untimed_rows(tmp_path / "b")
    assert [r["epoch"] for r in rows] == [1, 2] and rows == untimed_rows(tmp_path / "a")
    # evaluated: every eval_every-th epoch, counted from 1, and always the last
    assert [r["test_acc"] is not None for r in rows] == [extra.get("train__eval_every") != "2", True]


def assert_identical(a, b, where: str) -> None:
    """Nested dicts, lists and tensors equal bit for bit (tensors: dtype and shape too)."""
    assert type(a) is type(b), where
    if isinstance(a, torch.Tensor):
        assert (a.dtype, a.shape) == (b.dtype, b.shape), where
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for k in a:
            assert_identical(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def stop_mid_epoch(trainer: Trainer, after_steps: int) -> tuple[RunInterrupted, int]:
    """Run `trainer` until SIGINT, sent to this process during its `after_steps`-th step (counted across
    epochs), has stopped it there: the mid-epoch checkpoint of a preempted run. The stop, and the steps run."""
    inner, steps = trainer._train_step, []

    def step(images, labels):
        out = inner(images, labels)
        steps.append(1)
        if len(steps) == after_steps:
            os.kill(os.getpid(), signal.SIGINT)  # the handler only sets the flag: the step finishes
        return out

    trainer._train_step = step
    with pytest.raises(RunInterrupted) as stop:
        trainer.fit()
    return stop.value, len(steps)


@pytest.mark.parametrize("extra", [
    {"model__dropout": "0.2", "optim__name": "adamw", "optim__lr": "0.01", "optim__weight_decay": "0.05",
     "optim__label_smoothing": "0.1", "optim__clip": "norm", "optim__decay_norm_and_bias": "false"},
    {"model__dropout": "0.2", "data__loader": "dali", "data__val_size": "500", "data__cutout": "8",
     "data__flip_mode": "alternating"},
    {"model__dropout": "0.2", "train__ema_decay": "0.9", "train__ema_bn": "recompute", "train__ema_bn_batches": "2",
     "train__eval_every": "2"},
], ids=["dropout-adamw-label-smoothing", "dali-val-split-cutout", "ema-bn-recompute"])
def test_resume_is_exact_at_an_epoch_boundary_and_mid_epoch(cifar_dir, tmp_path, extra, one_torch_thread):
    """The settings with state or randomness of their own, stopped after epoch 1 (stop_after_epochs) and
    inside epoch 2 (SIGINT after its 3rd step) and resumed: each ends as the run in one go did, bit for bit.
    Dropout draws from the CPU generator at every step, so a mid-epoch resume must continue its stream;
    AdamW keeps moments and a step count, in two parameter groups that must pair up again; the DALI
    loader skips the epoch's trained batches through its pipeline; the validation split is scored in
    every row; train.ema_bn recompute re-estimates the EMA's statistics for each save, the mid-epoch one
    too, where the run in one go does not (eval_every 2: only at its end). Compared: what last.pt holds
    (weights, optimizer, schedule, EMA, RNG), the metrics rows (timing aside) and the summary's accuracies."""
    def outcome(run_dir, summary):
        saved = load_checkpoint(run_dir / "last.pt")
        state = {k: saved[k] for k in ("model", "optimizer", "scheduler", "ema", "rng", "epoch", "step_in_epoch")}
        accuracies = {k: summary[k] for k in ("final_test_acc", "best_test_acc", "final_val_acc")}
        return state, untimed_rows(run_dir), accuracies

    straight = Trainer(tiny_config(cifar_dir, tmp_path / "a", **extra), device="cpu", console=quiet())
    expected = outcome(tmp_path / "a", straight.fit())
    assert (expected[2]["final_val_acc"] is not None) == ("data__val_size" in extra)
    stops = {"boundary": (lambda t: t.fit(stop_after_epochs=1), (1, 0)),
             "mid-epoch": (lambda t: stop_mid_epoch(t, 13), (1, 3))}  # 10 steps per epoch
    for run, (stop, position) in stops.items():
        stop(Trainer(tiny_config(cifar_dir, tmp_path / run, **extra), device="cpu", console=quiet()))
        at = load_checkpoint(tmp_path / run / "last.pt")
        assert (at["epoch"], at["step_in_epoch"]) == position
        torch.manual_seed(999)  # the global RNG must come from the checkpoint
        resumed = Trainer(tiny_config(cifar_dir, tmp_path / run, **extra), device="cpu", console=quiet(),
                          resume=tmp_path / run / "last.pt")
        got = outcome(tmp_path / run, resumed.fit())
        assert_identical(got[0], expected[0], run)
        assert got[1:] == expected[1:], run


def test_the_compile_warmup_leaves_the_run_as_it_found_it(cifar_dir, tmp_path):
    """warmup() (train.compile, CUDA graphs, cuDNN autotuning) trains throwaway steps, which move the weights,
    the optimizer's state, the schedule, the EMA, an fp16 loss scaler and, through dropout, the global RNG:
    every one is put back, so the run trains as it would have without the warmup."""
    import copy

    cfg = tiny_config(cifar_dir, tmp_path, model__dropout="0.3", train__ema_decay="0.9")
    trainer = Trainer(cfg, device="cpu", console=quiet())
    # fp16's GradScaler on this fp32 run (fp16 convolutions are slow on a CPU): its scale and step count
    trainer.scaler = torch.amp.GradScaler("cpu")
    trainer.scaler.scale(torch.ones((), requires_grad=True))
    trainer.scaler.update(new_scale=512.0)

    def state():
        return copy.deepcopy({"model": trainer.model.state_dict(), "ema": trainer.ema.state_dict(),
                              "optimizer": trainer.optimizer.state_dict(), "schedule": trainer.schedule.state_dict(),
                              "scaler": trainer.scaler.state_dict(), "rng": torch.get_rng_state()})

    before = state()
    trainer.warmup()
    after = state()
    assert trainer.schedule.step_count == 0 and after["optimizer"]["state"] == {}  # no step kept
    for part in ("model", "ema"):
        assert after[part].keys() == before[part].keys()
        for k, v in before[part].items():
            assert torch.equal(after[part][k], v), (part, k)
    assert (after["schedule"], after["scaler"]) == (before["schedule"], before["scaler"])
    assert after["optimizer"]["param_groups"] == before["optimizer"]["param_groups"]
    assert torch.equal(after["rng"], before["rng"])


def test_best_test_acc_is_the_best_epoch_not_the_last(cifar_dir, tmp_path, monkeypatch):
    import fasttrain.trainer as trainer_module

    scores = iter([50.0, 40.0])  # the epochs' test accuracies: the first is the best
    monkeypatch.setattr(trainer_module, "evaluate", lambda *args, **kwargs: next(scores))
    summary = Trainer(tiny_config(cifar_dir, tmp_path), device="cpu", console=quiet()).fit()
    assert (summary["best_test_acc"], summary["final_test_acc"]) == (50.0, 40.0)
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert (saved["best_test_acc"], saved["final_test_acc"]) == (50.0, 40.0)


def test_eval_every_evaluates_every_nth_epoch_and_the_last(cifar_dir, tmp_path):
    Trainer(tiny_config(cifar_dir, tmp_path, train__epochs="5", train__eval_every="2"), device="cpu",
            console=quiet()).fit()
    rows = untimed_rows(tmp_path)
    assert [r["epoch"] for r in rows if r["test_acc"] is not None] == [2, 4, 5]


def test_refuses_to_overwrite_a_run(cifar_dir, tmp_path):
    Trainer(tiny_config(cifar_dir, tmp_path, train__epochs="1"), device="cpu", console=quiet()).fit()
    before = (tmp_path / "last.pt").read_bytes()
    with pytest.raises(ConfigError, match="already holds a run.*--resume.*--overwrite"):
        Trainer(tiny_config(cifar_dir, tmp_path, train__epochs="1"), device="cpu", console=quiet())
    assert (tmp_path / "last.pt").read_bytes() == before


def test_resume_with_another_architecture_lists_keys(cifar_dir, tmp_path):
    Trainer(tiny_config(cifar_dir, tmp_path, train__epochs="1"), device="cpu", console=quiet()).fit()
    other = tiny_config(cifar_dir, tmp_path, model__blocks="[2,1,1]", model__base_channels="16")
    with pytest.raises(CheckpointError, match=r"another architecture[\s\S]*stages\.0\.1\.conv1\.weight"):
        Trainer(other, device="cpu", console=quiet(), resume=tmp_path / "last.pt")


def test_resume_with_another_optimizer_grouping_is_a_clear_error(cifar_dir, tmp_path):
    Trainer(tiny_config(cifar_dir, tmp_path, train__epochs="1"), device="cpu", console=quiet()).fit()
    other = tiny_config(cifar_dir, tmp_path, optim__decay_norm_and_bias="false")
    with pytest.raises(CheckpointError, match=r"optimizer state[\s\S]*decay_norm_and_bias True[\s\S]*config\.yaml"):
        Trainer(other, device="cpu", console=quiet(), resume=tmp_path / "last.pt")


@pytest.mark.parametrize("saved, resumed, reason", [
    ("torch", "fused", "slow weights apart from the per-parameter state: it was saved by optim.impl torch"),
    ("fused", "torch", "slow weights per parameter: it was saved by optim.impl fused")])
def test_resume_with_another_optimizer_implementation_is_a_clear_error(cifar_dir, tmp_path, saved, resumed, reason):
    """The two implementations keep Lookahead's slow weights in different layouts: each refuses the
    other's by name, instead of starting its slow weights afresh unnoticed (torch -> fused) or reading the
    state as saved without Lookahead (fused -> torch)."""
    Trainer(tiny_config(cifar_dir, tmp_path, optim__impl=saved), device="cpu", console=quiet()).save_checkpoint(1)
    other = tiny_config(cifar_dir, tmp_path, optim__impl=resumed)
    with pytest.raises(CheckpointError, match=r"optimizer state this config's optimizer cannot take") as refused:
        Trainer(other, device="cpu", console=quiet(), resume=tmp_path / "last.pt")
    assert reason in str(refused.value) and f"impl {saved}, lookahead_k 3" in str(refused.value)


@pytest.mark.parametrize("impl", ["torch", "fused"])
def test_a_resume_trains_with_the_configs_optimizer_settings_not_the_saved_ones(cifar_dir, tmp_path, impl):
    """torch's load_state_dict brings back every saved param-group setting: without care a resume under
    another momentum, weight decay or Nesterov would train on with the old ones while its warning says
    "under this config's values". The learning rate stays the schedule's."""
    Trainer(tiny_config(cifar_dir, tmp_path, optim__impl=impl), device="cpu", console=quiet()).save_checkpoint(1)
    changed = tiny_config(cifar_dir, tmp_path, optim__impl=impl, optim__momentum="0.5", optim__weight_decay="0.01",
                          optim__nesterov="false", optim__lookahead_alpha="0.25")
    resumed = Trainer(changed, device="cpu", console=quiet(), resume=tmp_path / "last.pt")
    group = resumed.optimizer.param_groups[0]
    assert (group["momentum"], group["weight_decay"], group["nesterov"]) == (0.5, 0.01, False)
    alpha = group["lookahead_alpha"] if impl == "fused" else resumed.optimizer.alpha
    assert alpha == 0.25
    assert float(group["lr"]) == pytest.approx(resumed.schedule.lr_at(resumed.schedule.step_count))


@pytest.mark.parametrize("saved, resumed", [("sgd", "adamw"), ("adamw", "sgd")])
def test_resume_with_another_optimizer_is_refused_by_name(cifar_dir, tmp_path, saved, resumed):
    """SGD's and AdamW's states share nothing: AdamW -> SGD would quietly drop the moments (torch's SGD
    takes the state and starts its momentum at zero), so both directions are refused, naming both."""
    Trainer(tiny_config(cifar_dir, tmp_path, optim__name=saved), device="cpu", console=quiet()).save_checkpoint(1)
    before = (tmp_path / "last.pt").read_bytes()
    with pytest.raises(CheckpointError, match=f"optim.name {saved}, this config has {resumed}.*config.yaml"):
        Trainer(tiny_config(cifar_dir, tmp_path, optim__name=resumed), device="cpu", console=quiet(),
                resume=tmp_path / "last.pt")
    assert (tmp_path / "last.pt").read_bytes() == before


@pytest.mark.parametrize("interpret", [True, False])
def test_the_cpu_note_on_the_triton_kernels_says_which_code_runs(cifar_dir, tmp_path, monkeypatch, interpret):
    """optim.impl fused on the CPU: under TRITON_INTERPRET=1 the kernel runs in the interpreter (slow), not
    the PyTorch reference the note used to name whatever ran."""
    import fasttrain.kernels._utils as kernel_utils

    monkeypatch.setattr(kernel_utils, "INTERPRET", interpret)
    console, said = recording_console()
    trainer = Trainer(tiny_config(cifar_dir, tmp_path, optim__impl="fused", train__epochs="1"), device="cpu",
                      console=console)
    trainer._announce()
    (note,) = [line for line in said if line.startswith("optim.impl fused: ")]
    assert ("Triton's interpreter" in note) is interpret and ("PyTorch reference runs" in note) is not interpret


@pytest.mark.parametrize("impl", ["torch", "fused"])
def test_lookahead_switched_on_at_a_resume_starts_from_the_resumed_weights(cifar_dir, tmp_path, impl):
    """lookahead_k 0 -> 3, both implementations alike: the slow weights are the resumed weights (not the
    new run's initialisation), momentum continues, and a warning says so; 3 -> 0 says the slow weights go."""
    console, said = recording_console()
    Trainer(tiny_config(cifar_dir, tmp_path, optim__impl=impl, optim__lookahead_k="0", train__epochs="1"),
            device="cpu", console=quiet()).fit()
    saved = load_checkpoint(tmp_path / "last.pt")
    resumed = Trainer(tiny_config(cifar_dir, tmp_path, optim__impl=impl, optim__lookahead_k="3", train__epochs="2"),
                      device="cpu", console=console, resume=tmp_path / "last.pt")
    params = [p for g in resumed.optimizer.param_groups for p in g["params"]]
    slow = (resumed.optimizer.slow if impl == "torch"
            else [resumed.optimizer.state[p]["slow_param"] for p in params])
    names = [n for n, p in resumed.model.named_parameters()]
    assert len(slow) == len(names) > 0
    for i, (name, s, p) in enumerate(zip(names, slow, params)):
        torch.testing.assert_close(s, saved["model"][name], rtol=0, atol=0)
        torch.testing.assert_close(resumed.optimizer.state[p]["momentum_buffer"],
                                   saved["optimizer"]["state"][i]["momentum_buffer"], rtol=0, atol=0)
    assert any("trained without Lookahead: Lookahead starts here" in line for line in said), said
    resumed.fit()
    said.clear()
    Trainer(tiny_config(cifar_dir, tmp_path, optim__impl=impl, optim__lookahead_k="0", train__epochs="3"),
            device="cpu", console=console, resume=tmp_path / "last.pt")
    assert any("trained with Lookahead: its slow weights are dropped" in line for line in said), said


def test_cli_dry_run_json(cifar_dir):
    proc = run_cli("--config", "configs/seed.yaml", "--dry-run", "--json", "--data.dir", str(cifar_dir))
    report = json.loads(proc.stdout)
    assert report["params"] == 4_697_742
    assert report["config"]["model"]["blocks"] == [4, 4, 3]
    assert "cifar-10-batches" in report["data"]
    text = run_cli("--config", "configs/seed.yaml", "--dry-run").stdout
    assert "4,697,742" in text and "lookahead_k: 5" in text


def test_cli_train_then_eval(cifar_dir, tmp_path):
    run = tmp_path / "run"
    proc = run_cli("--config", "configs/smoke.yaml", *tiny_args(train__epochs="1"), "--output.dir", str(run),
                   "--device", "cpu", env_extra={"FASTTRAIN_DATA": str(cifar_dir)})
    assert "epoch   1/1" in proc.stdout and "final_test_acc" in proc.stdout
    summary = json.loads((run / "summary.json").read_text())
    out = run_cli("eval", "--checkpoint", str(run / "last.pt"), "--json", "--device", "cpu",
                  "--data.dir", str(cifar_dir))
    result = json.loads(out.stdout)
    assert result["test_acc"] == pytest.approx(summary["final_test_acc"])
    assert result["epoch"] == 1 and result["params"] == summary["params"]
    assert result["weights"] == "model" and result["tta"] == "none"
    cfg = load_config(run / "config.yaml", ["--data.dir", str(cifar_dir)])
    assert result["test_images"] == cfg.data.test_subset  # the images the run scored, and it says so
    tta = json.loads(run_cli("eval", "--checkpoint", str(run / "last.pt"), "--json", "--tta", "--device", "cpu",
                             "--data.dir", str(cifar_dir)).stdout)
    # flip TTA recomputed here: the mean of the logits of each image and its mirror, argmax
    model = build_model(cfg.model)
    model.load_state_dict(load_checkpoint(run / "last.pt")["model"])
    model.eval()
    data = build_data(cfg.data, batch_size=cfg.train.batch_size, eval_batch_size=cfg.train.eval_batch_size,
                      device="cpu", dtype=torch.float32, channels_last=False, seed=cfg.train.seed)
    with torch.no_grad():
        hits = sum(int(((model(x) + model(x.flip(3))).argmax(1) == y).sum()) for x, y in data.test)
    assert tta["tta"] == "flip" and tta["test_acc"] == pytest.approx(100.0 * hits / data.test_images)
    shift = json.loads(run_cli("eval", "--checkpoint", str(run / "last.pt"), "--json", "--tta", "flip_shift",
                               "--device", "cpu", "--data.dir", str(cifar_dir)).stdout)
    every = json.loads(run_cli("eval", "--checkpoint", str(run / "last.pt"), "--json", "--tta", "all",
                               "--device", "cpu", "--data.dir", str(cifar_dir)).stdout)
    assert shift["tta"] == "flip_shift" and every["test_acc_by_tta"] == pytest.approx(
        {"none": result["test_acc"], "flip": tta["test_acc"], "flip_shift": shift["test_acc"]})
    # flip_shift recomputed here too, its translated views built by hand: the image moved by (1, 1) and
    # (-1, -1) pixels, the uncovered row and column black (-mean/std normalized), each also mirrored
    black = (-torch.tensor(cfg.data.mean) / torch.tensor(cfg.data.std)).reshape(1, 3, 1, 1)
    hits = 0
    with torch.no_grad():
        for x, y in data.test:
            down_right, up_left = black.expand_as(x).clone(), black.expand_as(x).clone()
            down_right[:, :, 1:, 1:] = x[:, :, :-1, :-1]
            up_left[:, :, :-1, :-1] = x[:, :, 1:, 1:]
            logits = 0.25 * (model(x) + model(x.flip(3))) + 0.125 * sum(
                model(v) + model(v.flip(3)) for v in (down_right, up_left))
            hits += int((logits.argmax(1) == y).sum())
    assert abs(shift["test_acc"] - 100.0 * hits / data.test_images) <= 100.0 / data.test_images  # a tie at most
    whole = run_cli("eval", "--checkpoint", str(run / "last.pt"), "--device", "cpu", "--data.dir", str(cifar_dir),
                    "--data.test_subset", "0").stdout  # the whole test set, whatever the run scored
    assert " on 10,000 test images, model weights" in whole


@pytest.mark.parametrize("args, message", [
    (["--optim.lr", "-1"], "optim.lr = -1.0 is out of range"),
    (["--optim.lrr", "1"], "unknown key 'optim.lrr'"),
    (["--train.epochs", "many"], "train.epochs: expected int"),
    (["--model.base_channels", "128"], "over the budget"),
])
def test_cli_bad_input_is_one_clear_error(args, message, tmp_path):
    proc = run_cli("--config", "configs/seed.yaml", "--dry-run", *args, check=False)
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_cli_missing_data_is_a_clear_error(tmp_path):
    proc = run_cli("--config", "configs/smoke.yaml", "--data.dir", str(tmp_path / "empty"), "--data.download",
                   "false", "--output.dir", str(tmp_path / "run"), check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "cifar-10-batches-bin" in proc.stderr and "FASTTRAIN_DATA" in proc.stderr


def test_tensorboard_event_files_beside_metrics(cifar_dir, tmp_path):
    Trainer(tiny_config(cifar_dir, tmp_path, train__epochs="1", output__tensorboard="true"), device="cpu",
            console=quiet()).fit()
    events = list(tmp_path.glob("events.out.tfevents.*"))
    assert len(events) == 1 and events[0].stat().st_size > 0
    # --overwrite replaces the run: TensorBoard shows the new run's curve alone, as metrics.jsonl does
    Trainer(tiny_config(cifar_dir, tmp_path, train__epochs="1", output__tensorboard="true", optim__lr="0.01"),
            device="cpu", console=quiet(), overwrite=True).fit()
    from test_plot import _scalars

    assert len(list(tmp_path.glob("events.out.tfevents.*"))) == 1
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert _scalars(tmp_path, "lr") == [(1, pytest.approx(rows[0]["lr"]))]
    assert len(rows) == 1


def open_files_and_threads() -> tuple[list[str], int]:
    """What this process holds: its open file descriptors (what each points to) and its thread count."""
    targets = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the listing's own descriptor, closed by now
            targets.append(os.readlink(f"/proc/self/fd/{fd}"))
    return sorted(targets), len(os.listdir("/proc/self/task"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="reads /proc (Linux)")
@pytest.mark.parametrize("loader", ["torch", "dali"])
def test_a_finished_run_leaves_no_trainer_file_or_thread_behind(cifar_dir, tmp_path, loader, one_torch_thread):
    """benchmarks/time_to_accuracy.py and recipe_ablation.py train run after run in one process: once
    collected (their release_memory), a finished run must hold nothing (its Trainer, DALI's pipeline
    threads, the TensorBoard writer's thread and file, the run folder's lock), or a long sweep piles them
    up. Compared after a first run, which sets up what a process keeps for good (imports, thread pools)."""
    def run(name: str) -> weakref.ref:
        cfg = tiny_config(cifar_dir, tmp_path / name, train__epochs="1", data__loader=loader,
                          output__tensorboard="true")
        trainer = Trainer(cfg, device="cpu", console=quiet())
        trainer.fit()
        return weakref.ref(trainer)

    run("first")
    gc.collect()
    before = open_files_and_threads()
    trainer = run("second")
    gc.collect()
    assert trainer() is None
    assert open_files_and_threads() == before


@pytest.mark.parametrize("compiled, base_channels", [(True, 4), (True, 8), (False, 4)])
def test_tiny_nets_stay_nchw_on_the_cpu_compiled_or_not(compiled, base_channels):
    """Under 8 channels, channels_last hits a oneDNN bug on the CPU (segfaults, hangs): the trainer's
    switch goes off, and so does inductor's own choice of channels_last for convolutions when compiling."""
    import torch._inductor.config as inductor_config

    from fasttrain.runtime import use_channels_last

    cfg = load_config("configs/smoke.yaml", ["--model.base_channels", str(base_channels),
                                             "--train.compile", str(compiled).lower(), "--train.channels_last", "true"])
    warned = []
    # the config module's own patch, which restores the value afterwards: pytest's monkeypatch restores it
    # with a delattr that torch 2.11's config module turns into "no such attribute" for later tests
    with inductor_config.patch(layout_optimization=True):
        assert use_channels_last(cfg, torch.device("cpu"), warned.append) is (base_channels >= 8)
        assert inductor_config.layout_optimization is not (compiled and base_channels < 8)
    assert bool(warned) is (base_channels < 8)


def test_the_device_is_the_one_asked_for_or_a_clear_refusal(monkeypatch):
    """--device: a typo or a missing GPU is one ConfigError naming the fix (the Trainer is also called
    from Python, past the CLI's choices); auto takes the GPU where there is one; under torchrun each rank
    its own local GPU (torch.cuda.is_available patched: the answers of a GPU machine, without one)."""
    from fasttrain.distributed import DistInfo
    from fasttrain.runtime import resolve_device

    with pytest.raises(ConfigError, match="--device 'gpu': use auto, cuda or cpu"):
        resolve_device("gpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="no CUDA GPU is visible to PyTorch"):
        resolve_device("cuda")
    assert resolve_device("auto") == resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == resolve_device("cuda") == torch.device("cuda", 0)
    assert resolve_device("cuda", DistInfo(rank=5, world_size=8, local_rank=1)) == torch.device("cuda", 1)
    assert resolve_device("cpu", DistInfo(rank=5, world_size=8, local_rank=1)) == torch.device("cpu")


@pytest.mark.parametrize("precision, computes_in", [("bf16", torch.bfloat16), ("fp16", torch.float16),
                                                    ("fp32", torch.float32), ("auto", torch.float32)])
def test_each_precision_computes_in_its_dtype(precision, computes_in):
    """What a matmul under the precision's autocast gives (auto on the CPU: fp32; on a GPU: bf16), and the
    cast cache off on request (CUDA-graph capture: the cache must not outlive it)."""
    from fasttrain.runtime import Precision

    cpu = torch.device("cpu")
    p = Precision.resolve(precision, cpu)
    x = torch.ones(4, 4)
    with p.autocast(cpu):
        assert (x @ x).dtype == computes_in
    if p.autocast_dtype is not None:
        with p.autocast(cpu, cache=False):
            assert not torch.is_autocast_cache_enabled()
        with p.autocast(cpu):
            assert torch.is_autocast_cache_enabled()
    assert Precision.resolve("auto", torch.device("cuda")).name == "bf16"


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_a_training_step_smooths_the_labels_and_clips_the_gradients_as_they_are(cifar_dir, tmp_path, precision):
    """One step: its loss is cross-entropy with optim.label_smoothing, and optim.clip value bounds the
    gradients the optimizer steps with. fp16 clips them after unscaling: clipped while still multiplied by
    the loss scale (65536), every gradient would end up below clip_value / 65536 and the step would be
    nothing. And fp16 updates its scale after each step: one that overflowed halves it (else every later
    step would overflow and be skipped too)."""
    import torch.nn.functional as F

    cfg = tiny_config(cifar_dir, tmp_path, optim__label_smoothing="0.3", optim__clip_value="0.001",
                      train__precision=precision)
    trainer = Trainer(cfg, device="cpu", console=quiet())
    images, labels = next(iter(trainer.data.train))
    loss, logits = trainer._step_body(images, labels)
    assert loss == pytest.approx(F.cross_entropy(logits.float(), labels, label_smoothing=0.3).item(), rel=1e-6)
    assert loss != pytest.approx(F.cross_entropy(logits.float(), labels).item(), rel=1e-3)
    largest = max(p.grad.abs().max().item() for p in trainer.trainable)
    assert largest == pytest.approx(0.001)  # clipped at the value: many raw gradients are larger
    if precision == "fp16":  # an overflowing step is skipped, and the scale backs off for the next one
        trainer.scaler.update(new_scale=2.0 ** 100)  # the fp16 gradients overflow under this scale
        before = [p.detach().clone() for p in trainer.trainable]
        trainer._step_body(images, labels)
        assert trainer.scaler.get_scale() == 2.0 ** 99
        assert all(torch.equal(a, p) for a, p in zip(before, trainer.trainable))


def test_git_sha_marks_uncommitted_changes_and_is_unknown_outside_a_checkout(monkeypatch):
    """The provenance in summary.json: a run of edited code must not pass for the commit's."""
    from types import SimpleNamespace

    import fasttrain.runtime as runtime

    answers = {}

    def git(args, **kwargs):
        if answers.get("missing"):
            raise FileNotFoundError(2, "No such file or directory", "git")
        return {"ls-files": SimpleNamespace(returncode=answers["tracked_rc"], stdout=""),
                "rev-parse": SimpleNamespace(returncode=answers["head_rc"], stdout="0123abc\n"),
                "status": SimpleNamespace(returncode=0, stdout=answers["status"])}[args[1]]

    monkeypatch.setattr(runtime.subprocess, "run", git)
    answers.update(tracked_rc=0, head_rc=0, status="")
    assert runtime.git_sha() == "0123abc"
    answers.update(status=" M fasttrain/trainer.py\n")
    assert runtime.git_sha() == "0123abc-dirty"
    answers.update(head_rc=128)  # not a git checkout (an installed copy)
    assert runtime.git_sha() == "unknown"
    answers.update(missing=True)  # no git at all
    assert runtime.git_sha() == "unknown"


def test_git_sha_of_a_copy_inside_another_repository_is_unknown(tmp_path):
    """An installed copy inside a user's own repository (a .venv in a project): git finds that repository
    from the package's folder, whose commit (and edits) are not fasttrain's; a real git, a real copy."""
    import shutil

    project = tmp_path / "project"
    site = project / ".venv" / "site"
    shutil.copytree(Path(__file__).resolve().parents[1] / "fasttrain", site / "fasttrain")
    (project / "notes.txt").write_text("the user's own file\n")
    env = dict(os.environ, GIT_AUTHOR_NAME="u", GIT_AUTHOR_EMAIL="u@x", GIT_COMMITTER_NAME="u",
               GIT_COMMITTER_EMAIL="u@x")
    for args in (["init", "-q"], ["add", "notes.txt"], ["commit", "-q", "-m", "the user's commit"]):
        subprocess.run(["git", *args], cwd=project, env=env, check=True, capture_output=True)
    read = subprocess.run([sys.executable, "-c", "import fasttrain.runtime as r; print(r.__file__, r.git_sha())"],
                          cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(site)), capture_output=True, text=True,
                          timeout=120)
    assert read.returncode == 0, read.stderr
    where, sha = read.stdout.split()
    assert where.startswith(str(site)) and sha == "unknown", read.stdout


def test_the_fused_optimizers_pytorch_path_trains_like_its_kernel(cifar_dir, tmp_path, monkeypatch):
    """What a CPU user runs with optim.impl fused: the optimizer's PyTorch path (the tests' interpreter
    otherwise takes the Triton kernel), through the whole trainer, gives the kernel's weights (whose
    match with torch SGD + Lookahead step by step is tests/test_kernels_optim.py's). Not compared with
    optim.impl torch here: in this tiny net an fp32 rounding difference in one step grows ~1000x in the
    next (seen: 3e-8 -> 3e-5), which no tolerance separates from a wrong step after 10 steps."""
    import fasttrain.kernels.lookahead_sgd as fused_module

    settings = dict(train__epochs="1", optim__impl="fused", optim__nesterov="true", optim__lookahead_k="3",
                    optim__clip="value", optim__clip_value="0.5")
    kernel = Trainer(tiny_config(cifar_dir, tmp_path / "kernel", **settings), device="cpu", console=quiet())
    kernel.fit()
    took = []
    monkeypatch.setattr(fused_module, "use_triton", lambda t: took.append(t.device.type) or False)
    reference = Trainer(tiny_config(cifar_dir, tmp_path / "reference", **settings), device="cpu", console=quiet())
    reference.fit()
    assert len(took) >= reference.steps_per_epoch and set(took) == {"cpu"}  # every step took the PyTorch path
    for (name, a), b in zip(kernel.model.state_dict().items(), reference.model.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)
    changed = [not torch.equal(a, b) for a, b in zip(kernel.model.state_dict().values(),
                                                       Trainer(tiny_config(cifar_dir, tmp_path / "init", **settings),
                                                               device="cpu", console=quiet()).model.state_dict().values())]
    assert sum(changed) > len(changed) // 2  # trained: most tensors moved from their initial values


# ------------------------------------------------------------------------------------------ the console
def test_durations_print_as_minutes_or_hours_and_an_unknown_one_as_a_question_mark():
    from fasttrain.console import format_seconds

    assert format_seconds(0) == "0:00" and format_seconds(59.6) == "1:00"  # whole seconds, rounded
    assert format_seconds(3599.4) == "59:59"
    assert format_seconds(3725) == "1:02:05" and format_seconds(36000) == "10:00:00"
    assert format_seconds(float("inf")) == "?" and format_seconds(float("nan")) == "?"


def test_the_epoch_line_and_the_summary_in_a_log_file_name_each_figure(capsys):
    """Without a terminal (stdout captured here, as in a log file) every message is one line, never
    wrapped at 80 columns; each accuracy sits under its own name."""
    console = RunConsole(progress=True, enabled=True)
    row = {"epoch": 3, "lr": 0.1234567, "train_loss": 1.5, "train_acc": 50.0, "val_acc": 41.0, "test_acc": 62.5,
           "epoch_seconds": 1.25, "images_per_second": 12345.6}
    console.epoch_line(row, 10, 3725.0)
    console.info("a long message " + "x" * 200)
    console.warn("the run may differ")
    console.summary({"params": 1234567, "epochs": 3, "final_test_acc": 93.104, "final_val_acc": None,
                     "train_seconds": 3.0})
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["epoch", "3/10", "lr", "0.1235", "loss", "1.5000", "train", "50.00%", "val", "41.00%",
                                "test", "62.50%", "1.25s", "12,346", "img/s", "eta", "1:02:05"]
    assert lines[1] == "a long message " + "x" * 200
    assert lines[2] == "warning: the run may differ"
    table = {cells[0]: cells[1] for cells in (line.strip("│┃ ").split("│") for line in lines[3:]) if len(cells) == 2}
    assert {k.strip(): v.strip() for k, v in table.items()} == {"params": "1,234,567", "epochs": "3",
                                                                "final_test_acc": "93.10%", "train_seconds": "3.00 s"}


def test_names_and_paths_are_printed_as_typed(capsys):
    """A run's name and folder are the user's text: rich markup in them is not read ("[exp]" vanished from
    the start-up line, "exp[/b]" ended the run with a MarkupError), nor are emoji codes replaced."""
    console = RunConsole(progress=False, enabled=True)
    console.info("fasttrain: [exp] | run runs/exp[/b]:smile:")
    console.warn("runs/[bold]x[/] was trained with another config")
    console.summary({"run_dir": "runs/[red]exp[/]", "device": "cpu[/b]"})
    out = capsys.readouterr().out
    assert "fasttrain: [exp] | run runs/exp[/b]:smile:\n" in out
    assert "warning: runs/[bold]x[/] was trained with another config\n" in out
    assert "runs/[red]exp[/]" in out and "cpu[/b]" in out


def test_the_progress_bar_is_drawn_on_a_terminal_by_rank_0_alone(capsys, monkeypatch):
    """A bar only where asked for (output.progress) and only on rank 0's terminal: other ranks print nothing
    at all. The bar counts the steps a mid-epoch resume skips, given in one call."""
    from fasttrain import console as console_module

    monkeypatch.setattr(console_module._OutlivingConsole, "is_terminal", property(lambda self: True))
    for progress, enabled in ((False, True), (True, False)):
        console = RunConsole(progress=progress, enabled=enabled)
        with console.epoch_bar(1, 2, 10) as advance:
            advance(7)
        if not enabled:
            console.info("rank 1's message")
            console.warn("rank 1's warning")
        assert capsys.readouterr().out == ""
    console = RunConsole(progress=True, enabled=True)
    with console.epoch_bar(1, 2, 10) as advance:
        advance(7)
    drawn = capsys.readouterr().out
    assert "epoch 1/2" in drawn and "7/10" in drawn


def test_after_the_reader_of_stdout_goes_away_a_plain_print_still_finds_a_sink(tmp_path):
    """`... | head -1`: once the console has met the closed pipe, stdout is pointed at /dev/null, so that
    a print outside the console (and Python's flush of stdout at exit) does not end the process with a
    BrokenPipeError after the run's files are complete."""
    script = tmp_path / "printer.py"
    script.write_text(
        "from fasttrain.console import RunConsole\n"
        "console = RunConsole(progress=False, enabled=True)\n"
        "for i in range(2000):\n"
        "    console.info(f'line {i} ' + 'x' * 100)  # 200 kB: more than the pipe holds\n"
        "print('a plain print after the reader left')\n")
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc.stdout.readline()
    proc.stdout.close()  # like head after its line
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err.decode()
