"""The training loop.

Speed rules it keeps:
* the hot path never reads a GPU value on the host: loss sums, correct counts and the non-finite
  loss detector accumulate on the device and are read once per epoch;
* evaluation, logging and checkpoints happen off the training clock; the clock itself is read after
  a device synchronize at epoch boundaries;
* torch.compile and cuDNN autotuning are warmed up on throwaway steps before the clock starts (the
  weights, optimizer and RNG are restored afterwards) and reported as `compile_seconds`.
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import platform
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fasttrain.checkpoint import (FORMAT, CheckpointError, atomic_save, check_architecture, load_checkpoint,
                                  rng_state, set_rng_state, unwrap)
from fasttrain.config import Config, ConfigError, config_from_dict, config_to_dict, save_config
from fasttrain.console import RunConsole
from fasttrain.data import build_data
from fasttrain.distributed import DistInfo, all_reduce_sum, barrier
from fasttrain.model import build_model, count_params
from fasttrain.optim import LRSchedule, build_optimizer, clip_gradients


class TrainingError(RuntimeError):
    """The run cannot go on (non-finite loss, out of memory, ...): the message says why and what to do."""


# --------------------------------------------------------------------------------------------
# Device and precision
# --------------------------------------------------------------------------------------------
def resolve_device(name: str = "auto", dist_info: DistInfo | None = None) -> torch.device:
    if name not in ("auto", "cuda", "cpu"):
        raise ConfigError(f"--device {name!r}: use auto, cuda or cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA GPU is visible to PyTorch (use --device cpu)")
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda", dist_info.local_rank if dist_info else 0)


@dataclass(frozen=True)
class Precision:
    name: str                        # bf16 | fp16 | fp32
    autocast_dtype: torch.dtype | None
    data_dtype: torch.dtype          # dtype the loaders hand to the model

    @staticmethod
    def resolve(precision: str, device: torch.device) -> "Precision":
        if precision == "auto":
            precision = "bf16" if device.type == "cuda" else "fp32"
        return {
            "bf16": Precision("bf16", torch.bfloat16, torch.bfloat16),
            "fp16": Precision("fp16", torch.float16, torch.float16),
            "fp32": Precision("fp32", None, torch.float32),
        }[precision]

    def autocast(self, device: torch.device):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.autocast_dtype)


def git_sha() -> str:
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "--verify", "-q", "HEAD"], cwd=here, capture_output=True,
                              text=True, timeout=5)
        sha = head.stdout.strip() if head.returncode == 0 else ""
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return (sha + ("-dirty" if dirty else "")) if sha else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model: nn.Module, loader, precision: Precision, device: torch.device,
             tta: bool = False, dist_info: DistInfo | None = None) -> float:
    """Top-1 accuracy in percent. Counts (not per-rank averages) are summed across ranks."""
    was_training = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.int64, device=device)
    total = torch.zeros((), dtype=torch.int64, device=device)
    for images, labels in loader:
        with precision.autocast(device):
            logits = model(images).float()
            if tta:  # average with the mirror image: the flip augmentation's test-time twin
                logits = logits + model(torch.flip(images, dims=(3,))).float()
        correct += (logits.argmax(1) == labels).sum()
        total += labels.numel()
    model.train(was_training)
    counts = torch.stack([correct, total])
    if dist_info is not None:
        all_reduce_sum(counts, dist_info)
    correct_n, total_n = counts.tolist()
    return 100.0 * correct_n / max(1, total_n)


# --------------------------------------------------------------------------------------------
# The trainer
# --------------------------------------------------------------------------------------------
class Trainer:
    def __init__(self, cfg: Config, *, device: str = "auto", run_dir: str | Path | None = None,
                 resume: str | Path | None = None, overwrite: bool = False,
                 console: RunConsole | None = None, dist_info: DistInfo | None = None):
        self.cfg = cfg
        self.dist = dist_info or DistInfo()
        self.device = resolve_device(device, self.dist)
        self.precision = Precision.resolve(cfg.train.precision, self.device)
        self.console = console or RunConsole(cfg.output.progress, enabled=self.dist.is_main)
        self.resume_path = Path(resume) if resume else None
        self.run_dir = self._choose_run_dir(run_dir, overwrite)

        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = not cfg.train.deterministic
            torch.backends.cudnn.deterministic = cfg.train.deterministic
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

        self.model = build_model(cfg.model).to(self.device)
        self.params = count_params(self.model)
        if cfg.train.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        if self.dist.enabled and cfg.train.sync_bn:
            self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)

        self.data = build_data(
            cfg.data, batch_size=cfg.train.batch_size, eval_batch_size=cfg.train.eval_batch_size,
            device=self.device, dtype=self.precision.data_dtype, channels_last=cfg.train.channels_last,
            seed=cfg.train.seed, rank=self.dist.rank, world_size=self.dist.world_size,
        )
        self.steps_per_epoch = len(self.data.train)
        self.optimizer = build_optimizer(self.model.parameters(), cfg.optim)
        self.schedule = LRSchedule(self.optimizer, cfg.optim, self.steps_per_epoch, cfg.train.epochs)
        self.scaler = (torch.amp.GradScaler(self.device.type) if self.precision.name == "fp16" else None)

        self.net: nn.Module = self.model  # what the loop calls: maybe DDP-wrapped and compiled
        if self.dist.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        if cfg.train.compile:
            self.net = torch.compile(self.net, mode=cfg.train.compile_mode)

        self.start_epoch = 0  # epochs already completed
        self.best_test_acc: float | None = None
        self.train_seconds = 0.0
        self.compile_seconds = 0.0
        if self.resume_path is not None:
            self._load(self.resume_path)

    # ---------------------------------------------------------------- run folder
    def _choose_run_dir(self, run_dir, overwrite: bool) -> Path:
        if run_dir is None and self.cfg.output.dir:
            run_dir = self.cfg.output.dir
        if run_dir is None and self.resume_path is not None:
            run_dir = self.resume_path.parent
        if run_dir is None:
            run_dir = Path("runs") / f"{self.cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        run_dir = Path(run_dir)
        holds_run = (run_dir / "config.yaml").exists() or (run_dir / "last.pt").exists()
        if holds_run and self.resume_path is None and not overwrite:
            raise ConfigError(
                f"the output folder {str(run_dir)!r} already holds a run: pass --resume "
                f"{run_dir / 'last.pt'} to continue it, --overwrite to replace it, or another --output.dir"
            )
        return run_dir

    # ---------------------------------------------------------------- checkpoints
    def checkpoint_state(self, epoch: int) -> dict:
        return {
            "format": FORMAT,
            "model": unwrap(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.schedule.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "epoch": epoch,
            "rng": rng_state(),
            "config": config_to_dict(self.cfg),
            "params": self.params,
            "best_test_acc": self.best_test_acc,
            "train_seconds": self.train_seconds,
            "data_source": self.data.source,
            "torch": torch.__version__,
        }

    def save_checkpoint(self, epoch: int, name: str = "last.pt") -> Path:
        path = self.run_dir / name
        if self.dist.is_main:
            atomic_save(self.checkpoint_state(epoch), path)
        barrier(self.dist)
        return path

    def _load(self, path: Path) -> None:
        ckpt = load_checkpoint(path, map_location=self.device)
        check_architecture(unwrap(self.model), ckpt["model"], str(path))
        saved = config_from_dict(ckpt["config"])
        if saved.model != self.cfg.model:
            raise CheckpointError(f"{path} was trained with another model section than this config's; "
                                  "resume with the config saved in the run folder (config.yaml)")
        unwrap(self.model).load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.schedule.load_state_dict(ckpt["scheduler"])
        if self.scaler is not None and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        set_rng_state(ckpt["rng"])
        self.start_epoch = int(ckpt["epoch"])
        self.best_test_acc = ckpt.get("best_test_acc")
        self.train_seconds = float(ckpt.get("train_seconds", 0.0))
        self.console.info(f"resumed {path} after epoch {self.start_epoch}")

    # ---------------------------------------------------------------- one step, one epoch
    def _train_step(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with self.precision.autocast(self.device):
            logits = self.net(images)
            loss = F.cross_entropy(logits.float(), labels, label_smoothing=self.cfg.optim.label_smoothing)
        self.optimizer.zero_grad(set_to_none=True)
        params = [p for p in self.model.parameters() if p.requires_grad]
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
            clip_gradients(params, self.cfg.optim, self.optimizer)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            clip_gradients(params, self.cfg.optim, self.optimizer)
            self.optimizer.step()
        self.schedule.step()
        return loss.detach(), logits.detach()

    def train_epoch(self, epoch: int, advance=lambda n=1: None) -> dict:
        """One pass over this rank's shard; returns device-side sums, read by the caller once."""
        loader = self.data.train
        loader.set_epoch(epoch)
        self.net.train()
        dev = self.device
        loss_sum = torch.zeros((), dtype=torch.float32, device=dev)
        correct = torch.zeros((), dtype=torch.int64, device=dev)
        step_in_epoch = torch.zeros((), dtype=torch.int64, device=dev)
        first_bad_step = torch.full((), -1, dtype=torch.int64, device=dev)
        seen = 0
        for images, labels in loader:
            loss, logits = self._train_step(images, labels)
            # Non-finite detector without a host sync: remember the first bad step on the device.
            bad = ~torch.isfinite(loss)
            first_bad_step = torch.where(bad & (first_bad_step < 0), step_in_epoch, first_bad_step)
            step_in_epoch += 1
            loss_sum += loss.float()
            correct += (logits.argmax(1) == labels).sum()
            seen += labels.shape[0]
            advance()
        return {"loss_sum": loss_sum, "correct": correct, "seen": seen, "first_bad_step": first_bad_step}

    def _check_finite(self, epoch: int, first_bad_step: int) -> None:
        if first_bad_step < 0:
            return
        global_step = epoch * self.steps_per_epoch + first_bad_step
        lr = self.schedule.lr_at(global_step)
        raise TrainingError(
            f"the training loss became NaN or infinite at epoch {epoch + 1}, step {first_bad_step + 1} "
            f"(learning rate {lr:.4g}). The last good checkpoint ({self.run_dir / 'last.pt'}) is kept. "
            "Lower optim.lr, raise optim.warmup_epochs, enable gradient clipping, or use train.precision bf16/fp32."
        )

    # ---------------------------------------------------------------- compile warmup
    def warmup(self, steps: int = 3) -> float:
        """Run compile and cuDNN autotuning on throwaway steps, then restore every bit of state."""
        t0 = time.perf_counter()
        model_state = copy.deepcopy(unwrap(self.model).state_dict())
        optim_state = copy.deepcopy(self.optimizer.state_dict())
        sched_state = self.schedule.state_dict()
        scaler_state = self.scaler.state_dict() if self.scaler is not None else None
        rng = rng_state()
        self.data.train.set_epoch(self.start_epoch)
        self.net.train()
        for i, (images, labels) in enumerate(self.data.train):
            self._train_step(images, labels)
            if i + 1 >= steps:
                break
        for loader in (self.data.val, self.data.test):
            if loader is not None:
                evaluate(self.net, loader, self.precision, self.device, tta=self.cfg.train.tta)
        unwrap(self.model).load_state_dict(model_state)
        self.optimizer.load_state_dict(optim_state)
        self.schedule.load_state_dict(sched_state)
        if scaler_state is not None:
            self.scaler.load_state_dict(scaler_state)
        set_rng_state(rng)
        synchronize(self.device)
        return time.perf_counter() - t0

    # ---------------------------------------------------------------- the run
    def fit(self, stop_after_epochs: int | None = None) -> dict:
        """Train to `train.epochs` (or stop early after `stop_after_epochs` in total, checkpointed)."""
        cfg, con = self.cfg, self.console
        wall_start = time.perf_counter()
        epochs = cfg.train.epochs
        if self.start_epoch >= epochs:
            con.info(f"the checkpoint already completed {self.start_epoch} of {epochs} epochs: nothing to train")
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")
            self._truncate_metrics(self.start_epoch)
        if self.device.type == "cpu":
            con.warn("training on the CPU: this is slow; use a CUDA GPU for real runs")
        con.info(f"fasttrain: {cfg.name} | {self.params:,} params | {device_name(self.device)} | "
                 f"{self.precision.name} | data {self.data.source} | {self.steps_per_epoch} steps/epoch"
                 f" x {self.dist.world_size} rank(s) | run {self.run_dir}")

        if cfg.train.compile and self.start_epoch < epochs:
            self.compile_seconds = self.warmup()
            con.info(f"compile + autotune warmup: {self.compile_seconds:.1f} s (off the training clock)")

        final_test = final_val = None
        imgs_per_s = []
        end_epoch = epochs if stop_after_epochs is None else min(epochs, stop_after_epochs)
        for epoch in range(self.start_epoch, end_epoch):
            lr = self.schedule.lr
            synchronize(self.device)
            t0 = time.perf_counter()
            with con.epoch_bar(epoch + 1, epochs, self.steps_per_epoch) as advance:
                sums = self.train_epoch(epoch, advance)
            synchronize(self.device)
            epoch_seconds = time.perf_counter() - t0
            self.train_seconds += epoch_seconds

            # ---- off the clock: read the epoch's sums once, evaluate, log, checkpoint
            stats = torch.stack([sums["loss_sum"].double(), sums["correct"].double(),
                                 sums["first_bad_step"].double()])
            loss_sum, correct, first_bad = stats.tolist()
            self._check_finite(epoch, int(first_bad))
            seen_all = sums["seen"] * self.dist.world_size
            row = {
                "epoch": epoch + 1, "lr": lr,
                "train_loss": loss_sum / max(1, self.steps_per_epoch),
                "train_acc": 100.0 * correct / max(1, sums["seen"]),
                "val_acc": None, "test_acc": None,
                "epoch_seconds": epoch_seconds,
                "images_per_second": seen_all / epoch_seconds if epoch_seconds > 0 else float("nan"),
            }
            imgs_per_s.append(row["images_per_second"])
            last = epoch + 1 == end_epoch
            if (epoch + 1) % cfg.train.eval_every == 0 or last:
                if self.data.val is not None:
                    row["val_acc"] = final_val = evaluate(self.net, self.data.val, self.precision, self.device,
                                                          dist_info=self.dist)
                row["test_acc"] = final_test = evaluate(self.net, self.data.test, self.precision, self.device,
                                                        dist_info=self.dist)
                self.best_test_acc = max(self.best_test_acc or 0.0, final_test)
            self._append_metrics(row)
            eta = (epochs - epoch - 1) * (time.perf_counter() - t0)
            con.epoch_line(row, epochs, eta)
            if (epoch + 1) % cfg.train.checkpoint_every == 0 or last:
                self.save_checkpoint(epoch + 1)

        summary = {
            "name": cfg.name, "params": self.params, "epochs": epochs,
            "final_test_acc": final_test, "best_test_acc": self.best_test_acc, "final_val_acc": final_val,
            "final_test_acc_tta": None,
            "train_seconds": self.train_seconds, "compile_seconds": self.compile_seconds,
            "wall_seconds": time.perf_counter() - wall_start,
            "images_per_second": (sum(imgs_per_s) / len(imgs_per_s)) if imgs_per_s else None,
            "device": device_name(self.device), "world_size": self.dist.world_size,
            "precision": self.precision.name, "torch": torch.__version__, "git_sha": git_sha(),
            "data_source": self.data.source, "run_dir": str(self.run_dir),
        }
        if cfg.train.tta and self.start_epoch < epochs:
            summary["final_test_acc_tta"] = evaluate(self.net, self.data.test, self.precision, self.device,
                                                     tta=True, dist_info=self.dist)
        if self.dist.is_main:
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        con.summary(summary)
        return summary

    # ---------------------------------------------------------------- metrics file
    def _append_metrics(self, row: dict) -> None:
        if self.dist.is_main:
            with open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")

    def _truncate_metrics(self, completed_epochs: int) -> None:
        """On resume, drop rows past the checkpoint so the file never holds an epoch twice."""
        path = self.run_dir / "metrics.jsonl"
        if not path.exists():
            return
        keep = [line for line in path.read_text(encoding="utf-8").splitlines()
                if line.strip() and json.loads(line).get("epoch", math.inf) <= completed_epochs]
        path.write_text("".join(line + "\n" for line in keep), encoding="utf-8")


def evaluate_checkpoint(path: str | Path, *, tta: bool = False, device: str = "auto",
                        data_dir: str | None = None) -> dict:
    """`python -m fasttrain eval`: rebuild the checkpoint's model and measure its test accuracy."""
    dev = resolve_device(device)
    ckpt = load_checkpoint(path, map_location=dev)
    cfg = config_from_dict(ckpt["config"])
    if data_dir is not None:
        cfg.data.dir = data_dir
    model = build_model(cfg.model, check=False)
    check_architecture(model, ckpt["model"], str(path))
    model.load_state_dict(ckpt["model"])
    model = model.to(dev)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    precision = Precision.resolve(cfg.train.precision, dev)
    data = build_data(cfg.data, batch_size=cfg.train.batch_size, eval_batch_size=cfg.train.eval_batch_size,
                      device=dev, dtype=precision.data_dtype, channels_last=cfg.train.channels_last,
                      seed=cfg.train.seed)
    acc = evaluate(model, data.test, precision, dev, tta=tta)
    return {"checkpoint": str(path), "test_acc": acc, "tta": tta, "epoch": int(ckpt["epoch"]),
            "params": count_params(model), "trained_on": ckpt.get("data_source"), "device": device_name(dev)}
