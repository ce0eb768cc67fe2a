"""The training loop.

Speed rules it keeps:
* the hot path never reads a GPU value on the host: loss sums, correct counts and the non-finite
  loss detector accumulate on the device and are read once per epoch. The one exception is fp16:
  torch's GradScaler reads its found-inf flag once per step to skip a step with inf/NaN gradients
  (for optimizers without the fused-AMP protocol, ours included). bf16, the default on GPUs, needs
  no scaler and never syncs;
* evaluation, logging and checkpoints happen off the training clock; the clock itself is read after
  a device synchronize at epoch boundaries;
* torch.compile and cuDNN autotuning are warmed up on throwaway steps before the clock starts (the
  weights, optimizer and RNG are restored afterwards) and reported as `compile_seconds`.

Checkpoints, resuming and the stop that saves the position are the Trainer's mixin in fasttrain/resuming.py.
"""
from __future__ import annotations

import contextlib
import copy
import itertools
import json
import math
import os
import shlex
import time
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fasttrain.checkpoint import LAST, rng_state, run_summary, set_rng_state, unwrap
from fasttrain.config import Config, ConfigError
from fasttrain.console import RunConsole
from fasttrain.data import build_data
from fasttrain.ema import WeightEMA
from fasttrain.evaluate import TTA_MODES, black_fill, evaluate
from fasttrain.files import write_text_atomic
from fasttrain.distributed import (DistInfo, StopAgreement, all_reduce_min, all_reduce_sum, barrier, broadcast_object,
                                   die_now, fault_injection_step, is_peer_failure, peer_failure_message, rank_seed,
                                   sync_buffers)
from fasttrain.graph import DDP_WARMUP_ITERS, WARMUP_ITERS, GraphedStep, graph_problems, side_stream, step_state
from fasttrain.model import build_model, count_params, squeeze_excite_weights
from fasttrain.optim import LRSchedule, build_optimizer, clip_gradients
from fasttrain.resuming import Resumable, TrainingError
from fasttrain.run_folder import (LOCK, SUMMARY, FolderLock, append_metrics, choose_run_dir, claim_run_dir,
                                  prepare_run_dir, resumes_another_folder)
from fasttrain.runtime import Precision, device_name, git_sha, resolve_device, synchronize, use_channels_last
from fasttrain.signals import LAUNCHER_REPEAT_S, RunInterrupted, StopRequest
from fasttrain.whiten import whiten_stem


def oom_detail(e: torch.OutOfMemoryError) -> str:
    """The first line of torch's out-of-memory message (what it tried to allocate), bounded."""
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else "no detail"


def eta_seconds(epoch_seconds: float, steps_run: int, steps_per_epoch: int, epochs_left: int) -> float:
    """The time the epochs still to come will take, from the one just run: per step, since an epoch
    resumed mid-way ran only its rest, and the whole epochs to come must not look as short."""
    return epochs_left * epoch_seconds * steps_per_epoch / max(1, steps_run)


