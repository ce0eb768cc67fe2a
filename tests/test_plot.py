"""Run visualisation: `python -m fasttrain plot RUN_DIR` and the TensorBoard writer."""
import json
import subprocess
import sys

import pytest

from fasttrain.cli import main
from fasttrain.config import ConfigError
from fasttrain.plot import plot_run

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_run(run_dir, rows):
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run_dir


def metrics_rows(epochs=3):
    """Rows as the trainer writes them; evaluation only on odd epochs, as with train.eval_every 2."""
    return [{"epoch": e, "lr": 0.1 / e, "train_loss": 2.3 / e, "train_steps": 10, "train_acc": 10.0 * e,
             "val_acc": None, "test_acc": 12.0 * e if e % 2 else None, "epoch_seconds": 1.5,
             "images_per_second": 1000.0 + e} for e in range(1, epochs + 1)]


def run_cli(*args, prelude=""):
    """`python -m fasttrain ARGS` in a fresh interpreter, after `prelude` (e.g. hiding a package)."""
    code = f"import sys; {prelude}from fasttrain.cli import main; sys.exit(main({list(args)!r}))"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_plot_run_writes_png(tmp_path):
    run = write_run(tmp_path / "run", metrics_rows())
    out = plot_run(run, None)
    assert out == run / "curves.png"
    data = out.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 10_000


def test_plot_single_epoch_and_explicit_out(tmp_path):
    run = write_run(tmp_path / "run", metrics_rows(epochs=1))
    out = plot_run(run, tmp_path / "figs" / "one.png")
    assert out == tmp_path / "figs" / "one.png" and out.read_bytes().startswith(PNG_SIGNATURE)


@pytest.mark.parametrize("content", [None, "", "\n\n"])
def test_plot_without_epochs_is_a_clear_error(tmp_path, content):
    run = tmp_path / "run"
    run.mkdir()
    if content is not None:
        (run / "metrics.jsonl").write_text(content)
    with pytest.raises(ConfigError, match="metrics.jsonl"):
        plot_run(run, None)


def test_plot_cli(tmp_path, capsys):
    run = write_run(tmp_path / "run", metrics_rows())
    assert main(["plot", str(run), "--out", str(tmp_path / "c.png")]) == 0
    assert (tmp_path / "c.png").read_bytes().startswith(PNG_SIGNATURE)
    assert main(["plot", str(tmp_path / "nothing")]) == 2  # one clean error line, exit code 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "metrics.jsonl" in err and err.count("\n") == 1


