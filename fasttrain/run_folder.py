"""A run's folder: which folder a run writes to, what may be there already, and its metrics.jsonl.

The rules (README, "Command line"): a folder that holds a run is refused unless this run resumes one of
its own checkpoints or `--overwrite` is given; a run resumed into a new folder starts its metrics with the
source run's epochs; a fresh or moved run never inherits another run's checkpoints or summary. One process
at a time writes a folder: it holds the folder's lock file from its first write to its end.
"""
from __future__ import annotations

import json
import os
import shlex
import socket
import time
from pathlib import Path
from typing import Callable

from fasttrain.checkpoint import LAST, PREVIOUS, checkpoint_candidates, holds_run
from fasttrain.config import Config, ConfigError, save_config
from fasttrain.files import naming, temp_files_of, write_text_atomic

try:
    import fcntl
except ImportError:  # not on Windows: no folder lock there
    fcntl = None

METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
CURVES = "curves.png"  # `python -m fasttrain plot`'s default image
LOCK = ".fasttrain.lock"  # held by the process writing the folder; removed when it ends
TB_EVENTS = "events.out.tfevents.*"  # TensorBoard's event files (output.tensorboard, fasttrain/tb.py)
WRITTEN_VIA_TEMP = ("config.yaml", METRICS, SUMMARY, LAST, PREVIOUS)  # replaced by a rename of .NAME.*.tmp


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
        found = checkpoint_candidates(run_dir)
        if not found:  # it stopped or failed before its first checkpoint
            raise ConfigError(
                f"the output folder {str(run_dir)!r} holds the config.yaml of a run that saved no checkpoint "
                "(it stopped or failed before its first): pass --overwrite to replace it, or another --output.dir"
            )
        if not (run_dir / "config.yaml").exists() and not (run_dir / LAST).is_file():  # e.g. exported weights
            raise ConfigError(
                f"the output folder {str(run_dir)!r} holds {', '.join(p.name for p in found)} but no run (no "
                f"config.yaml or {LAST}) to continue: pass another --output.dir, or --overwrite to write this run "
                "there beside them"
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
            f"(or --output.dir {shlex.quote(str(resume_path.parent))} to continue it there), or --overwrite to replace "
            "that run")
    _check_writable(run_dir)
    return run_dir


class FolderLock:
    """An exclusive flock on the run folder's lock file, held while one process writes the folder. The
    kernel drops it when the process dies, so a killed run leaves a stale file, never a stale lock."""

    def __init__(self, path: Path, fd: int | None):
        self.path, self._fd = path, fd

    @classmethod
    def take(cls, run_dir: Path) -> tuple[FolderLock | None, str]:
        """(the lock, "") or, when another process holds it, (None, who holds it: "pid N on HOST")."""
        run_dir.mkdir(parents=True, exist_ok=True)
        path = run_dir / LOCK
        if fcntl is None:
            return cls(path, None), ""
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 200).decode("utf-8", "replace").strip() or "another process"
                os.close(fd)
                return None, holder
            try:  # a holder unlinks the file before it unlocks: a lock on a file no longer at `path` guards nothing
                current = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                current = False
            if current:
                os.ftruncate(fd, 0)
                os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
                return cls(path, fd), ""
            os.close(fd)

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self._fd)
            self._fd = None


def claim_run_dir(cfg: Config, run_dir: Path, resume_path: Path | None, overwrite: bool,
                  default_name: bool) -> tuple[Path, FolderLock]:
    """Lock the run folder before the run's first write (rank 0, after the warmup) and check it again under
    the lock: another run may have started in it since choose_run_dir looked (two jobs launched at once).
    A default-named folder (runs/<config>-<time>) taken meanwhile gives way to <name>-2, -3, ...; a named
    one is a ConfigError naming the process that holds it."""
    names = [run_dir] + ([run_dir.with_name(f"{run_dir.name}-{i}") for i in range(2, 100)] if default_name else [])
    for candidate in names:
        lock, holder = FolderLock.take(candidate)
        if lock is None:
            if default_name:
                continue
            raise ConfigError(f"the output folder {str(candidate)!r} is in use by another fasttrain run ({holder}): "
                              "wait for it to end, or choose another --output.dir")
        try:
            return choose_run_dir(cfg, candidate, resume_path, overwrite), lock  # its checks, under the lock
        except ConfigError:
            lock.release()
            if not (default_name and holds_run(candidate)):
                raise
    raise ConfigError(f"the output folders {str(run_dir)!r} to {str(names[-1])!r} are all taken: "
                      "pass an --output.dir")


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
    remove_stale_temps(run_dir)
    save_config(cfg, run_dir / "config.yaml")
    moved = resumes_another_folder(resume_path, run_dir)
    keep_metrics(run_dir, completed_epochs, resume_path.resolve().parent / METRICS if moved else None, warn)
    fresh = resume_path is None or moved
    if fresh:  # nothing of a replaced run stays to pass for this one's (its curves included: TensorBoard's too,
        # also when this run writes none)
        for path in [run_dir / name for name in (LAST, PREVIOUS, SUMMARY, CURVES)] + list(run_dir.glob(TB_EVENTS)):
            path.unlink(missing_ok=True)
    return fresh


def remove_stale_temps(run_dir: Path) -> None:
    """Delete the temp files (files.write_atomic's) of the folder's own files that a process killed while writing
    one left behind (kill -9, a second signal during a checkpoint): this process holds the folder's lock, so
    no other is writing them."""
    for name in WRITTEN_VIA_TEMP:
        for path in temp_files_of(run_dir / name):  # .prev.pt.link.tmp (write_checkpoint's) included
            path.unlink(missing_ok=True)


def append_metrics(run_dir: Path, row: dict) -> None:
    with naming(run_dir / METRICS), open(run_dir / METRICS, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")


def keep_metrics(run_dir: Path, completed_epochs: int, source: Path | None, warn: Callable[[str], None]) -> None:
    """metrics.jsonl keeps the rows up to the checkpoint, so that a resumed run never holds an epoch
    twice. `source`: the resumed run's own file when it is continued in a new folder, whose curves
    then start with the source run's epochs (replacing what the folder held)."""
    path = run_dir / METRICS
    try:
        lines = (source or path).read_text(encoding="utf-8", errors="replace").splitlines()  # bad bytes: a bad line
    except FileNotFoundError:
        if source is None:
            return
        lines = []
    rows = [(line, decoded_row(line)) for line in lines if line.strip()]
    torn = sum(row is None for _, row in rows)
    if torn:  # a write cut by a kill or a full disk: that row's epoch is after the checkpoint, or logged again
        warn(f"{source or path}: dropped {torn} unreadable line(s)")
    keep = [line for line, row in rows if row is not None and row["epoch"] <= completed_epochs]
    write_text_atomic(path, "".join(line + "\n" for line in keep))


def decoded_row(line: str) -> dict | None:
    """A metrics.jsonl line as its row (a JSON object with a whole-number epoch), or None when it is not one
    (a torn write, a line edited by hand)."""
    try:
        row = json.loads(line)
    except ValueError:
        return None
    return row if isinstance(row, dict) and type(row.get("epoch")) is int else None
