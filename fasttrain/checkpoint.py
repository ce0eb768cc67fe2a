"""Checkpoints: written atomically, checksummed, read with ``weights_only=True``, checked against the model.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts (never pickled objects),
so ``torch.load(weights_only=True)`` reads it and a crafted file cannot run code.

Crash safety (docs/ARCHITECTURE.md: the Layout table's checkpoint.py row and "Checkpoint contract"):
* every write goes to a temporary file in the run folder, is fsync'ed, then renamed over the target,
  so a crash (even kill -9) leaves the old file or the new one, never a torn one;
* the trainer keeps two generations, ``last.pt`` and ``prev.pt``: the new file is complete on disk
  before the old ``last.pt`` becomes ``prev.pt``, so a newest file damaged later still leaves a good one;
* each checkpoint carries a sha256 over its whole content (every tensor's bytes, every key and value).
  torch's zip reader does not check the stored CRCs, so a flipped bit inside a tensor would otherwise
  load silently; the checksum turns it into a CheckpointError and ``--resume auto`` falls back.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import shlex
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from fasttrain.files import write_atomic

FORMAT = "fasttrain-checkpoint-v1"
CHECKSUM_KEY = "checksum"
LAST = "last.pt"      # the newest checkpoint of a run
PREVIOUS = "prev.pt"  # the one before it, kept so that a damaged last.pt loses one checkpoint, not the run


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used, with a message that says why and what to do."""

    # under torchrun every rank reads the same file and checks it against the same config and rank count
    # (fasttrain.distributed.report_error: one rank per node prints it)
    every_rank = True


