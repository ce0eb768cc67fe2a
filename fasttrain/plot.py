"""`python -m fasttrain plot RUN_DIR`: a run's curves (loss, accuracy, learning rate, images/s) in one PNG.

matplotlib is the optional extra ``plot``. Figures are drawn on the Agg canvas directly (no pyplot),
so plotting never needs a display and never touches matplotlib's global backend state.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

from fasttrain.config import ConfigError
from fasttrain.files import write_atomic
from fasttrain.run_folder import CURVES, decoded_row

# what savefig can write; the file's suffix picks it (matplotlib's own list is larger, PNG is the point)
FORMATS = (".png", ".pdf", ".svg")

INSTALL_HINT = "pip install 'fasttrain-resnet[plot]'"


def new_figure(width: float, height: float):
    """An Agg-backed matplotlib Figure; ImportError with the install command when matplotlib is missing."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError(f"plotting needs matplotlib, which is not installed: {INSTALL_HINT}") from e
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def read_metrics(run_dir: Path) -> list[dict]:
    """The rows of RUN_DIR/metrics.jsonl; ConfigError (one clean CLI line) when there are none. A line that
    is not a row with an integer epoch (a write torn by a kill) is left out with a warning, as the trainer
    leaves it out on resume."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise ConfigError(f"{path} not found: RUN_DIR must be a fasttrain run folder (it holds metrics.jsonl "
                          "once the first epoch has finished)")
    rows, skipped = [], []
    # undecodable bytes make their line unreadable (left out with the others), not the whole file
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        row = decoded_row(line)  # None unless an object with a whole-number epoch
        if row is None:
            skipped.append(number)
            continue
        rows.append(row)
    if skipped:
        print(f"warning: {path}: left out {len(skipped)} line(s) that are not metrics rows (line "
              f"{', '.join(map(str, skipped[:5]))}{', ...' if len(skipped) > 5 else ''})", file=sys.stderr)
    if not rows:
        raise ConfigError(f"{path} holds no epochs yet: nothing to plot")
    return rows


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(epochs, values) where the row has a finite number for `key` (evaluation may skip epochs)."""
    points = [(r["epoch"], r[key]) for r in rows
              if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    return [e for e, _ in points], [v for _, v in points]


def _panel(ax, rows: list[dict], keys: list[tuple[str, str]], title: str, ylabel: str) -> None:
    for key, label in keys:
        epochs, values = _series(rows, key)
        if values:  # a single evaluated epoch still shows, as a marker
            ax.plot(epochs, values, marker="o" if len(values) < 30 else None, markersize=3, label=label)
    ax.set_title(title)
    ax.set_xlabel("epoch")
    ax.xaxis.get_major_locator().set_params(integer=True)  # epochs are whole numbers
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="best", fontsize="small")


def plot_run(run_dir: Path, out: Path | None = None) -> Path:
    """Draw loss, train/val/test accuracy, lr and images/s per epoch; return the PNG path
    (default RUN_DIR/curves.png)."""
    run_dir = Path(run_dir)
    out = Path(out) if out is not None else run_dir / CURVES
    if out.is_dir():
        raise ConfigError(f"--out {str(out)!r} is a folder: name the image file, e.g. {out / CURVES}")
    if out.suffix.lower() not in FORMATS:
        raise ConfigError(f"--out {str(out)!r}: the file name's suffix picks the format, one of "
                          f"{', '.join(FORMATS)}")
    rows = read_metrics(run_dir)
    fig = new_figure(11, 7.5)
    (loss_ax, acc_ax), (lr_ax, speed_ax) = fig.subplots(2, 2)
    _panel(loss_ax, rows, [("train_loss", "train")], "training loss", "cross-entropy")
    _panel(acc_ax, rows, [("train_acc", "train"), ("val_acc", "val"), ("test_acc", "test")],
           "accuracy", "top-1 %")
    _panel(lr_ax, rows, [("lr", "lr")], "learning rate (at the epoch's start)", "lr")
    _panel(speed_ax, rows, [("images_per_second", "train")], "training throughput", "images / s")
    best = max((r["test_acc"] for r in rows if isinstance(r.get("test_acc"), (int, float))), default=None)
    # resolved: `plot .` has a name too
    fig.suptitle(f"{run_dir.resolve().name}: {len(rows)} epoch(s)" + (f", best test {best:.2f}%" if best is not None
                                                                      else ""))
    out.parent.mkdir(parents=True, exist_ok=True)
    # a temp file renamed over OUT: a Ctrl-C while the image was written left OUT torn (0 bytes, or its first
    # chunks), the run folder's curves.png of an earlier plot lost
    write_atomic(out, lambda f: fig.savefig(f, dpi=110, format=out.suffix[1:].lower()))
    return out
