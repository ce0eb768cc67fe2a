"""A run's folder: which folder a run writes to, what may be there already, and its metrics.jsonl.

The rules (README, "Command line"): a folder that holds a run is refused unless this run resumes one of
its own checkpoints or `--overwrite` is given; a run resumed into a new folder starts its metrics with the
source run's epochs; a fresh or moved run never inherits another run's checkpoints or summary.
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Callable

from fasttrain.checkpoint import LAST, PREVIOUS, checkpoint_candidates, holds_run
from fasttrain.config import Config, ConfigError, save_config
from fasttrain.files import write_text_atomic

METRICS = "metrics.jsonl"
SUMMARY = "summary.json"


def resumes_another_folder(resume_path: Path | None, run_dir: Path) -> bool:
    """Whether the resumed checkpoint lies outside the run folder (a run continued somewhere new)."""
    # the file resolved first: a link to runs/A/last.pt resumes runs/A, wherever the link lies
    return resume_path is not None and resume_path.resolve().parent != Path(run_dir).resolve()


def choose_run_dir(cfg: Config, run_dir: str | Path | None, resume_path: Path | None, overwrite: bool) -> Path:
    """The folder this run writes to: the argument, else output.dir, else the resumed checkpoint's
    folder, else runs/<config>-<time>. A folder that holds another run is a ConfigError naming the fix."""
    if run_dir is None and cfg.output.dir:
        run_dir = cfg.output.dir
    if run_dir is None and resume_path is not None:
        run_dir = resume_path.parent
    if run_dir is None:
        run_dir = Path("runs") / f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = Path(run_dir)
    held = holds_run(run_dir)
    if held and resume_path is None and not overwrite:
        if not checkpoint_candidates(run_dir):  # it stopped or failed before its first checkpoint
            raise ConfigError(
                f"the output folder {str(run_dir)!r} holds the config.yaml of a run that saved no checkpoint "
                "(it stopped or failed before its first): pass --overwrite to replace it, or another --output.dir"
            )
        raise ConfigError(
            f"the output folder {str(run_dir)!r} already holds a run: pass --resume "
            f"{run_dir / LAST} (or --resume auto) to continue it, --overwrite to replace it, "
            "or another --output.dir"
        )
    if held and resumes_another_folder(resume_path, run_dir) and not overwrite:
        raise ConfigError(
            f"--resume {resume_path} continues a run of another folder, but the output folder "
            f"{str(run_dir)!r} already holds a run of its own: pass an --output.dir that holds no run "
            f"(or leave it out to continue in {str(resume_path.parent)!r}), or --overwrite to replace "
            "that run")
    _check_writable(run_dir)
    return run_dir


def _check_writable(run_dir: Path) -> None:
    """Refuse a run folder this process cannot write before any training (its first write is after the
    first epoch: that epoch, and a half-updated folder, would be lost)."""
    existing = run_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"the output folder {str(run_dir)!r} cannot be made: {str(existing)!r} is a file; "
                          "choose another --output.dir")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"the output folder {str(run_dir)!r} is not writable ({str(existing)!r} refuses new "
                          "files): choose a writable --output.dir")


def prepare_run_dir(run_dir: Path, cfg: Config, resume_path: Path | None, completed_epochs: int,
                    warn: Callable[[str], None]) -> bool:
    """Set the folder up for the run (rank 0, after the compile warmup, so that a run stopped in it has
    written nothing): the resolved config.yaml, and metrics.jsonl cut back to the checkpoint's epochs (or
    the source run's, for a run resumed into a new folder). Returns whether the run starts the folder
    afresh (a fresh run, or a moved one): then an old run's last/prev.pt must not become its fallback or
    --resume auto pick, nor its summary.json the figures `export` or a restart reads for this run."""
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    moved = resumes_another_folder(resume_path, run_dir)
    keep_metrics(run_dir, completed_epochs, resume_path.resolve().parent / METRICS if moved else None, warn)
    fresh = resume_path is None or moved
    if fresh:
        for name in (LAST, PREVIOUS, SUMMARY):
            (run_dir / name).unlink(missing_ok=True)
    return fresh


def append_metrics(run_dir: Path, row: dict) -> None:
    with open(run_dir / METRICS, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")


def keep_metrics(run_dir: Path, completed_epochs: int, source: Path | None, warn: Callable[[str], None]) -> None:
    """metrics.jsonl keeps the rows up to the checkpoint, so that a resumed run never holds an epoch
    twice. `source`: the resumed run's own file when it is continued in a new folder, whose curves
    then start with the source run's epochs (replacing what the folder held)."""
    path = run_dir / METRICS
    try:
        lines = (source or path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        if source is None:
            return
        lines = []
    rows = [(line, decoded_row(line)) for line in lines if line.strip()]
    torn = sum(row is None for _, row in rows)
    if torn:  # a write cut by a kill or a full disk: that row's epoch is after the checkpoint, or logged again
        warn(f"{source or path}: dropped {torn} unreadable line(s)")
    keep = [line for line, row in rows if row is not None and row.get("epoch", math.inf) <= completed_epochs]
    write_text_atomic(path, "".join(line + "\n" for line in keep))


def decoded_row(line: str) -> dict | None:
    """A metrics.jsonl line as its row, or None when it is not one (a torn write)."""
    try:
        row = json.loads(line)
    except ValueError:
        return None
    return row if isinstance(row, dict) else None
