"""TensorBoard event files for a run (`output.tensorboard: true`), one scalar per metrics field per epoch.

The `tensorboard` package is the optional extra ``tensorboard``; torch's SummaryWriter needs it.
Events go into the run folder itself, so `tensorboard --logdir runs/` lists each run by its folder name.
"""
from __future__ import annotations

from pathlib import Path

INSTALL_HINT = "pip install 'fasttrain-resnet[tensorboard]'"


class TensorBoardWriter:
    """Checks for the package when made; writes nothing until `start` (or the first epoch's row), so
    a run stopped before its first epoch leaves no event file behind."""

    def __init__(self, run_dir: str | Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:  # torch raises this when the tensorboard package is missing
            raise ImportError(f"output.tensorboard needs the tensorboard package, which is not installed: "
                              f"{INSTALL_HINT} (or set output.tensorboard false)") from e
        self.run_dir = Path(run_dir)
        self._summary_writer = SummaryWriter
        self.writer = None

    def start(self, completed_epochs: int, fresh: bool) -> None:
        """Open the event file. A fresh run (or --overwrite) deletes the folder's old event files, else
        TensorBoard would draw the old run's curves over the same epochs; a resumed run purges the
        epochs after its checkpoint, which the earlier process may have logged before it stopped
        (metrics.jsonl is trimmed the same way)."""
        if fresh:
            for old in self.run_dir.glob("events.out.tfevents.*"):
                old.unlink(missing_ok=True)
        purge = None if fresh else completed_epochs + 1  # rows are logged at step = epoch (1-based)
        self.writer = self._summary_writer(log_dir=str(self.run_dir), purge_step=purge)

    def log_epoch(self, row: dict) -> None:
        """Every numeric field of a metrics row becomes a scalar at step = row["epoch"].

        None (an epoch without evaluation) and booleans are skipped; NaN/inf are written as they are,
        so a diverging run shows in the curves. Flushed per epoch (off the training clock) so a live
        TensorBoard sees each epoch as it ends rather than every two minutes.
        """
        if self.writer is None:
            self.writer = self._summary_writer(log_dir=str(self.run_dir))
        step = int(row["epoch"])
        for key, value in row.items():
            if key == "epoch" or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            self.writer.add_scalar(key, float(value), global_step=step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()

    def __enter__(self) -> "TensorBoardWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
