"""What makes a Trainer resumable: the checkpoint it writes, writing it safely, taking a run back from one,
and a stop that saves the exact position and prints the command that continues it.

`Resumable` is a mixin of fasttrain.trainer.Trainer, kept apart so that trainer.py reads as the training
loop. Its methods use the Trainer's state (the model, optimizer, schedule, scaler, EMA, data, clocks, run
folder, console, distributed info) and two of its checks: `_check_weights_finite` (a diverged state is
never saved) and `_recompute_ema_bn` (a saved EMA is what evaluation uses).

A checkpoint holds everything an exact continuation needs, mid-epoch included: the weights, optimizer
(Lookahead's slow weights), schedule, scaler, EMA, every rank's RNG, the epoch's position and its partial
sums, the config and the run's clocks. It is a plain dict of tensors and builtins, read back with
weights_only=True (fasttrain.checkpoint): nothing in it can run code.
"""
from __future__ import annotations

import dataclasses
import os
import shlex
from pathlib import Path

import torch

from fasttrain.checkpoint import (FORMAT, LAST, PREVIOUS, CheckpointError, check_architecture, load_checkpoint,
                                  rng_state, saved_config, set_rng_state, unwrap, write_checkpoint)
from fasttrain.config import Config, EveryRankFlag, config_changes, config_to_dict
from fasttrain.data import data_location
from fasttrain.distributed import all_gather_objects, barrier
from fasttrain.export import KIND as EXPORT_KIND
from fasttrain.optim import with_hyperparameters_of
from fasttrain.run_folder import resumes_another_folder
from fasttrain.signals import RunInterrupted

ENGINE_MODEL_KEYS = ("se_impl", "max_params")  # model keys a resume may change: not the architecture


class TrainingError(EveryRankFlag, RuntimeError):
    """The run cannot go on (non-finite loss, out of memory, a checkpoint that cannot be written, ...): the
    message says why and what to do. Under torchrun most are one rank's own (its GPU's memory, its view of a
    dead peer, rank 0's write); a divergence, found in the weights every rank holds alike or on the first bad
    step the ranks agreed on, is raised with every_rank=True."""