def test_plot_leaves_out_lines_that_are_not_rows_and_refuses_an_out_it_cannot_write(tmp_path, capsys):
    """A write torn by a kill (the trainer drops such a line on resume), or JSON that is not a row: left
    out with a warning. An --out that is a folder or has no image suffix: exit 2, nothing written."""
    run = write_run(tmp_path / "run", metrics_rows())
    with open(run / "metrics.jsonl", "ab") as f:  # and bytes that are no UTF-8 (a traceback, not a left-out line)
        f.write(b'[1, 2]\n{"epoch": "4"}\n\xff\xfe garbage\n{"epoch": 4, "lr": 0.0')
    assert main(["plot", str(run)]) == 0
    err = capsys.readouterr().err
    assert "left out 4 line(s) that are not metrics rows (line 4, 5, 6, 7)" in err
    assert (run / "curves.png").read_bytes().startswith(PNG_SIGNATURE)
    # where the file system refuses it, OUT is named, not the hidden temp file beside it
    assert main(["plot", str(run), "--out", "/proc/c.png"]) == 1
    assert capsys.readouterr().err.endswith("\nerror: /proc/c.png: No such file or directory\n")
    for out, why in ((tmp_path, "is a folder"), (tmp_path / "c.txt", "the file name's suffix picks the format")):
        assert main(["plot", str(run), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and why in err and err.count("\n") == 1
    assert not (tmp_path / "c.txt").exists()


def test_plot_draws_each_series_without_missing_or_non_finite_points(tmp_path, monkeypatch, capsys):
    """What the figure shows: train/val/test accuracy as three labelled lines, each point only where its row
    has a finite number (a diverged NaN loss or an inf is left out, not drawn off the scale); a row whose
    epoch is JSON `true` is no row; the title's best test accuracy is the highest one. An --out suffix in
    capitals (C.PNG) still picks PNG."""
    import fasttrain.plot as plot_module

    rows = metrics_rows(epochs=4)
    for row in rows:
        row["val_acc"] = 9.0 * row["epoch"]
    rows[1]["train_loss"], rows[2]["val_acc"] = float("nan"), float("inf")
    rows.insert(1, {**rows[0], "epoch": True, "test_acc": 99.0})  # bool is an int to Python, but no epoch
    run = write_run(tmp_path / "run", rows)
    figures = []
    real_new_figure = plot_module.new_figure
    monkeypatch.setattr(plot_module, "new_figure", lambda *size: figures.append(real_new_figure(*size)) or figures[-1])
    out = plot_run(run, tmp_path / "C.PNG")
    assert out.read_bytes().startswith(PNG_SIGNATURE)
    [fig] = figures
    loss_ax, acc_ax, _, _ = fig.axes

    def drawn(ax):
        return {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.get_lines()}

    assert drawn(acc_ax) == {"train": ([1, 2, 3, 4], [10.0, 20.0, 30.0, 40.0]), "val": ([1, 2, 4], [9.0, 18.0, 36.0]),
                             "test": ([1, 3], [12.0, 36.0])}
    assert drawn(loss_ax) == {"train": ([1, 3, 4], [2.3, 2.3 / 3, 2.3 / 4])}
    assert fig.get_suptitle() == "run: 4 epoch(s), best test 36.00%"
    assert "left out 1 line(s) that are not metrics rows (line 2)" in capsys.readouterr().err


def test_plot_without_matplotlib_says_how_to_install(tmp_path):
    run = write_run(tmp_path / "run", metrics_rows())
    proc = run_cli("plot", str(run), prelude="sys.modules['matplotlib'] = None; ")  # as if not installed
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "pip install 'fasttrain-resnet[plot]'" in proc.stderr
    assert not (run / "curves.png").exists()


# ------------------------------------------------------------------------------------- TensorBoard
def test_tensorboard_writer_logs_every_numeric_field(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from fasttrain.tb import TensorBoardWriter

    rows = metrics_rows()
    with TensorBoardWriter(tmp_path) as writer:
        for row in rows:
            writer.log_epoch(row)
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert set(events.Tags()["scalars"]) == {"lr", "train_loss", "train_steps", "train_acc", "test_acc",
                                             "epoch_seconds", "images_per_second"}  # None fields skipped
    assert _scalars(tmp_path, "test_acc") == [(1, 12.0), (3, 36.0)]
    assert [step for step, _ in _scalars(tmp_path, "lr")] == [1, 2, 3]


def _scalars(run_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


def test_tensorboard_resume_purges_the_epochs_after_the_checkpoint(tmp_path):
    """A process logged epochs 1-3 but checkpointed after 1; the resumed one logs 2-3 again. TensorBoard
    must show each epoch once, with the resumed values, as metrics.jsonl does."""
    from fasttrain.tb import TensorBoardWriter

    with TensorBoardWriter(tmp_path) as first:
        first.start(completed_epochs=0, fresh=True)
        for epoch in (1, 2, 3):
            first.log_epoch({"epoch": epoch, "train_loss": 10.0 + epoch})
    with TensorBoardWriter(tmp_path) as resumed:
        resumed.start(completed_epochs=1, fresh=False)
        for epoch in (2, 3):
            resumed.log_epoch({"epoch": epoch, "train_loss": 20.0 + epoch})
    assert _scalars(tmp_path, "train_loss") == [(1, 11.0), (2, 22.0), (3, 23.0)]


def test_tensorboard_fresh_start_deletes_old_event_files_and_writes_nothing_before(tmp_path):
    from fasttrain.tb import TensorBoardWriter

    with TensorBoardWriter(tmp_path) as old:
        old.log_epoch({"epoch": 1, "train_loss": 1.0})
    (tmp_path / "keep.txt").write_text("not an event file")
    writer = TensorBoardWriter(tmp_path)
    assert len(list(tmp_path.glob("events.out.tfevents.*"))) == 1  # made, not started: nothing written
    with writer:
        writer.start(completed_epochs=0, fresh=True)
        writer.log_epoch({"epoch": 1, "train_loss": 2.0})
    assert len(list(tmp_path.glob("events.out.tfevents.*"))) == 1 and (tmp_path / "keep.txt").exists()
    assert _scalars(tmp_path, "train_loss") == [(1, 2.0)]


def test_tensorboard_epoch_is_on_disk_before_close(tmp_path, monkeypatch):
    """Each epoch is flushed as it is logged: a live TensorBoard (or a crash before close) sees every epoch
    that ended, not only what SummaryWriter's two-minute timer flushed. Checked where it matters most: on a
    file system without append (an object store, e.g. S3), where tensorboard's writer keeps the records in a
    temporary file until a flush (the local file system is made to look like one)."""
    from tensorboard.compat.tensorflow_stub.io import gfile

    from fasttrain.tb import TensorBoardWriter

    monkeypatch.delattr(gfile.LocalFileSystem, "append")
    with TensorBoardWriter(tmp_path) as writer:
        writer.log_epoch({"epoch": 1, "train_loss": 2.5})
        assert _scalars(tmp_path, "train_loss") == [(1, 2.5)]
        writer.log_epoch({"epoch": 2, "train_loss": 1.5})
        assert _scalars(tmp_path, "train_loss") == [(1, 2.5), (2, 1.5)]


def test_tensorboard_missing_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if not installed
    monkeypatch.delitem(sys.modules, "torch.utils.tensorboard", raising=False)
    from fasttrain.tb import TensorBoardWriter

    with pytest.raises(ImportError, match=r"pip install 'fasttrain-resnet\[tensorboard\]'"):
        TensorBoardWriter(tmp_path)
