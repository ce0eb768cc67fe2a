"""What a run prints: a progress bar per epoch, a line per epoch, and a summary table.

The bar advances from the Python step counter (never from GPU values), and rich redraws it from its
own thread a few times a second, so it costs the training loop no host sync. Without a terminal
(a log file, CI) there is no bar: each epoch prints one plain line.
"""
from __future__ import annotations

import contextlib
import math
import os
import sys
from typing import Iterator

from rich.console import Console as RichConsole
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text


def format_seconds(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class _OutlivingConsole(RichConsole):
    """rich's console, except when what reads stdout goes away (`| head`, a killed `tee`): rich would end
    the program (SystemExit 1) in the middle of an epoch; the run goes on silently, its files complete."""

    def on_broken_pipe(self) -> None:
        self.quiet = True
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # and Python's flush at exit finds a sink, not the dead pipe
        os.close(devnull)


class RunConsole:
    def __init__(self, progress: bool = True, enabled: bool = True):
        self.enabled = enabled  # only rank 0 of a distributed run prints
        # what is printed holds the user's text (names, paths): no emoji codes (":smile:") are replaced in it,
        # and no rich markup ("[exp]" vanished, "[/b]" ended the run) is read from it (info, warn, summary)
        self.rich = _OutlivingConsole(highlight=False, emoji=False)
        if not self.rich.is_terminal:  # a log file: one line per message, never wrapped (tables: 240 columns)
            self.rich = _OutlivingConsole(highlight=False, emoji=False, width=240, soft_wrap=True)
        self.show_bar = progress and enabled and self.rich.is_terminal

    def print(self, *args, **kwargs) -> None:
        if self.enabled:
            self.rich.print(*args, **kwargs)

    def info(self, message: str) -> None:
        self.print(Text(message))

    def warn(self, message: str) -> None:
        self.print(Text.assemble(("warning:", "bold yellow"), " ", message))

    @contextlib.contextmanager
    def epoch_bar(self, epoch: int, epochs: int, steps: int) -> Iterator:
        """Yield `advance(n=1)`, called once per training step; a no-op without a terminal."""
        if not self.show_bar:
            yield lambda n=1: None
            return
        columns = (TextColumn(f"epoch {epoch}/{epochs}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn())
        with Progress(*columns, console=self.rich, transient=True, refresh_per_second=4) as bar:
            task = bar.add_task("train", total=steps)
            yield lambda n=1: bar.advance(task, n)

    def epoch_line(self, row: dict, epochs: int, eta_seconds: float) -> None:
        parts = [f"epoch {row['epoch']:>3}/{epochs}", f"lr {row['lr']:.4g}",
                 f"loss {row['train_loss']:.4f}", f"train {row['train_acc']:6.2f}%"]
        for key, label in (("val_acc", "val"), ("test_acc", "test")):
            if row.get(key) is not None:
                parts.append(f"{label} {row[key]:6.2f}%")
        parts += [f"{row['epoch_seconds']:.2f}s", f"{row['images_per_second']:,.0f} img/s",
                  f"eta {format_seconds(eta_seconds)}"]
        self.print(Text("  ".join(parts)))

    def summary(self, summary: dict) -> None:
        table = Table(title="fasttrain run summary", show_header=False)
        table.add_column("key", style="bold")
        table.add_column("value")
        fmt = {
            "params": lambda v: f"{v:,}",
            "final_test_acc": lambda v: f"{v:.2f}%", "best_test_acc": lambda v: f"{v:.2f}%",
            "final_val_acc": lambda v: f"{v:.2f}%", "final_test_acc_tta": lambda v: f"{v:.2f}%",
            "final_val_acc_tta": lambda v: f"{v:.2f}%",
            "train_seconds": lambda v: f"{v:.2f} s", "compile_seconds": lambda v: f"{v:.2f} s",
            "wall_seconds": lambda v: f"{v:.2f} s", "images_per_second": lambda v: f"{v:,.0f}",
        }
        for key in ("params", "epochs", "final_test_acc", "final_test_acc_tta", "best_test_acc",
                    "final_val_acc", "final_val_acc_tta", "train_seconds", "compile_seconds", "wall_seconds",
                    "images_per_second", "device", "torch", "git_sha", "run_dir"):
            if summary.get(key) is not None:
                table.add_row(key, Text(fmt.get(key, str)(summary[key])))
        self.print(table)