class Resumable:
    """Checkpoints and resuming, for fasttrain.trainer.Trainer (see the module's docstring)."""

    # ---------------------------------------------------------------- writing
    def checkpoint_state(self, epoch: int, step_in_epoch: int = 0, rank_rng: list | None = None,
                         partial: dict | None = None) -> dict:
        """The checkpoint dict. `rank_rng`: every rank's RNG state in rank order (under torchrun,
        gathered by save_checkpoint), which a mid-epoch resume on as many ranks restores per rank.
        `partial`: a mid-epoch stop's sums of the epoch so far (_run_epoch), for its metrics row."""
        return {
            "format": FORMAT,
            "model": unwrap(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.schedule.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "ema": self.ema.state_dict() if self.ema is not None else None,  # train.ema_decay > 0
            "epoch": epoch,  # epochs completed
            # steps done of epoch `epoch` (0 at an epoch boundary; >0 after a stop on a signal):
            # resume skips that many batches of the epoch's (seed, epoch)-determined stream
            "step_in_epoch": step_in_epoch,
            # with step_in_epoch > 0: {loss_sum, correct, seen, steps} of those steps over all ranks, so the
            # resumed epoch's metrics row (train_loss, train_acc) is the uninterrupted run's
            "epoch_partial": partial if step_in_epoch else None,
            "steps_per_epoch": self.steps_per_epoch,
            "world_size": self.dist.world_size,  # ranks; train.batch_size is per rank
            "rng": rng_state(self.device),  # rank 0's: what a resume on another number of ranks uses
            "rng_per_rank": rank_rng,  # None for one process
            "config": config_to_dict(self.cfg),
            "params": self.params,
            "best_test_acc": self.best_test_acc,
            "train_seconds": self.train_seconds,
            "compile_seconds": self.compile_seconds, "wall_seconds": self.wall_seconds(),
            "epoch_images_per_second": self.epoch_images_per_second,
            "data_source": self.data.source,
            "precision": self.precision.name,  # as resolved: train.precision auto is bf16 on a GPU, fp32 on the CPU
            "torch": str(torch.__version__),  # a TorchVersion object would be refused by weights_only loading
        }

    def save_checkpoint(self, epoch: int, name: str = LAST, step_in_epoch: int = 0,
                        partial: dict | None = None) -> Path:
        """Write `name` atomically; for last.pt the previous one is kept as prev.pt.

        Only a last.pt of this run's own line is rotated into prev.pt: one this process wrote or
        resumed from. After `--resume auto` skipped a damaged last.pt (or a deliberate resume from
        prev.pt), the good prev.pt stays and the skipped file is simply replaced.
        Refuses (TrainingError) weights that are not finite, so a diverged state never replaces a
        good checkpoint, even when the loss of the steps before was still finite.
        """
        self._check_weights_finite(epoch, step_in_epoch)
        self._recompute_ema_bn()  # train.ema_bn recompute: a saved EMA is what evaluation uses (off the clock)
        path = self.run_dir / name
        rotate = (name == LAST and self._last_saved is not None
                  and Path(self._last_saved[1]).resolve() == path.resolve())
        # every rank's own randomness (dropout), for an exact mid-epoch resume (one small gather per save)
        rank_rng = all_gather_objects(rng_state(self.device), self.dist) if self.dist.enabled else None
        if self.dist.is_main:
            try:
                write_checkpoint(self.checkpoint_state(epoch, step_in_epoch, rank_rng, partial), path,
                                 previous=PREVIOUS if rotate else None)
            except OSError as e:  # a full disk, a folder gone read-only: nothing is replaced by a torn file
                raise TrainingError(
                    f"could not write the checkpoint {path}: {e.strerror or e}. {self._kept_checkpoint_note()} "
                    f"Free space in {self.run_dir} (or make it writable) and continue with:\n  "
                    f"{self._continue_command()}") from e
        barrier(self.dist)
        self._last_saved = ((epoch, step_in_epoch), path)
        return path

    def _kept_checkpoint_note(self) -> str:
        """The newest good checkpoint of this run's line: the one this process last wrote or resumed from
        (not whatever last.pt holds: `--resume auto` may have skipped it as damaged and gone on from prev.pt)."""
        if self._last_saved is not None:
            return f"The last good checkpoint ({self._last_saved[1]}) is kept."
        return "No checkpoint was written for this run."

    # ---------------------------------------------------------------- resuming
    def _load(self, path: Path, ckpt: dict | None = None) -> None:
        """Resume from the checkpoint at `path`; `ckpt`: its content when the caller already read it."""
        # Onto the CPU: load_state_dict copies every tensor to where its owner lives, and an optimizer
        # state left on the GPU by map_location (AdamW's per-tensor `step`) would be read back with
        # .item() on every step (load_checkpoint's default, which the callers that pass `ckpt` use too)
        if ckpt is None:
            ckpt = load_checkpoint(path, map_location="cpu")
        if ckpt.get("kind") == EXPORT_KIND:
            raise CheckpointError(f"{path} is an exported weights file (python -m fasttrain export): it has no "
                                  "optimizer state to resume from; evaluate it with python -m fasttrain eval "
                                  "--checkpoint, or resume from the run's last.pt")
        check_architecture(unwrap(self.model), ckpt["model"], str(path))
        saved = saved_config(ckpt, path)
        # the model section is the architecture, but for the switches that leave the weights' meaning
        # alone: how SE runs (se_impl) and the budget (max_params) may change, with the warning below
        engine = {k: getattr(self.cfg.model, k) for k in ENGINE_MODEL_KEYS}
        architecture = dataclasses.replace(saved.model, **engine)
        if architecture != self.cfg.model:
            changed = "; ".join(c for c in config_changes(dataclasses.replace(saved, model=architecture), self.cfg)
                                if c.startswith("model."))
            raise CheckpointError(f"{path} was trained with another model section than this config's ({changed}): "
                                  "drop the flag that changes it, or resume with the config saved in the run folder "
                                  "(config.yaml)")
        trained_on = ckpt.get("data_source")
        # another folder (FASTTRAIN_DATA unset: ./data, maybe downloaded there: the official images under a run
        # of the JPEG stand-in). The rest of the source (the split, the loader) is config: named in the warning
        # of config changes, and no --data.dir would bring it back
        if trained_on and data_location(trained_on) != data_location(self.data.source):
            self.console.warn(f"{path} was trained on {trained_on}; this run reads {self.data.source}. If that is "
                              "not the same data in another place, pass the --data.dir it was trained on")
        unwrap(self.model).load_state_dict(ckpt["model"])
        self._load_optimizer(path, ckpt["optimizer"], saved)
        self._warn_config_changes(path, saved)
        self._warn_other_precision(path, ckpt.get("precision"), saved)
        self.schedule.load_state_dict(ckpt["scheduler"])
        if self.scaler is not None and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        if self.ema is not None:
            if ckpt.get("ema") is not None:
                check_architecture(self.ema.module, ckpt["ema"], f"{path} (ema)")
                self.ema.load_state_dict(ckpt["ema"])
            else:
                self.ema.reset()
                self.console.warn(f"{path} holds no EMA weights (saved with train.ema_decay 0): "
                                  "the EMA starts from the resumed weights")
        self.start_epoch = int(ckpt["epoch"])
        self.start_step = int(ckpt.get("step_in_epoch", 0))
        partial = ckpt.get("epoch_partial")  # None in a checkpoint of an epoch boundary (or an older one)
        well_formed = isinstance(partial, dict) and all(
            isinstance(partial.get(k), (int, float)) for k in ("loss_sum", "correct", "seen", "steps"))
        saved_world = int(ckpt.get("world_size", 1))
        self._epoch_partial = (self._partial_on_these_ranks(partial, saved_world) if self.start_step and well_formed
                               else None)
        self._restore_rng(ckpt)
        saved_steps = int(ckpt.get("steps_per_epoch", self.steps_per_epoch))
        if self.start_step and saved_steps != self.steps_per_epoch:
            # the position inside the epoch only means something for the same batches
            cause = ("another train.batch_size or data subset): resume with the config saved in the run folder "
                     "(config.yaml)" if saved_world == self.dist.world_size else
                     f"steps per epoch are per rank, and it was saved by {saved_world} rank(s), this run has "
                     f"{self.dist.world_size}): resume it on {saved_world} rank(s)")
            raise CheckpointError(
                f"{path} was saved after step {self.start_step} of epoch {self.start_epoch + 1} with "
                f"{saved_steps} steps per epoch, but this run gives {self.steps_per_epoch} ({cause}")
        if saved_steps != self.steps_per_epoch:  # another batch size, number of ranks or data subset
            self.schedule.load_state_dict({"step_count": self.start_epoch * self.steps_per_epoch})
            saved_batch = saved.train.batch_size * saved_world
            batch = self.cfg.train.batch_size * self.dist.world_size
            change = (f"the global batch changes ({saved_batch} -> {batch})" if saved_batch != batch
                      else "the training images per epoch change")
            self.console.warn(
                f"{path} was trained with {saved_steps} steps per epoch on {saved_world} rank(s); "
                f"this run has {self.steps_per_epoch} on {self.dist.world_size}: {change}, and the "
                f"learning-rate schedule continues from epoch {self.start_epoch}")
        if self.start_step:
            self._warn_inexact_mid_epoch(path, ckpt)
        self.best_test_acc = ckpt.get("best_test_acc")
        self.train_seconds = float(ckpt.get("train_seconds", 0.0))
        self.compile_seconds = float(ckpt.get("compile_seconds", 0.0))
        self._earlier_wall_seconds = float(ckpt.get("wall_seconds", 0.0))
        rates = ckpt.get("epoch_images_per_second")  # absent from an older checkpoint: this process's only
        well_formed = isinstance(rates, list) and all(isinstance(r, (int, float)) for r in rates)
        self.epoch_images_per_second = [float(r) for r in rates][:self.start_epoch] if well_formed else []
        self._last_saved = ((self.start_epoch, self.start_step), path)
        mid = f" and {self.start_step} steps of epoch {self.start_epoch + 1}" if self.start_step else ""
        self.console.info(f"resumed {path} after epoch {self.start_epoch}{mid}")

    def _partial_on_these_ranks(self, partial: dict, saved_world: int) -> dict:
        """A mid-epoch stop's sums, for this run's number of ranks. Its loss_sum adds one batch loss per rank and
        step, and the epoch's train_loss divides by steps x this run's ranks: saved by another number of ranks,
        it is rescaled to as many batch losses per step, or the row mixes the two counts (2 -> 1 rank: 1.7x)."""
        if saved_world == self.dist.world_size:
            return partial  # as saved: an exact resume adds the same float32 numbers
        return {**partial, "loss_sum": partial["loss_sum"] * self.dist.world_size / saved_world}

    def _load_optimizer(self, path: Path, state: dict, saved: Config) -> None:
        """The optimizer's state, under this config's settings (after the model's weights: Lookahead new to
        the run starts from them)."""
        if saved.optim.name != self.cfg.optim.name:  # SGD's and AdamW's per-parameter states have nothing in common
            raise CheckpointError(f"{path} was trained with optim.name {saved.optim.name}, this config has "
                                  f"{self.cfg.optim.name}: resume with the config saved in the run folder (config.yaml)")
        try:  # under this config's momentum, weight decay, Lookahead... (a changed value is warned of below)
            self.optimizer.load_state_dict(with_hyperparameters_of(self.optimizer, state))
        except (ValueError, KeyError) as e:  # another optimizer, grouping or Lookahead setting
            raise CheckpointError(
                f"{path} holds optimizer state this config's optimizer cannot take ({e}); it was saved with "
                f"optim.name {saved.optim.name}, impl {saved.optim.impl}, lookahead_k {saved.optim.lookahead_k}, "
                f"decay_norm_and_bias {saved.optim.decay_norm_and_bias}"
                + (f", muon_se {saved.optim.muon_se}" if saved.optim.name == "muon" else "")
                + ": resume with the config saved in the "
                "run folder (config.yaml)") from e

    def _warn_config_changes(self, path: Path, saved: Config) -> None:
        """Changes from the saved config are allowed (a longer run, a new engine switch), but the user
        must know the run is not an exact continuation."""
        changed = config_changes(saved, self.cfg)
        if changed:
            schedule = any(c.startswith(("optim.", "train.epochs ", "train.batch_size ")) for c in changed)
            self.console.warn(f"{path} was trained with another config: {'; '.join(changed)}. The run goes on "
                              "under this config's values"
                              + (" (the learning-rate schedule follows its epochs and rates from here)"
                                 if schedule else "") + ": not an exact continuation")
        lookahead = saved.optim.lookahead_k > 0, self.cfg.optim.lookahead_k > 0
        if lookahead == (False, True):
            self.console.warn(f"{path} was trained without Lookahead: Lookahead starts here, its slow weights "
                              "the resumed ones")
        elif lookahead == (True, False):
            self.console.warn(f"{path} was trained with Lookahead: its slow weights are dropped and training goes on "
                              "from the fast weights it saved")

    def _warn_other_precision(self, path: Path, trained_in: str | None, saved: Config) -> None:
        """The same train.precision resolved to another precision (auto: bf16 on a GPU, fp32 on the CPU, so a
        run continued on the other kind of device): not a config change, so _warn_config_changes is silent,
        but the arithmetic differs. None: a checkpoint from before the key was saved. A changed train.precision is
        _warn_config_changes' to name."""
        if trained_in is None or trained_in == self.precision.name or saved.train.precision != self.cfg.train.precision:
            return
        self.console.warn(f"{path} was trained in {trained_in}; train.precision {self.cfg.train.precision} gives "
                          f"{self.precision.name} on {self.device.type}: not an exact continuation (pass "
                          f"--train.precision {trained_in} to go on in {trained_in})")

    def _restore_rng(self, ckpt: dict) -> None:
        """This rank's own RNG state when the checkpoint holds one per rank for this many ranks (under
        torchrun), else rank 0's. At an epoch boundary it hardly matters (train_epoch seeds each rank's
        stream per epoch); mid-epoch it is what makes dropout continue exactly on every rank."""
        per_rank = ckpt.get("rng_per_rank")
        self._rank_rng_restored = (self.dist.enabled and isinstance(per_rank, list)
                                   and len(per_rank) == self.dist.world_size)
        set_rng_state(per_rank[self.dist.rank] if self._rank_rng_restored else ckpt["rng"], self.device)

    def _warn_inexact_mid_epoch(self, path: Path, ckpt: dict) -> None:
        """A mid-epoch checkpoint resumed on another number of ranks (with the same steps per epoch, else
        _load refused it): the batches go on where they stopped, but not each rank's randomness. Allowed
        rather than refused: a preempted job restarted on another allocation keeps its partial epoch."""
        saved_world = int(ckpt.get("world_size", 1))
        if self._rank_rng_restored or (saved_world == 1 and not self.dist.enabled):
            return
        if saved_world == self.dist.world_size:  # a checkpoint without per-rank RNG states (hand-made)
            self.console.warn(f"{path} was saved in the middle of epoch {self.start_epoch + 1} without each "
                              "rank's RNG state: the ranks' dropout does not continue as saved (not an exact "
                              "continuation)")
            return
        self.console.warn(
            f"{path} was saved in the middle of epoch {self.start_epoch + 1} by {saved_world} rank(s) and is "
            f"resumed on {self.dist.world_size}: the data continues where it stopped, but the ranks' own "
            "randomness (dropout) and per-rank BatchNorm batches do not continue as saved: not an exact "
            f"continuation (resume on {saved_world} rank(s) for one)")

    # ---------------------------------------------------------------- a stop on a signal
    def _stop_run(self, epoch: int, step: int, partial: dict | None = None) -> None:
        """Checkpoint the position reached (unless exactly that is saved already), raise RunInterrupted.
        `partial`: the sums of the epoch's `step` steps (see checkpoint_state). A position saved only in
        another folder (a run continued here from there, stopped before its first step) is saved here too:
        this folder refuses a resume of another folder's checkpoint once it holds the run's config.yaml, and
        `--resume auto` here would find nothing and start over."""
        if self._last_saved is not None and self._last_saved[0] == (epoch, step) and not self._saved_elsewhere():
            path = self._last_saved[1]
        else:
            path = self.save_checkpoint(epoch, step_in_epoch=step, partial=partial)
        if step:
            where = f"epoch {epoch + 1}, step {step}/{self.steps_per_epoch}"
        else:
            where = f"the end of epoch {epoch}" if epoch else "the start of training"
        raise RunInterrupted(
            f"stopped by {self._stop.name} at {where}; checkpoint saved: {path}\n"
            f"resume with:\n  {self._resume_command(shlex.quote(str(path)))}\nor:\n  {self._resume_auto_command()}",
            self._stop.signum, path, announce=self.dist.is_main)

    def _resume_command(self, resume: str) -> str:
        """The command that continues this run from `resume` (a quoted path, or auto ...): copy-paste safe."""
        return (f"{self._resume_launcher()} -m fasttrain --config {shlex.quote(str(self.run_dir / 'config.yaml'))}"
                f"{self._device_flag} --resume {resume}")

    def _resume_auto_command(self) -> str:
        """The command that continues this run from the newest good checkpoint of its folder."""
        return self._resume_command(f"auto --output.dir {shlex.quote(str(self.run_dir))}")

    def _saved_elsewhere(self) -> bool:
        """This run's newest checkpoint lies in another folder: a run continued here that saved nothing here yet."""
        return self._last_saved is not None and resumes_another_folder(Path(self._last_saved[1]), self.run_dir)

    def _continue_command(self) -> str:
        """The command that continues this run from its newest good checkpoint: `--resume auto` in its folder,
        unless that checkpoint lies in another folder (a run continued here that saved nothing here yet: auto
        would start over). Then that checkpoint, into this folder, whose config.yaml and metrics.jsonl
        (nothing the checkpoint does not hold) --overwrite replaces."""
        if not self._saved_elsewhere():
            return self._resume_auto_command()
        return (self._resume_command(shlex.quote(str(self._last_saved[1])))
                + f" --output.dir {shlex.quote(str(self.run_dir))} --overwrite")

    def _resume_launcher(self) -> str:
        """What starts the resumed run: `python` for one process; under torchrun a launch of as many ranks,
        which continues a mid-epoch stop exactly (another number of ranks would not, see _load)."""
        if not self.dist.enabled:
            return "python"
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", self.dist.world_size))
        if per_node == self.dist.world_size:
            return f"torchrun --standalone --nproc_per_node={per_node}"
        return (f"torchrun --nnodes={self.dist.world_size // per_node} --nproc_per_node={per_node} "
                "[this job's --rdzv-* options, on every node]")