def _fsync_dir(folder: Path) -> None:
    """Make renames in `folder` durable (best effort: not every file system allows it)."""
    try:
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def _write_atomic(obj: Any, path: Path, before_rename: Callable[[], object]) -> None:
    """torch.save `obj` into a fsync'ed hidden temp file beside `path` (not matched by ``*.pt``), renamed over
    `path` after `before_rename()` (files.write_atomic: no temp file is left, whatever fails or is interrupted)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        write_atomic(path, lambda f: torch.save(obj, f), before_rename=before_rename)
    except BaseException as e:  # the temp file is gone already (write_atomic)
        if isinstance(e.__context__, KeyboardInterrupt):  # Ctrl-C inside torch.save: its zip writer's
            raise KeyboardInterrupt from None  # close then fails ("unexpected pos"); the cause is the Ctrl-C
        cause = _file_system_cause(e)
        if cause is not None:  # a full disk: torch's writer and the file's close say so without a name
            raise OSError(cause.errno, cause.strerror, str(path)) from e
        raise


def _file_system_cause(e: BaseException) -> OSError | None:
    """The nameless OSError (errno set: ENOSPC, EIO, EDQUOT) behind a failed write, also when torch's zip
    writer turned it into a RuntimeError ("unexpected pos") on its way out; None for anything else."""
    while e is not None:
        if isinstance(e, OSError) and e.errno is not None and not e.filename:
            return e
        e = e.__context__
    return None


# --------------------------------------------------------------------------------------------
# Checksum over the content (not the file bytes: the same state always gives the same digest)
# --------------------------------------------------------------------------------------------
def _digest(obj: Any, h) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)};".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())  # raw bytes, any dtype (bf16 included)
    elif isinstance(obj, dict):
        h.update(f"D{len(obj)};".encode())
        for key, value in obj.items():  # pickling keeps insertion order, so save and load agree
            _digest(key, h)
            _digest(value, h)
    elif isinstance(obj, (list, tuple)):
        h.update(f"{'L' if isinstance(obj, list) else 'U'}{len(obj)};".encode())
        for value in obj:
            _digest(value, h)
    else:  # None, bool, int, float, str, torch.dtype/device...: repr is exact for all of them
        h.update(f"{type(obj).__name__}:{obj!r};".encode())


def state_checksum(state: dict) -> str:
    """sha256 over everything in a checkpoint dict except the checksum entry itself."""
    h = hashlib.sha256()
    _digest({k: v for k, v in state.items() if k != CHECKSUM_KEY}, h)
    return "sha256:" + h.hexdigest()


def write_checkpoint(state: dict, path: str | Path, previous: str | None = PREVIOUS) -> Path:
    """Seal `state` with its checksum and write it to `path` atomically.

    With `previous` set, the file already at `path` is kept under that name. Order of operations:
    the new file is written and fsync'ed under a temp name first; then the old `path` is hard-linked
    to `previous` (through a temp name, so `previous` is also replaced atomically) and the new file is
    renamed over `path`. At every instant both names hold complete files, so kill -9 anywhere loses at
    most this checkpoint. Without hard links the old file is renamed instead (a moment with no `path`,
    during which ``--resume auto`` finds `previous`).
    """
    path = Path(path)
    sealed = dict(state)
    sealed[CHECKSUM_KEY] = state_checksum(state)
    _write_atomic(sealed, path, before_rename=lambda: _keep_previous(path, previous))
    _fsync_dir(path.parent)
    return path


def _keep_previous(path: Path, previous: str | None) -> None:
    """The file at `path` (if any) is kept as `previous`, just before the new one is renamed over it."""
    if previous is None or not path.exists():
        return
    keep = path.with_name(previous)
    try:
        link = keep.with_name(f".{previous}.link.tmp")
        link.unlink(missing_ok=True)
        os.link(path, link)
        os.replace(link, keep)
    except OSError:
        os.replace(path, keep)


def checkpoint_path_problem(path: str | Path) -> str | None:
    """Why `path` cannot be read as a checkpoint file, naming what its folder holds instead (the file
    meant is most often a neighbour: prev.pt, a typo); None for a file."""
    path = Path(path)
    if path.is_file():
        return None
    if path.is_dir():
        held = [str(p) for p in checkpoint_candidates(path)]
        return (f"{str(path)!r} is a folder, not a checkpoint: pass a checkpoint file"
                + (f" ({', '.join(held[:3])})" if held else " (it holds none)"))
    if not path.parent.is_dir():
        return f"checkpoint {str(path)!r} not found: there is no folder {str(path.parent)!r}"
    held = [p.name for p in checkpoint_candidates(path.parent)]
    return (f"checkpoint {str(path)!r} not found: {str(path.parent)!r} holds "
            + (", ".join(held[:4]) + (", ..." if len(held) > 4 else "") if held else "no checkpoint (*.pt)"))


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Read a checkpoint safely and verify its checksum; any problem is a CheckpointError naming the file."""
    path = Path(path)
    problem = checkpoint_path_problem(path)
    if problem:
        raise CheckpointError(problem)
    # a damaged last.pt is not the end of its run: the one before it is named wherever the file is refused
    fallback = (f". The run folder keeps the checkpoint before as {shlex.quote(str(path.parent / PREVIOUS))}: use "
                f"it instead (--resume auto --output.dir {shlex.quote(str(path.parent))} falls back to it)"
                if path.name == LAST and (path.parent / PREVIOUS).is_file() else "")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        # weights_only names a refused class or function by pickle's opcode, GLOBAL ("Unsupported global:
        # GLOBAL io.open ...", "unsupported GLOBAL posix.system whose module posix is blocked"); random
        # bytes fail as an unpickling error too, without one: corrupt
        if "GLOBAL" not in str(e):
            raise CheckpointError(f"checkpoint {str(path)!r} is corrupt or not a checkpoint (it was loaded with "
                                  f"weights_only=True, so nothing in it ran){fallback}") from None
        # weights_only met a global (a class, a function): what a crafted or whole-object pickle holds
        raise CheckpointError(
            f"{str(path)!r} holds pickled Python objects (a whole model saved with torch.save(model), or code), "
            "which could run code when loaded: refused, nothing in it ran. A fasttrain checkpoint holds "
            "tensors and plain values only (last.pt, or python -m fasttrain export)") from None
    except Exception as e:  # truncated zip, bad magic: refused (torch's own advice would be to load unsafely)
        detail = (str(e).strip().splitlines() or [""])[0]
        if "weights_only" in detail:  # torch's text goes on to advise loading with weights_only=False: never
            detail = "torch cannot read it with weights_only=True (an old torch.save format, or zeroed bytes)"
        else:
            detail = f"{type(e).__name__}: " + (detail if len(detail) <= 200 else detail[:197] + "...")
        raise CheckpointError(
            f"checkpoint {str(path)!r} is corrupt, truncated or not a fasttrain checkpoint "
            f"(it was loaded with weights_only=True, so nothing in it ran): {detail}{fallback}"
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT or "model" not in ckpt:
        raise CheckpointError(f"{str(path)!r} is not a fasttrain checkpoint (no '{FORMAT}' marker)")
    # the layout the readers rely on (a file sealed with the right marker by other code gave KeyErrors and
    # TypeErrors from deep inside eval): the weights as named tensors, the epoch a whole number
    model = ckpt["model"]
    if not isinstance(model, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in model.items()):
        raise CheckpointError(f"{str(path)!r} is not a fasttrain checkpoint: its 'model' is not a state dict of "
                              "named tensors")
    if "epoch" in ckpt and type(ckpt["epoch"]) is not int:
        raise CheckpointError(f"{str(path)!r} is not a fasttrain checkpoint: its 'epoch' is "
                              f"{type(ckpt['epoch']).__name__}, not a whole number")
    stored = ckpt.pop(CHECKSUM_KEY, None)
    if stored is None:
        raise CheckpointError(f"checkpoint {str(path)!r} has no checksum, so its content cannot be verified "
                              "(it was not written by this version of fasttrain, or was rewritten by hand)")
    if stored != state_checksum(ckpt):
        raise CheckpointError(f"checkpoint {str(path)!r} is corrupt: its content does not match the checksum "
                              f"stored with it (the file was damaged after it was written){fallback}")
    return ckpt


def saved_config(ckpt: dict, path: str | Path):
    """The Config a checkpoint (or exported weights file) was trained with, read as this version reads any
    config; a CheckpointError naming the file when it holds none, or one this version refuses (an unknown
    key from a newer fasttrain would otherwise read as a key the user typed)."""
    from fasttrain.config import ConfigError, config_from_dict

    values = ckpt.get("config")
    if not isinstance(values, dict):
        raise CheckpointError(f"{str(path)!r} holds no config (the settings it was trained with): it was not "
                              "written by fasttrain's trainer or export")
    try:
        return config_from_dict(values)
    except ConfigError as e:
        raise CheckpointError(f"the config saved in {str(path)!r} is not one this version of fasttrain reads "
                              f"({e}): a checkpoint of another version?") from None


WEIGHT_CHOICES = ("auto", "ema", "model")


def select_weights(ckpt: dict, weights: str, source: str) -> tuple[str, dict]:
    """("ema" | "model", that state_dict) of a loaded checkpoint. `weights`: auto (the EMA weights
    when the run kept an EMA, train.ema_decay > 0, else the model's) | ema | model."""
    if weights not in WEIGHT_CHOICES:
        raise ValueError(f"weights {weights!r}: expected one of {', '.join(WEIGHT_CHOICES)}")
    exported = ckpt.get("export")  # an exported weights file (python -m fasttrain export): one set, under "model"
    if isinstance(exported, dict) and exported.get("weights") in ("ema", "model"):
        held = exported["weights"]
        if weights not in ("auto", held):
            what = "the EMA's weights" if held == "ema" else "the model's weights (not the EMA's)"
            raise CheckpointError(f"{source} is an exported weights file that holds {what} only: use --weights "
                                  f"{held} (or auto)")
        return held, ckpt["model"]
    ema = ckpt.get("ema")
    if weights == "ema" and ema is None:
        raise CheckpointError(f"{source} holds no EMA weights (it was trained with train.ema_decay 0): "
                              "use --weights model (or auto)")
    used = "ema" if ema is not None and weights != "model" else "model"
    return used, ema if used == "ema" else ckpt["model"]


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


def rng_state(device: torch.device) -> dict:
    """The CPU generator's state, and on a GPU that one device's: not every visible GPU's, so a run
    saved on an 8-GPU node resumes where fewer GPUs are visible."""
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"].cpu())
    cuda = state.get("cuda")
    if isinstance(cuda, (list, tuple)):  # an older checkpoint: one state per GPU visible when saved
        cuda = cuda[device.index or 0] if device.type == "cuda" and (device.index or 0) < len(cuda) else None
    if cuda is not None and device.type == "cuda":
        torch.cuda.set_rng_state(cuda.cpu(), device)


def run_summary(run_dir: str | Path, epoch: int, train_seconds: float | None) -> dict | None:
    """The run folder's summary.json when it describes the checkpoint of `epoch` completed epochs and
    `train_seconds` of training (a run's final one: no other run shares its training seconds), else None."""
    try:
        summary = json.loads((Path(run_dir) / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(summary, dict) or summary.get("epochs") != epoch or summary.get("train_seconds") != train_seconds:
        return None
    return summary


def holds_run(folder: str | Path) -> bool:
    """Whether `folder` holds a run (its config.yaml or a checkpoint): what a new run must not overwrite."""
    folder = Path(folder)
    return (folder / "config.yaml").exists() or any(folder.glob("*.pt"))


def checkpoint_candidates(run_dir: str | Path) -> list[Path]:
    """The run folder's checkpoints, newest first: last.pt, prev.pt, then any other *.pt by mtime.

    The order of last.pt and prev.pt comes from how they are written (prev.pt is always the older
    one), not from file times, which a copy of the folder may have reset.
    """
    run_dir = Path(run_dir)
    named = [run_dir / LAST, run_dir / PREVIOUS]
    others = sorted((p for p in run_dir.glob("*.pt") if p not in named and p.is_file()),
                    key=lambda p: p.stat().st_mtime, reverse=True)
    return [p for p in named if p.is_file()] + others


def find_resume_checkpoint(run_dir: str | Path, warn: Callable[[str], None] = print) -> Path | None:
    """The newest checkpoint in `run_dir` that loads and verifies; broken ones are named in a warning
    and skipped. None when the folder holds no checkpoint at all; a CheckpointError when it holds some
    but none is usable (starting over silently would throw the run away)."""
    found = load_resume_checkpoint(run_dir, warn)
    return None if found is None else found[0]


def load_resume_checkpoint(run_dir: str | Path, warn: Callable[[str], None] = print) -> tuple[Path, dict] | None:
    """`find_resume_checkpoint`'s choice with its content, read and verified (on the CPU), so that the run
    resuming from it need not read it again."""
    candidates = checkpoint_candidates(run_dir)
    problems = []
    for path in candidates:
        try:
            ckpt = load_checkpoint(path)
        except CheckpointError as e:
            problems.append(str(e))
            warn(f"warning: skipping {path}: {e}")
            continue
        kind = ckpt.get("kind")
        if kind is None:  # a training checkpoint (an exported weights file says what it is)
            return path, ckpt
        problems.append(f"{path} is an exported {kind} file, not a training checkpoint")
        warn(f"warning: skipping {path}: an exported {kind} file (python -m fasttrain export), which has no "
             "optimizer state to resume from")
    if candidates:
        raise CheckpointError(f"no usable checkpoint in {str(run_dir)!r}: " + "; ".join(problems) + ". Copy a "
                              f"good checkpoint into {str(run_dir)!r} and run the same command again (--resume auto "
                              "tries every *.pt there), or start the run afresh with --overwrite instead of "
                              "--resume auto")
    return None
