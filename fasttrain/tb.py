"""TensorBoard event files for a run (`output.tensorboard: true`), one scalar per metrics field per epoch.

The `tensorboard` package is the optional extra ``tensorboard``; torch's SummaryWriter needs it.
Events go into the run folder itself, so `tensorboard --logdir runs/` lists each run by its folder name.
"""
from __future__ import annotations

from pathlib import Path

INSTALL_HINT = "pip install 'fasttrain-resnet[tensorboard]'"


class TensorBoardWriter:
    def __init__(self, run_dir: str | Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:  # torch raises this when the tensorboard package is missing
            raise ImportError(f"output.tensorboard needs the tensorboard package, which is not installed: "
                              f"{INSTALL_HINT} (or set output.tensorboard false)") from e
        self.run_dir = Path(run_dir)
        self.writer = SummaryWriter(log_dir=str(self.run_dir))

    def log_epoch(self, row: dict) -> None:
        """Every numeric field of a metrics row becomes a scalar at step = row["epoch"].

        None (an epoch without evaluation) and booleans are skipped; NaN/inf are written as they are,
        so a diverging run shows in the curves. Flushed per epoch (off the training clock) so a live
        TensorBoard sees each epoch as it ends rather than every two minutes.
        """
        step = int(row["epoch"])
        for key, value in row.items():
            if key == "epoch" or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            self.writer.add_scalar(key, float(value), global_step=step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()

    def __enter__(self) -> "TensorBoardWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
