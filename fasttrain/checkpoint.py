"""Checkpoints: written atomically, read with ``weights_only=True``, checked against the model.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts (never pickled objects),
so ``torch.load(weights_only=True)`` reads it and a crafted file cannot run code.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

FORMAT = "fasttrain-checkpoint-v1"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used, with a message that says why and what to do."""


def atomic_save(obj: Any, path: str | Path) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over `path`.

    A crash (even kill -9) leaves either the old file or the new one, never a torn one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Read a checkpoint safely; any problem is a CheckpointError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} not found")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, bad magic, or a pickle that asks for code: all refused
        raise CheckpointError(
            f"checkpoint {str(path)!r} is corrupt, truncated or not a fasttrain checkpoint "
            f"(it was loaded with weights_only=True, so nothing in it ran): {type(e).__name__}: {e}"
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT or "model" not in ckpt:
        raise CheckpointError(f"{str(path)!r} is not a fasttrain checkpoint (no '{FORMAT}' marker)")
    return ckpt


def check_architecture(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Refuse weights of another architecture, listing the mismatched keys."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shape = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
             for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shape:
        lines = []
        for title, keys in (("missing in checkpoint", missing), ("not in model", unexpected),
                            ("shape mismatch", shape)):
            if keys:
                shown = ", ".join(keys[:8]) + (f", ... ({len(keys)} in all)" if len(keys) > 8 else "")
                lines.append(f"  {title}: {shown}")
        raise CheckpointError(
            f"{source} holds weights of another architecture than this config's model:\n"
            + "\n".join(lines)
            + "\nUse the config the checkpoint was trained with (it is saved inside the checkpoint)."
        )


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under torch.compile and DistributedDataParallel wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def find_resume_checkpoint(run_dir: Path, warn=print) -> Path | None:
    """The newest checkpoint in `run_dir` that loads; broken ones are named in a warning and skipped."""
    candidates = sorted(Path(run_dir).glob("*.pt"), key=lambda p: p.stat().st_mtime, reverse=True)
    for path in candidates:
        try:
            load_checkpoint(path)
            return path
        except CheckpointError as e:
            warn(f"warning: skipping {path}: {e}")
    return None