# --------------------------------------------------------------------------------------------
# The trainer
# --------------------------------------------------------------------------------------------
class Trainer(Resumable):
    def __init__(self, cfg: Config, *, device: str = "auto", run_dir: str | Path | None = None,
                 resume: str | Path | None = None, overwrite: bool = False,
                 console: RunConsole | None = None, dist_info: DistInfo | None = None,
                 resume_checkpoint: dict | None = None):
        """`resume_checkpoint`: the content of the checkpoint file `resume`, already read and verified by the
        caller (the CLI reads it for its config or to choose it): taken instead of reading the file again,
        unless rank 0 chose another file."""
        self.cfg = cfg
        self.dist = dist_info or DistInfo()
        self.device = resolve_device(device, self.dist)
        self._device_flag = "" if device == "auto" else f" --device {device}"  # for the printed resume command
        self.precision = Precision.resolve(cfg.train.precision, self.device)
        self.console = console or RunConsole(cfg.output.progress, enabled=self.dist.is_main)
        self.git_sha = git_sha()  # the code this process runs, read at its start: a commit made during the run
        # (the working tree's next change) must not relabel it in summary.json
        if self.dist.enabled and cfg.train.sync_bn and self.device.type != "cuda":
            raise ConfigError("train.sync_bn needs CUDA GPUs (PyTorch's SyncBatchNorm runs on GPUs only): "
                              "pass --train.sync_bn false for a CPU run")
        # every rank takes rank 0's choices (a default run folder is named after rank 0's clock)
        self.resume_path = broadcast_object(Path(resume) if resume else None, self.dist)
        self.run_dir = broadcast_object(choose_run_dir(cfg, run_dir, self.resume_path, overwrite), self.dist)
        # checked again under the folder's lock before the first write (_claim_run_dir)
        self._overwrite = overwrite
        self._default_run_dir = run_dir is None and not cfg.output.dir and self.resume_path is None
        self._folder_lock: FolderLock | None = None
        self._die_at_step = fault_injection_step(self.dist)  # test-only, None outside tests

        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = not cfg.train.deterministic
            torch.backends.cudnn.deterministic = cfg.train.deterministic
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

        self.model = build_model(cfg.model, device=self.device)
        self.params = count_params(self.model)
        self.channels_last = use_channels_last(cfg, self.device, self.console.warn)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        if self.dist.enabled and cfg.train.sync_bn:
            self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)

        self.data = self._build_data()
        self.steps_per_epoch = len(self.data.train)
        # model.stem_init whiten: the stem's filters from the training images, before the optimizer (Lookahead's
        # slow weights), the EMA and DDP copy the weights; a resumed run takes them from its checkpoint. It is
        # training work (it reads the training data), so its seconds count in train_seconds.
        self.stem_init_seconds: float | None = None
        if cfg.model.stem_init == "whiten" and self.resume_path is None:
            t0 = time.perf_counter()
            whiten_stem(self.model.stem[0], self.data.train_images, cfg.data.mean, cfg.data.std)
            self.stem_init_seconds = time.perf_counter() - t0
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]  # listed once, not per step
        self.optimizer = build_optimizer(self.trainable, cfg.optim, squeeze_excite_weights(self.model))
        self.schedule = LRSchedule(self.optimizer, cfg.optim, self.steps_per_epoch, cfg.train.epochs)
        self.scaler = (torch.amp.GradScaler(self.device.type) if self.precision.name == "fp16" else None)
        self.use_graph = self._check_cuda_graph()
        self._graph: GraphedStep | None = None  # captured by warmup() when use_graph

        self.net, self.eval_net = self._networks_to_call()
        # train.ema_decay > 0: evaluation (per epoch, final, TTA) and `eval` use the EMA weights. The EMA
        # module is evaluated eagerly, even under train.compile: compiling it separately would add compile
        # time for an off-the-clock pass, and eager is trivially correct.
        self.ema = (WeightEMA(unwrap(self.model), cfg.train.ema_decay, cfg.train.ema_warmup_steps)
                    if cfg.train.ema_decay > 0 else None)
        if self.ema is not None:
            self.eval_net = self.ema.module
        # train.ema_bn recompute: the EMA's BN statistics are re-estimated before the EMA is evaluated or
        # saved (_recompute_ema_bn); the step count they were last recomputed at (None: not yet)
        self.ema_bn_recompute = self.ema is not None and cfg.train.ema_bn == "recompute"
        self._ema_bn_at: int | None = None
        self.eval_fill = black_fill(cfg.data.mean, cfg.data.std)  # TTA shifts pad like the training crop

        self.start_epoch = 0  # epochs already completed
        self.best_test_acc: float | None = None
        self.train_seconds = self.stem_init_seconds or 0.0  # a resumed run: its checkpoint's, in _load
        # the run's clocks over all its processes: a resumed run adds this process's to its checkpoint's
        self.compile_seconds = 0.0  # the compile warmups, off the training clock
        self._earlier_wall_seconds = 0.0  # the earlier processes' wall time, up to their last checkpoint
        self._wall_start: float | None = None  # this process's fit() start (perf_counter)
        self.epoch_images_per_second: list[float] = []  # each completed epoch's, in order
        self.start_step = 0  # steps of epoch `start_epoch` already done (a checkpoint saved mid-epoch)
        self._epoch_partial: dict | None = None  # and their sums (checkpoint_state's "epoch_partial")
        # torchrun: the agent's forwarded copy of a signal this rank got directly is not a second one
        self._stop = StopRequest(repeat_window_s=LAUNCHER_REPEAT_S if self.dist.enabled else 0.0)
        self._stop_agreement = StopAgreement(self._stop, self.dist, self.device)  # every rank stops at one step
        # a mid-epoch resume under torchrun restored this rank's own RNG state: train_epoch must not reseed it
        self._rank_rng_restored = False
        self._last_saved: tuple[tuple[int, int], Path] | None = None  # ((epoch, step), path) of the newest save
        self._install_test_faults()
        if self.resume_path is not None:
            same_file = resume is not None and Path(resume) == self.resume_path
            self._load(self.resume_path, resume_checkpoint if same_file else None)

    def _build_data(self):
        """The run's loaders (fasttrain.data.build_data). Under torchrun with data.download on, local rank 0
        of each node reads (or fetches) CIFAR-10 first and the node's other ranks read it after a barrier:
        one download per node, not one per GPU."""
        cfg = self.cfg
        data_first = not (self.dist.enabled and cfg.data.download) or self.dist.local_rank == 0
        if not data_first:
            barrier(self.dist)
        data = build_data(
            cfg.data, batch_size=cfg.train.batch_size, eval_batch_size=cfg.train.eval_batch_size,
            device=self.device, dtype=self.precision.data_dtype, channels_last=self.channels_last,
            seed=cfg.train.seed, rank=self.dist.rank, world_size=self.dist.world_size,
        )
        if data_first and self.dist.enabled and cfg.data.download:
            barrier(self.dist)
        return data

    def _networks_to_call(self) -> tuple[nn.Module, nn.Module]:
        """(what the training loop calls: the model, DDP-wrapped under torchrun, compiled under train.compile;
        what evaluation calls: never the DDP wrapper, whose forward can run collectives (buffer broadcasts)
        that ranks with different numbers of evaluation batches would not match)."""
        net = eval_net = self.model
        if self.dist.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            with side_stream(self.device, enabled=self.use_graph):  # PyTorch's rule for a captured DDP backward
                net = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        if self.cfg.train.compile:
            mode = self.cfg.train.compile_mode
            net = torch.compile(net, mode=mode)
            eval_net = torch.compile(self.model, mode=mode) if self.dist.enabled else net
        return net, eval_net

    def _check_cuda_graph(self) -> bool:
        """train.cuda_graph: off with a warning on the CPU (a config written for GPUs still runs);
        on a GPU, a setting it cannot work with is an error that names the fix."""
        if not self.cfg.train.cuda_graph:
            return False
        if self.device.type != "cuda":
            self.console.warn("train.cuda_graph is off for this run: CUDA graphs need a CUDA GPU")
            return False
        problems = graph_problems(self.cfg, self.dist.world_size, self.precision.name)
        if problems:
            raise ConfigError("train.cuda_graph is on, but " + "; ".join(problems) +
                              " (or pass --train.cuda_graph false)")
        return True

    # ---------------------------------------------------------------- divergence
    def _check_weights_finite(self, epoch: int, step_in_epoch: int) -> None:
        state = unwrap(self.model).state_dict()
        floats = {k: t for k, t in state.items() if t.is_floating_point()}
        if not floats or bool(torch.stack([torch.isfinite(t).all() for t in floats.values()]).all()):
            return  # one host sync per save, off the clock
        bad = [k for k, t in floats.items() if not bool(torch.isfinite(t).all())]
        where = f"epoch {epoch + 1}, step {step_in_epoch}" if step_in_epoch else f"epoch {epoch}"
        raise TrainingError(
            f"not saving a checkpoint after {where}: the weights hold NaN or infinite values "
            f"({', '.join(bad[:5])}{', ...' if len(bad) > 5 else ''}). {self._kept_checkpoint_note()} "
            f"{self._divergence_fixes()}",
            every_rank=True)  # DDP's ranks hold the same weights, and rank 0's buffers (sync_buffers)

    def _divergence_fixes(self) -> str:
        """What to change after a non-finite loss or weights: the precision advice only where it is not
        already taken (fp16 overflows where bf16 and fp32 do not)."""
        fixes = ["lower optim.lr", "raise optim.warmup_epochs"]
        fixes.append("enable gradient clipping (optim.clip)" if self.cfg.optim.clip == "none"
                     else "lower optim.clip_value")
        if self.precision.name == "fp16":
            fixes.append("use train.precision bf16 or fp32")
        return (", ".join(fixes[:-1]) + " or " + fixes[-1]).capitalize() + "."

    # ---------------------------------------------------------------- test-only fault injection
    def _install_test_faults(self) -> None:
        """Fault injection for tests/test_reliability.py, read once from the environment.

        FASTTRAIN_INJECT_NAN_STEP=k: the k-th optimizer step of the run (1-based, counted across
            epochs) gets NaN images, so its loss, its gradients and then the weights turn NaN, as in a
            real divergence.
        FASTTRAIN_TEST_STEP_SLEEP=s: sleep s seconds after each step, so a test can signal or kill a
            tiny run while it is inside an epoch.
        Both unset (always, outside tests): nothing is wrapped and the step costs nothing extra.
        """
        nan_env = os.environ.get("FASTTRAIN_INJECT_NAN_STEP", "")
        sleep_env = os.environ.get("FASTTRAIN_TEST_STEP_SLEEP", "")
        if not nan_env and not sleep_env:
            return
        try:
            nan_at, pause = int(nan_env or -1), float(sleep_env or 0.0)
        except ValueError:
            raise ConfigError(f"FASTTRAIN_INJECT_NAN_STEP={nan_env!r} / FASTTRAIN_TEST_STEP_SLEEP={sleep_env!r}: "
                              "expected an integer step and a number of seconds") from None
        step = self._train_step

        def faulty_step(images: torch.Tensor, labels: torch.Tensor):
            if self.schedule.step_count + 1 == nan_at:
                images = images * float("nan")
            out = step(images, labels)
            if pause:
                time.sleep(pause)
            return out

        self._train_step = faulty_step

    # ---------------------------------------------------------------- one step, one epoch
    def _train_step(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One training step: the captured graph's replay under train.cuda_graph, else eager."""
        if self._graph is not None:
            loss, logits = self._graph(images, labels)
        else:
            self.optimizer.zero_grad(set_to_none=True)
            loss, logits = self._step_body(images, labels)
        self.schedule.step()  # host-side: the next step's lr reaches the device before it runs
        if self.ema is not None:
            self.ema.update(self.schedule.step_count)
        return loss, logits

    def _step_body(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward, loss, backward, clipping, optimizer step: what a CUDA graph captures (gradients
        zeroed by the caller). Autocast's weight-cast cache is off: it must not outlive a capture, and a
        ResNet uses each weight once per forward, so it saves nothing (and one setting means one compile)."""
        with self.precision.autocast(self.device, cache=False):
            logits = self.net(images)
            loss = F.cross_entropy(logits.float(), labels, label_smoothing=self.cfg.optim.label_smoothing)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
            clip_gradients(self.trainable, self.cfg.optim, self.optimizer)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            clip_gradients(self.trainable, self.cfg.optim, self.optimizer)
            self.optimizer.step()
        return loss.detach(), logits.detach()

    def capture_graph(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        """train.cuda_graph: capture the training step on a batch of the training loader's shape (after
        the compile warmup); later steps replay it. Its time counts in the caller's warmup."""
        self.net.train()  # the graph bakes in the mode it was captured in: BN must update its statistics
        self._graph = GraphedStep(
            self._step_body, params=self.trainable, state=step_state(self.model, self.optimizer),
            before_replay=self.optimizer._sync_hyperparameters, images=images, labels=labels,
            version=lambda: self.optimizer.build_count,
            warmup_iters=DDP_WARMUP_ITERS if self.dist.enabled else WARMUP_ITERS,
            # other threads use CUDA meanwhile: DALI's prefetching (its own stream, not captured) and
            # NCCL's watchdog (polling events)
            capture_error_mode="thread_local" if self.cfg.data.loader == "dali" or self.dist.enabled else "global")

    def train_epoch(self, epoch: int, advance=lambda n=1: None, skip: int = 0,
                    partial: dict | None = None) -> dict:
        """One pass over this rank's shard; returns device-side sums, read by the caller once.

        `skip`: steps of this epoch a mid-epoch checkpoint already did. The epoch's batch stream is a
        pure function of (seed, epoch), so drawing and dropping `skip` batches puts the loader exactly
        where the interrupted run stopped. "steps" and "seen" count only the remaining steps; the loss and
        correct sums start from `partial`'s (the stopped run's, saved in its checkpoint) when given.
        On a stop signal the loop ends after the current step (one process) or after the step the ranks
        agree on (torchrun: StopAgreement, at most 2 x STOP_AGREEMENT_EVERY steps later, the same step
        on every rank); "steps" says how far it got.
        """
        loader = self.data.train
        loader.set_epoch(epoch)
        self.net.train()
        if self.dist.enabled and not (skip and self._rank_rng_restored):
            # this rank's own randomness (dropout) in this epoch: see rank_seed (resumed mid-epoch on as
            # many ranks: each rank's saved state goes on instead, see _restore_rng)
            torch.manual_seed(rank_seed(self.cfg.train.seed, epoch, self.dist.rank))
        dev = self.device
        # `partial`: the sums (over all ranks) of the `skip` steps before a mid-epoch stop, carried on rank 0,
        # so that the epoch's row is the uninterrupted run's (one process: the same float32 additions)
        carried = partial if partial is not None and self.dist.is_main else {"loss_sum": 0.0, "correct": 0}
        loss_sum = torch.full((), carried["loss_sum"], dtype=torch.float32, device=dev)
        correct = torch.full((), int(carried["correct"]), dtype=torch.int64, device=dev)
        step_in_epoch = torch.full((), skip, dtype=torch.int64, device=dev)
        first_bad_step = torch.full((), -1, dtype=torch.int64, device=dev)
        seen = steps = 0
        batches = iter(loader)
        if skip:
            batches = itertools.islice(batches, skip, None)
            advance(skip)
        stop = self._stop_agreement
        for images, labels in batches:
            if self._die_at_step is not None and self.schedule.step_count == self._die_at_step:
                die_now(self.dist, self._die_at_step)  # test-only fault injection
            loss, logits = self._train_step(images, labels)
            # Non-finite detector without a host sync: remember the first bad step on the device.
            bad = ~torch.isfinite(loss)
            first_bad_step = torch.where(bad & (first_bad_step < 0), step_in_epoch, first_bad_step)
            step_in_epoch += 1
            loss_sum += loss.float()
            correct += (logits.argmax(1) == labels).sum()
            seen += labels.shape[0]
            steps += 1
            advance()
            if stop.after_step(steps):  # no device sync (torchrun: a reduction read k steps later)
                break
        stop.drain()  # torchrun: the epoch's last reduction, still in flight
        return {"loss_sum": loss_sum, "correct": correct, "seen": seen, "first_bad_step": first_bad_step,
                "steps": steps}

    def _check_finite(self, epoch: int, first_bad_step: int) -> None:
        if first_bad_step < 0:
            return
        global_step = epoch * self.steps_per_epoch + first_bad_step
        lr = self.schedule.lr_at(global_step)
        raise TrainingError(
            f"the training loss became NaN or infinite at epoch {epoch + 1}, step {first_bad_step + 1} "
            f"(learning rate {lr:.4g}); this epoch was not checkpointed. {self._kept_checkpoint_note()} "
            f"{self._divergence_fixes()}",
            every_rank=True)  # the first bad step of any rank, agreed by every rank (_reduce_epoch_stats)

    def _recompute_ema_bn(self) -> float:
        """train.ema_bn recompute: re-estimate the EMA module's BN statistics (WeightEMA.recompute_bn) from
        the first train.ema_bn_batches batches (at most an epoch's) of the epoch of the latest step, unless
        that was done at this step already; returns the seconds it took (0.0 when it did nothing).

        Why augmented training batches (the training loader's own, drawn again: the stream is a pure
        function of (seed, epoch), so the run's data and RNG are untouched and a resumed run recomputes the
        same statistics): they are what the live model's running statistics, the ones evaluated without
        EMA, are estimated on (SWA's update_bn does the same); the loader is already on the device, for
        every loader and rank, with no second data path; and in 17 CPU comparisons (small nets, cutout 12)
        the EMA scored higher on validation with them than with un-augmented training images in 16, by
        1-2 points at the end of the runs. Called off the training clock (per-epoch evaluation,
        checkpoints) except at the end of the run, where it produces the final model and is counted
        (see _run_epoch). Never inside a training step: no host sync is added there."""
        if not self.ema_bn_recompute or self._ema_bn_at == self.schedule.step_count:
            return 0.0
        synchronize(self.device)
        t0 = time.perf_counter()
        loader = self.data.train
        loader.set_epoch(max(0, self.schedule.step_count - 1) // self.steps_per_epoch)
        count = min(self.cfg.train.ema_bn_batches, self.steps_per_epoch)
        self.ema.recompute_bn((images for images, _ in itertools.islice(loader, count)),
                              lambda: self.precision.autocast(self.device))
        if self.dist.enabled:  # each rank estimated on its own shard: rank 0's everywhere (evaluated == saved)
            sync_buffers(self.ema.module, self.dist)
        self._ema_bn_at = self.schedule.step_count
        synchronize(self.device)
        return time.perf_counter() - t0

    # ---------------------------------------------------------------- compile warmup
    def warmup(self, steps: int = 3) -> float:
        """Run compile and cuDNN autotuning on throwaway steps, then restore every bit of state."""
        t0 = time.perf_counter()
        model_state = copy.deepcopy(unwrap(self.model).state_dict())
        optim_state = copy.deepcopy(self.optimizer.state_dict())
        sched_state = self.schedule.state_dict()
        scaler_state = self.scaler.state_dict() if self.scaler is not None else None
        ema_state = copy.deepcopy(self.ema.state_dict()) if self.ema is not None else None
        rng = rng_state(self.device)
        self.data.train.set_epoch(self.start_epoch)
        self.net.train()
        batch = None
        for i, batch in enumerate(self.data.train):
            self._train_step(*batch)
            if i + 1 >= steps:
                break
        for _, loader in self._eval_splits():
            evaluate(self.eval_net, loader, self.precision, self.device, tta=self.cfg.train.tta,
                     fill=self.eval_fill)
        unwrap(self.model).load_state_dict(model_state)
        if ema_state is not None:
            self.ema.load_state_dict(ema_state)
        self.optimizer.load_state_dict(optim_state)
        self.schedule.load_state_dict(sched_state)
        if scaler_state is not None:
            self.scaler.load_state_dict(scaler_state)
        set_rng_state(rng, self.device)
        if self.use_graph and batch is not None:  # captured on the restored state: the run starts unchanged
            self.capture_graph(*batch)
        synchronize(self.device)
        return time.perf_counter() - t0

    def accuracy_by_tta(self, modes: Sequence[str] = TTA_MODES) -> dict[str, dict[str, float]]:
        """{split: {TTA mode: accuracy in percent}} of the evaluated weights as they are now, for each of
        `modes` (default every one: none, flip, flip_shift) on every split this run scores: what the
        benchmarks report beside the recipe's own mode (issue 6: accuracy with and without TTA)."""
        self._recompute_ema_bn()  # train.ema_bn recompute: a no-op after a run, which ended with one
        return {split: {mode: evaluate(self.eval_net, loader, self.precision, self.device, tta=mode,
                                       dist_info=self.dist, fill=self.eval_fill) for mode in modes}
                for split, loader in self._eval_splits()}

    def _eval_splits(self) -> list[tuple[str, object]]:
        """(name, loader) of what this run scores: the validation split when one is held out, and
        the test set unless train.eval_test is false (tuning)."""
        splits = [("val", self.data.val)] if self.data.val is not None else []
        return splits + ([("test", self.data.test)] if self.cfg.train.eval_test else [])

    # ---------------------------------------------------------------- the run
    def fit(self, stop_after_epochs: int | None = None) -> dict:
        """Train to `train.epochs` (or stop early after `stop_after_epochs` in total, checkpointed).

        On SIGINT/SIGTERM the current step finishes, the exact position is checkpointed (mid-epoch
        included) and RunInterrupted is raised; the CLI prints how to resume and exits 130/143/129.
        Running out of GPU memory becomes a TrainingError that says what to change.
        """
        with self._stop.installed(), self._oom_guard(), self._peer_failure_guard(), self._tensorboard():
            try:
                summary = self._fit(stop_after_epochs)
            finally:
                if self._folder_lock is not None:
                    self._folder_lock.release()
                    self._folder_lock = None
        # Said once the handlers are back (a Ctrl-C from here on is the CLI's to say): one that came while the
        # folder's lock was released or the blocks above ended was taken and never said (exit 0, no word)
        if self._stop.requested and self._last_saved is not None and self._last_saved[0][0] >= self.cfg.train.epochs:
            self.console.warn(f"{self._stop.name} came after the last training step: the run finished and its files "
                              "are complete (exit 0), nothing to resume")
        return summary

    def _claim_run_dir(self) -> None:
        """Rank 0 locks the run folder for this process (run_folder.claim_run_dir: a default-named one may
        move to <name>-2); every rank takes its choice, or its refusal."""
        claimed: Path | ConfigError | None = None
        if self.dist.is_main:
            try:
                claimed, self._folder_lock = claim_run_dir(self.cfg, self.run_dir, self.resume_path,
                                                           self._overwrite, self._default_run_dir)
            except ConfigError as e:
                claimed = e
        claimed = broadcast_object(claimed, self.dist)
        if isinstance(claimed, ConfigError):
            raise claimed
        if claimed != self.run_dir:
            self.console.info(f"{self.run_dir} was taken by a run started meanwhile: this one writes {claimed}")
            self.run_dir = claimed
            if self._tb is not None:
                self._tb.run_dir = claimed

    @contextlib.contextmanager
    def _tensorboard(self):
        """output.tensorboard: event files beside metrics.jsonl (rank 0). The package is checked before
        training, so a missing one is one clear error before any GPU time is spent; the file is opened
        after the warmup, where the run folder is set up."""
        self._tb = None
        if self.cfg.output.tensorboard and self.dist.is_main:
            from fasttrain.tb import TensorBoardWriter

            self._tb = TensorBoardWriter(self.run_dir)
        try:
            yield
        finally:
            if self._tb is not None:
                self._tb.close()

    @contextlib.contextmanager
    def _peer_failure_guard(self):
        """Under torchrun, a collective that fails because another rank died or hung becomes a
        TrainingError (one `error:` line from the CLI, exit 1) instead of a traceback."""
        try:
            yield
        except RuntimeError as e:
            if not self.dist.enabled or isinstance(e, TrainingError) or not is_peer_failure(e):
                raise
            raise TrainingError(peer_failure_message(e, self.dist)) from e

    def _reduce_epoch_stats(self, stats: torch.Tensor) -> torch.Tensor:
        """This rank's [loss_sum, correct, first_bad_step] -> the sums over ranks and the first bad
        step of any rank (-1: none), so every rank reports, and stops on, the same numbers."""
        sums = all_reduce_sum(stats[:2].clone(), self.dist)
        bad = stats[2:].clone()
        bad = all_reduce_min(torch.where(bad < 0, torch.full_like(bad, math.inf), bad), self.dist)
        return torch.cat([sums, torch.where(torch.isinf(bad), torch.full_like(bad, -1.0), bad)])

    @contextlib.contextmanager
    def _oom_guard(self):
        try:
            yield
        except torch.OutOfMemoryError as e:
            t = self.cfg.train
            detail = oom_detail(e)
            raise TrainingError(
                f"out of GPU memory with train.batch_size {t.batch_size} per process (eval_batch_size "
                f"{t.eval_batch_size}, precision {self.precision.name}, compile "
                f"{t.compile_mode if t.compile else 'off'}). To fit: {self._oom_fixes()}. "
                f"{self._kept_checkpoint_note()} ({detail})"
            ) from e

    def _oom_fixes(self) -> str:
        """What to change after running out of GPU memory: only settings that are not already taken (a
        batch of 1 cannot be halved, bf16 is no fix for a bf16 run, compile mode default for one without
        max-autotune)."""
        t = self.cfg.train
        fixes = []
        if t.batch_size > 1:
            fixes.append(f"lower --train.batch_size (e.g. {t.batch_size // 2}, and optim.lr with it)")
        if t.eval_batch_size > 1:
            fixes.append("lower --train.eval_batch_size")
        if t.compile and t.compile_mode.startswith("max-autotune"):
            fixes.append(f"do not use compile mode {t.compile_mode} (--train.compile_mode default)")
        if self.precision.name == "fp32":
            fixes.append("use --train.precision bf16")
        return "; ".join(fixes) or "free the GPU's memory held by other processes (nvidia-smi lists them)"

    def _stop_agreed(self) -> bool:
        """Whether to stop now, at an epoch start: a stop that came during the previous epoch's last
        steps, evaluation or checkpoint. Under torchrun the ranks agree with one blocking all-reduce
        (off the clock); inside epochs train_epoch agrees every few steps without a host sync."""
        return self._stop_agreement.now()

    def _stoppable_warmup(self) -> float:
        """warmup(), with a stop honoured at once (minutes of compiling on a CPU are not waited for):
        nothing of the run has trained or been written yet. Under torchrun the ranks keep stopping
        together at the epoch start instead."""
        if self.dist.enabled:
            return self.warmup()
        try:
            with self._stop.raising(self._stopped_in_warmup):
                return self.warmup()
        except RunInterrupted:
            raise
        except Exception:
            if self._stop.requested:  # raised inside the compiler, which wraps it (BackendCompilerFailed)
                raise self._stopped_in_warmup(self._stop.signum) from None
            raise

    def _stopped_in_warmup(self, signum: int) -> RunInterrupted:
        """A stop during the compile warmup: nothing trained since the start (or the resumed checkpoint)
        and nothing written (the folder is prepared after the warmup), so nothing is saved (the warmup's
        throwaway steps have changed the weights): the same command starts it again."""
        again = (f"it resumes {self.resume_path} again" if self.resume_path else "it starts the run afresh")
        return RunInterrupted(
            f"stopped by {self._stop.name} during the compile warmup, before any training step: nothing of "
            f"the run was written, nothing to save\nresume with:\n  the same command ({again})",
            signum, self.resume_path)

    def wall_seconds(self) -> float:
        """The run's wall time so far: this process's since fit() started, plus a resumed run's earlier
        processes' up to their last checkpoint (the time between processes is not the run's)."""
        here = time.perf_counter() - self._wall_start if self._wall_start is not None else 0.0
        return self._earlier_wall_seconds + here

    def _fit(self, stop_after_epochs: int | None = None) -> dict:
        self._wall_start = time.perf_counter()
        epochs = self.cfg.train.epochs
        if self.start_epoch >= epochs:
            kept = self._finished_already()
            if kept is not None:
                return kept
        self._announce()
        # cuDNN's autotuning (cudnn.benchmark, on unless train.deterministic) is first-call work like a
        # compile: warmed up off the clock on a GPU even for an eager run, or epoch 1 would carry it
        autotunes = self.device.type == "cuda" and torch.backends.cudnn.benchmark
        if (self.cfg.train.compile or self.use_graph or autotunes) and self.start_epoch < epochs:
            what = "compile + autotune" if self.cfg.train.compile else "autotune"
            what += " + CUDA graph capture" if self.use_graph else ""
            if self.cfg.train.compile:  # silent otherwise for up to a minute (a GPU) or several (a CPU)
                self.console.info(f"warming up ({what}) on throwaway steps, off the training clock "
                                  "(--train.compile false skips the compile) ...")
            warmup_seconds = self._stoppable_warmup()
            self.compile_seconds += warmup_seconds
            self.console.info(f"{what} warmup: {warmup_seconds:.1f} s (off the training clock)")
        self._claim_run_dir()  # after the warmup: a run stopped in it has written nothing
        if self.dist.is_main:
            fresh = prepare_run_dir(self.run_dir, self.cfg, self.resume_path, self.start_epoch, self.console.warn)
            if self._tb is not None:
                self._tb.start(self.start_epoch, fresh=fresh)

        last_row: dict = {}
        ema_bn_seconds = None
        end_epoch = epochs if stop_after_epochs is None else min(epochs, stop_after_epochs)
        for epoch in range(self.start_epoch, end_epoch):
            started = time.perf_counter()
            steps_here = self.steps_per_epoch - self._resumed_steps(epoch)
            row, final_recompute = self._run_epoch(epoch)
            ema_bn_seconds = final_recompute if final_recompute is not None else ema_bn_seconds
            self.epoch_images_per_second.append(row["images_per_second"])
            last = epoch + 1 == end_epoch
            # evaluated on the run's own schedule only: a stop_after_epochs stop must not add an evaluation
            # (its row and best_test_acc would differ from the uninterrupted run's)
            if (epoch + 1) % self.cfg.train.eval_every == 0 or epoch + 1 == epochs:
                self._evaluate_into(row)
                last_row = row
            if self.dist.is_main:
                append_metrics(self.run_dir, row)
                if self._tb is not None:
                    self._tb.log_epoch(row)
            if (epoch + 1) % self.cfg.train.checkpoint_every == 0 or last:
                self.save_checkpoint(epoch + 1)
            # printed after the epoch is on disk: a stop while printing (a closed terminal) loses nothing
            self.console.epoch_line(row, epochs, eta_seconds(time.perf_counter() - started, steps_here,
                                                             self.steps_per_epoch, epochs - epoch - 1))
        return self._finish(last_row, ema_bn_seconds, completed=end_epoch)

    def _finished_already(self) -> dict | None:
        """A resumed checkpoint that completed train.epochs: its kept summary (a finished run resumed again,
        a scheduler's restart: its files stay), else None and _fit measures it again (no training)."""
        epochs = self.cfg.train.epochs
        if resumes_another_folder(self.resume_path, self.run_dir):  # before anything is written there
            raise ConfigError(
                f"{self.resume_path} already completed {self.start_epoch} of {epochs} epochs: nothing to "
                f"continue in {str(self.run_dir)!r}. Raise --train.epochs to train on, or evaluate it with "
                f"python -m fasttrain eval {shlex.quote(str(self.resume_path))}")
        self.console.info(f"the checkpoint already completed {self.start_epoch} of {epochs} epochs: nothing to train")
        saved = run_summary(self.run_dir, self.start_epoch, self.train_seconds)  # the folder's own (above)
        if saved is not None:
            if self.dist.is_main and (self.run_dir / LOCK).exists():  # left by a process killed after its summary:
                lock, _ = FolderLock.take(self.run_dir)  # taken and released (removed), unless a live run holds it
                if lock is not None:
                    lock.release()
            self.console.info(f"its summary is kept as it is: {self.run_dir / SUMMARY}")
            self.console.summary(saved)
        return saved

    def _announce(self) -> None:
        cfg, con = self.cfg, self.console
        if self.device.type == "cpu":
            con.warn("training on the CPU: this is slow; use a CUDA GPU for real runs")
            kernels = [k for k, on in (("model.se_impl triton", cfg.model.se and cfg.model.se_impl == "triton"),
                                       ("optim.impl fused", cfg.optim.impl == "fused")) if on]
            if kernels:  # the Triton kernels need a GPU: their ops fall back to the PyTorch reference
                from fasttrain.kernels._utils import INTERPRET

                con.info(f"{' and '.join(kernels)}: " + (
                    "on the CPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1): very slow"
                    if INTERPRET else "on the CPU the PyTorch reference runs (the Triton kernels need a CUDA GPU)"))
        con.info(f"fasttrain: {cfg.name} | {self.params:,} params | {device_name(self.device)} | "
                 f"{self.precision.name} | data {self.data.source} | {self.steps_per_epoch} steps/epoch"
                 f" x {self.dist.world_size} rank(s) | run {self.run_dir}")
        if self.dist.enabled:
            per_rank = cfg.train.batch_size
            con.info(f"distributed: {self.dist.world_size} ranks | train.batch_size {per_rank} is per rank: global "
                     f"batch {per_rank * self.dist.world_size} | optim.lr {cfg.optim.lr:g} applies to that global "
                     "batch as given (no automatic scaling) | only rank 0 writes files and prints")

    def _resumed_steps(self, epoch: int) -> int:
        """The steps of `epoch` done before this process started: a checkpoint saved mid-epoch's, else 0."""
        return self.start_step if epoch == self.start_epoch else 0

    def _run_epoch(self, epoch: int) -> tuple[dict, float | None]:
        """Train one epoch on the clock, then, off it, read its sums once: its metrics row, and the seconds
        of the end-of-run EMA BN recompute when this was the run's last epoch (None otherwise). A stop
        signal checkpoints the position and raises RunInterrupted; a non-finite loss, TrainingError."""
        skip = self._resumed_steps(epoch)
        partial = self._epoch_partial if skip else None  # the sums of those steps, from the checkpoint
        if self._stop_agreed():  # a signal during the previous epoch's evaluation or checkpoint
            self._stop_run(epoch, skip, partial)
        lr = self.schedule.lr_at(epoch * self.steps_per_epoch)  # the epoch's first lr, resumed or not
        synchronize(self.device)
        t0 = time.perf_counter()
        with self.console.epoch_bar(epoch + 1, self.cfg.train.epochs, self.steps_per_epoch) as advance:
            sums = self.train_epoch(epoch, advance, skip=skip, partial=partial)
        synchronize(self.device)
        epoch_seconds = time.perf_counter() - t0
        self.train_seconds += epoch_seconds

        # ---- off the clock
        stats = torch.stack([sums["loss_sum"].double(), sums["correct"].double(), sums["first_bad_step"].double()])
        if self.dist.enabled:  # loss and accuracy over all ranks; the first bad step of any rank
            stats = self._reduce_epoch_stats(stats)
            sync_buffers(self.model, self.dist)  # rank 0's BN statistics everywhere: evaluated == saved
            if self.ema is not None:  # EMA'd BN statistics follow each rank's own: same fix
                sync_buffers(self.ema.module, self.dist)
        loss_sum, correct, first_bad = stats.tolist()
        self._check_finite(epoch, int(first_bad))  # before any save: a bad epoch is never checkpointed
        # the epoch so far over all ranks; loss_sum and correct include `partial`'s already (train_epoch)
        before = partial or {"seen": 0, "steps": 0}  # no partial: resumed from a checkpoint without one
        so_far = {"loss_sum": loss_sum, "correct": int(correct), "steps": before["steps"] + sums["steps"],
                  "seen": before["seen"] + sums["seen"] * self.dist.world_size}
        if skip + sums["steps"] < self.steps_per_epoch:  # stopped mid-epoch by a signal
            self._stop_run(epoch, skip + sums["steps"], so_far)
        final_recompute = None
        if epoch + 1 == self.cfg.train.epochs and self.ema_bn_recompute:
            # train.ema_bn recompute at the end of the run: it produces the final (evaluated, saved,
            # exported) model, so its time counts into train_seconds (summary: ema_bn_seconds)
            final_recompute = self._recompute_ema_bn()
            self.train_seconds += final_recompute
        seen_here = sums["seen"] * self.dist.world_size
        # After a mid-epoch resume, train_loss/train_acc cover the whole epoch (the stopped run's sums come
        # with its checkpoint), epoch_seconds and images_per_second the steps this process ran.
        row = {
            "epoch": epoch + 1, "lr": lr,
            "train_loss": loss_sum / max(1, so_far["steps"] * self.dist.world_size),
            "train_steps": so_far["steps"],
            "train_acc": 100.0 * correct / max(1, so_far["seen"]),
            "val_acc": None, "test_acc": None,
            "epoch_seconds": epoch_seconds,
            "images_per_second": seen_here / epoch_seconds if epoch_seconds > 0 else float("nan"),
        }
        return row, final_recompute

    def _evaluate_into(self, row: dict) -> None:
        """The epoch's evaluation (off the clock) into its metrics row."""
        if self.ema_bn_recompute:  # off the clock, but this evaluation needed it: time_to_accuracy
            # adds it to a time-to-target reached here (0.0 after the final one, on the clock)
            row["eval_ema_bn_seconds"] = self._recompute_ema_bn()
        for split, loader in self._eval_splits():
            row[f"{split}_acc"] = evaluate(self.eval_net, loader, self.precision, self.device, dist_info=self.dist)
        if row["test_acc"] is not None:
            self.best_test_acc = max(self.best_test_acc or 0.0, row["test_acc"])

    def _finish(self, last_row: dict, ema_bn_seconds: float | None, completed: int) -> dict:
        """The run's summary.json: the last evaluation's figures (measured again for a finished run that
        lost its summary), the TTA accuracies, the clocks and the provenance. `completed` epochs short of
        train.epochs (fit's stop_after_epochs, checkpointed): the figures so far, returned only."""
        cfg = self.cfg
        summary = {
            "name": cfg.name, "params": self.params, "epochs": cfg.train.epochs,
            "final_test_acc": last_row.get("test_acc"), "best_test_acc": self.best_test_acc,
            "final_val_acc": last_row.get("val_acc"),
            "final_test_acc_tta": None, "final_val_acc_tta": None, "tta_mode": cfg.train.tta,
            "eval_weights": "ema" if self.ema is not None else "model", "ema_decay": cfg.train.ema_decay,
            # the EMA's BN statistics: average | recompute (None: no EMA); with recompute, the seconds of the
            # final recompute, which train_seconds includes (None when this process did not run it)
            "ema_bn": cfg.train.ema_bn if self.ema is not None else None, "ema_bn_seconds": ema_bn_seconds,
            # model.stem_init whiten: the seconds of the whitening, which train_seconds includes (None when this
            # process did not compute it: kaiming, or a resumed run)
            "stem_init": cfg.model.stem_init, "stem_init_seconds": self.stem_init_seconds,
            # the clocks cover all of a resumed run's processes (see __init__); images_per_second: the mean
            # of the epochs' (after a mid-epoch resume, that epoch's covers the steps its last process ran)
            "train_seconds": self.train_seconds, "compile_seconds": self.compile_seconds,
            "wall_seconds": self.wall_seconds(),
            "images_per_second": (sum(rates) / len(rates)) if (rates := self.epoch_images_per_second) else None,
            "device": device_name(self.device), "world_size": self.dist.world_size,
            "precision": self.precision.name, "torch": torch.__version__, "git_sha": self.git_sha,
            "data_source": self.data.source, "run_dir": str(self.run_dir),
        }
        if completed < cfg.train.epochs:
            self.console.info(f"stopped after epoch {completed} of {cfg.train.epochs} (stop_after_epochs); "
                              f"checkpoint saved: {self.run_dir / LAST}")
            return summary
        if self.start_epoch >= cfg.train.epochs:  # a finished run without its summary (stopped while writing
            # it): the final model is the checkpoint's, so its figures are measured again
            for split, loader in self._eval_splits():
                summary[f"final_{split}_acc"] = evaluate(self.eval_net, loader, self.precision, self.device,
                                                         dist_info=self.dist)
        if cfg.train.tta != "none":
            for split, loader in self._eval_splits():
                summary[f"final_{split}_acc_tta"] = evaluate(self.eval_net, loader, self.precision, self.device,
                                                             tta=cfg.train.tta, dist_info=self.dist, fill=self.eval_fill)
        if self.dist.is_main:
            write_text_atomic(self.run_dir / SUMMARY, json.dumps(summary, indent=2) + "\n")
        self.console.summary(summary)  # a stop during the last evaluation or the summary: fit says it
        return summary
