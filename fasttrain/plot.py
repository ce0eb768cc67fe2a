"""`python -m fasttrain plot RUN_DIR`: a run's curves (loss, accuracy, learning rate, images/s) in one PNG.

matplotlib is the optional extra ``plot``. Figures are drawn on the Agg canvas directly (no pyplot),
so plotting never needs a display and never touches matplotlib's global backend state.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from fasttrain.config import ConfigError

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
    """The rows of RUN_DIR/metrics.jsonl; ConfigError (one clean CLI line) when there are none."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise ConfigError(f"{path} not found: RUN_DIR must be a fasttrain run folder (it holds metrics.jsonl "
                          "once the first epoch has finished)")
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}, line {number}: not a JSON metrics row ({e})") from None
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
    rows = read_metrics(run_dir)
    fig = new_figure(11, 7.5)
    (loss_ax, acc_ax), (lr_ax, speed_ax) = fig.subplots(2, 2)
    _panel(loss_ax, rows, [("train_loss", "train")], "training loss", "cross-entropy")
    _panel(acc_ax, rows, [("train_acc", "train"), ("val_acc", "val"), ("test_acc", "test")],
           "accuracy", "top-1 %")
    _panel(lr_ax, rows, [("lr", "lr")], "learning rate (at the epoch's start)", "lr")
    _panel(speed_ax, rows, [("images_per_second", "train")], "training throughput", "images / s")
    best = max((r["test_acc"] for r in rows if isinstance(r.get("test_acc"), (int, float))), default=None)
    fig.suptitle(f"{run_dir.name}: {len(rows)} epoch(s)" + (f", best test {best:.2f}%" if best is not None else ""))
    out = Path(out) if out is not None else run_dir / "curves.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    return out
