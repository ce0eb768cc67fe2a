"""`python -m fasttrain export`: a run's weights alone, evaluated exactly like the checkpoint they came from."""
import json
from pathlib import Path

import pytest
import torch

from fasttrain.checkpoint import CheckpointError, find_resume_checkpoint, load_checkpoint
from fasttrain.trainer import Trainer
from test_train import quiet, run_cli, tiny_config


@pytest.fixture(scope="module")
def run(cifar_dir, tmp_path_factory):
    """One tiny CPU run with an EMA of the weights: its folder holds last.pt and summary.json."""
    run_dir = tmp_path_factory.mktemp("run")
    cfg = tiny_config(cifar_dir, run_dir, train__epochs="1", train__ema_decay="0.9")
    Trainer(cfg, device="cpu", console=quiet()).fit()
    return run_dir


def eval_json(path, cifar_dir, *extra):
    return json.loads(run_cli("eval", "--checkpoint", str(path), "--device", "cpu", "--data.dir", str(cifar_dir),
                              "--json", *extra).stdout)


def test_export_keeps_only_the_weights_and_evaluates_the_same(run, cifar_dir, tmp_path):
    out = tmp_path / "weights.pt"
    info = json.loads(run_cli("export", str(run / "last.pt"), str(out), "--note", "tiny test run", "--json").stdout)
    assert info["weights"] == "ema" and info["dtype"] == "fp32" and info["epoch"] == 1
    assert info["note"] == "tiny test run" and "cifar-10-batches" in info["trained_on"]
    summary = json.loads((run / "summary.json").read_text())
    assert info["run"]["final_test_acc"] == summary["final_test_acc"]

    full, exported = load_checkpoint(run / "last.pt"), load_checkpoint(out)  # checksummed like a checkpoint
    assert exported["kind"] == "weights" and "optimizer" not in exported and exported["ema"] is None
    assert exported["model"].keys() == full["ema"].keys()
    assert all(torch.equal(exported["model"][k], full["ema"][k]) for k in full["ema"])
    assert out.stat().st_size < (run / "last.pt").stat().st_size / 2

    # exported again (to bf16): the label and the run's figures go with the weights (no summary.json beside
    # them; the label names the data they were trained on); a new --note replaces the label
    again = json.loads(run_cli("export", str(out), str(tmp_path / "bf16.pt"), "--dtype", "bf16", "--json").stdout)
    assert again["note"] == "tiny test run" and again["weights"] == info["weights"] == "ema"  # still the EMA's
    assert again["run"] == info["run"], (again["run"], info["run"])
    relabelled = json.loads(run_cli("export", str(out), str(tmp_path / "b.pt"), "--note", "new", "--json").stdout)
    assert relabelled["note"] == "new"

    from_checkpoint, from_export = eval_json(run / "last.pt", cifar_dir), eval_json(out, cifar_dir)
    assert from_checkpoint["weights"] == "ema" and from_export["weights"] == "ema"  # the EMA, stored as the model
    assert from_export["test_acc"] == from_checkpoint["test_acc"] == summary["final_test_acc"]
    # --tta all: every mode from one load, each the figure of its own mode
    every = eval_json(out, cifar_dir, "--tta", "all")
    assert every["test_acc"] == every["test_acc_by_tta"]["none"] == from_export["test_acc"]
    assert every["test_acc_by_tta"]["flip_shift"] == eval_json(out, cifar_dir, "--tta", "flip_shift")["test_acc"]
    assert set(every["test_acc_by_tta"]) == {"none", "flip", "flip_shift"}
    line = run_cli("eval", str(out), "--device", "cpu", "--data.dir", str(cifar_dir),  # as export names it
                   "--tta", "all").stdout
    assert line.startswith(f"test accuracy: {every['test_acc']:.2f}% (no TTA), "
                           f"{every['test_acc_by_tta']['flip']:.2f}% (flip TTA), ")
    # the label export --note gave the weights (the data they were trained on) is shown with the figure
    assert from_export["note"] == "tiny test run" and from_checkpoint["note"] is None
    assert line.splitlines()[1:] == ["note: tiny test run"]


def test_an_exported_ema_is_named_and_taken_as_the_ema(run, cifar_dir, tmp_path):
    """The export of an EMA run holds the EMA's weights (stored under "model"): eval must call them the
    EMA's, --weights ema must take them (not refuse them as if the run had had no EMA), and --weights model
    must be refused, since the live weights are not in the file."""
    from fasttrain.evaluate import evaluate_checkpoint

    out = tmp_path / "weights.pt"
    run_cli("export", str(run / "last.pt"), str(out))
    result = evaluate_checkpoint(out, device="cpu", data_dir=str(cifar_dir))
    assert result["weights"] == "ema", result
    chosen = evaluate_checkpoint(out, device="cpu", data_dir=str(cifar_dir), weights="ema")
    assert chosen["weights"] == "ema" and chosen["test_acc"] == result["test_acc"]
    with pytest.raises(CheckpointError) as refused:
        evaluate_checkpoint(out, device="cpu", data_dir=str(cifar_dir), weights="model")
    assert "ema_decay 0" not in str(refused.value) and "EMA" in str(refused.value), str(refused.value)


def test_eval_tta_all_reports_each_mode_under_its_own_name(run, cifar_dir, monkeypatch):
    """`--tta all`: test_acc is the figure without TTA, and each mode's figure sits under its own name
    (the real accuracies of a tiny run can coincide, so each mode is given its own here)."""
    from fasttrain import evaluate as evaluate_module

    by_mode = {"none": 11.0, "flip": 22.0, "flip_shift": 33.0}
    monkeypatch.setattr(evaluate_module, "evaluate", lambda *args, tta="none", **kwargs: by_mode[tta])
    result = evaluate_module.evaluate_checkpoint(run / "last.pt", tta="all", device="cpu", data_dir=str(cifar_dir))
    assert result["test_acc"] == 11.0 and result["test_acc_by_tta"] == by_mode
    assert evaluate_module.evaluate_checkpoint(run / "last.pt", tta="flip", device="cpu",
                                               data_dir=str(cifar_dir))["test_acc"] == 22.0


def test_eval_prints_the_accuracy_under_the_tta_it_used(run, cifar_dir, monkeypatch, capsys):
    """The line `eval` prints without --json: the figure of the mode asked for, named (a bare --tta is
    flip), and no TTA named without it (each mode is given its own figure here, as above)."""
    from fasttrain import cli
    from fasttrain import evaluate as evaluate_module

    by_mode = {"none": 11.0, "flip": 22.0, "flip_shift": 33.0}
    monkeypatch.setattr(evaluate_module, "evaluate", lambda *args, tta="none", **kwargs: by_mode[tta])
    command = ["eval", "--checkpoint", str(run / "last.pt"), "--device", "cpu", "--data.dir", str(cifar_dir)]
    for extra, said in (([], "11.00% on"), (["--tta"], "22.00% (flip TTA) on"),
                        (["--tta", "flip_shift"], "33.00% (flip_shift TTA) on")):
        assert cli.main(command + extra) == 0
        assert capsys.readouterr().out.startswith(f"test accuracy: {said} 200 test images, ema weights  ")


def test_eval_data_dir_wins_over_fasttrain_data(run, cifar_dir, tmp_path, monkeypatch):
    """`eval --data.dir DIR` reads DIR even where FASTTRAIN_DATA names another folder (here an empty one;
    the network is forbidden, so a download attempt there would fail): the run's own figure comes back."""
    from urllib.error import URLError

    from fasttrain.data import cifar
    from fasttrain.evaluate import evaluate_checkpoint

    def no_network(url, timeout=None):
        raise URLError("the test forbids the network")

    monkeypatch.setattr(cifar, "urlopen", no_network)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.setenv("FASTTRAIN_DATA", str(elsewhere))
    result = evaluate_checkpoint(run / "last.pt", device="cpu", data_dir=str(cifar_dir))
    summary = json.loads((run / "summary.json").read_text())
    assert result["test_acc"] == summary["final_test_acc"] and result["test_images"] == 200
    assert list(elsewhere.iterdir()) == []


def test_eval_builds_the_test_loader_alone(run, cifar_dir, monkeypatch):
    """Scoring a checkpoint asks build_data for the test loader only: no training loader (on a GPU with DALI,
    240 MB of padded training images) and no validation loader are built."""
    from fasttrain import evaluate as evaluate_module

    built = []
    real_build_data = evaluate_module.build_data

    def recording(*args, **kwargs):
        built.append((kwargs, real_build_data(*args, **kwargs)))
        return built[-1][1]

    monkeypatch.setattr(evaluate_module, "build_data", recording)
    evaluate_module.evaluate_checkpoint(run / "last.pt", device="cpu", data_dir=str(cifar_dir))
    [(kwargs, bundle)] = built
    assert kwargs["test_only"] is True
    assert bundle.train is None and bundle.val is None and bundle.test_images == 200


def test_eval_test_subset_zero_scores_every_test_image(run, cifar_dir, monkeypatch):
    """`eval --data.test_subset 0` scores all 10,000 test images, not the run's own 200 (0 is a count given,
    not one left out); a positive count takes that many, and none given keeps the run's."""
    from fasttrain import evaluate as evaluate_module

    monkeypatch.setattr(evaluate_module, "evaluate", lambda *args, **kwargs: 50.0)  # what is scored is checked here
    for subset, scored in ((0, 10_000), (50, 50), (None, 200)):
        result = evaluate_module.evaluate_checkpoint(run / "last.pt", device="cpu", data_dir=str(cifar_dir),
                                                     test_subset=subset)
        assert result["test_images"] == scored, subset


def test_bf16_export_is_half_the_size_and_still_evaluates(run, cifar_dir, tmp_path):
    fp32, bf16 = tmp_path / "fp32.pt", tmp_path / "bf16.pt"
    info = json.loads(run_cli("export", str(run / "last.pt"), str(fp32), "--weights", "model", "--json").stdout)
    assert info["run"] == {}  # the run's accuracy is its EMA's: not these weights' figures
    run_cli("export", str(run / "last.pt"), str(bf16), "--weights", "model", "--dtype", "bf16")
    assert load_checkpoint(bf16)["model"]["fc.weight"].dtype == torch.bfloat16
    # the weights take half the bytes, and the file shrinks by that: judged on the tensors' bytes, since on this
    # 20k-parameter net the file's fixed part (config, notes: a few kB) is a sizeable share of it
    tensor_bytes = [sum(t.numel() * t.element_size() for t in load_checkpoint(f)["model"].values()) for f in (fp32, bf16)]
    assert tensor_bytes[1] <= 0.51 * tensor_bytes[0]
    assert fp32.stat().st_size - bf16.stat().st_size >= 0.95 * (tensor_bytes[0] - tensor_bytes[1])
    exact = eval_json(run / "last.pt", cifar_dir, "--weights", "model")["test_acc"]
    assert abs(eval_json(bf16, cifar_dir)["test_acc"] - exact) <= 2.0  # bf16 rounding of the weights only


def test_an_export_cannot_be_resumed_from(run, cifar_dir, tmp_path):
    out = tmp_path / "weights.pt"
    run_cli("export", str(run / "last.pt"), str(out))
    cfg = tiny_config(cifar_dir, tmp_path / "again", train__epochs="2", train__ema_decay="0.9")
    with pytest.raises(CheckpointError, match="exported weights file.*no optimizer state"):
        Trainer(cfg, device="cpu", console=quiet(), resume=out)
    # --resume auto passes over an exported file in a run folder (named in a warning) for a checkpoint
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "prev.pt").write_bytes((run / "last.pt").read_bytes())
    (folder / "last.pt").write_bytes(out.read_bytes())
    warned = []
    assert find_resume_checkpoint(folder, warn=warned.append) == folder / "prev.pt"
    assert len(warned) == 1 and "last.pt: an exported weights file" in warned[0]
    (folder / "prev.pt").unlink()
    with pytest.raises(CheckpointError, match="exported weights file, not a training checkpoint"):
        find_resume_checkpoint(folder, warn=warned.append)


def test_export_refusals(run, cifar_dir, tmp_path):
    out = tmp_path / "weights.pt"
    out.write_bytes(b"keep me")
    proc = run_cli("export", str(run / "last.pt"), str(out), check=False)
    assert proc.returncode == 2 and "--overwrite" in proc.stderr and out.read_bytes() == b"keep me"
    plain = tmp_path / "plain"  # trained without an EMA
    Trainer(tiny_config(cifar_dir, plain, train__epochs="1"), device="cpu", console=quiet()).fit()
    proc = run_cli("export", str(plain / "last.pt"), str(tmp_path / "w.pt"), "--weights", "ema", check=False)
    assert proc.returncode == 1 and "holds no EMA weights" in proc.stderr and not (tmp_path / "w.pt").exists()
    # an OUT that is not a regular file (a folder, a device) is not replaced, even with --overwrite
    folder = tmp_path / "a-folder"
    (folder / "inside").mkdir(parents=True)
    proc = run_cli("export", str(run / "last.pt"), str(folder), "--overwrite", check=False)
    assert proc.returncode == 2 and "is not a regular file" in proc.stderr and "Traceback" not in proc.stderr
    assert (folder / "inside").is_dir() and not list(tmp_path.glob(".a-folder*"))  # no temp file left
    # the checkpoint itself: replacing it would throw the run's optimizer state away
    before = (run / "last.pt").read_bytes()
    proc = run_cli("export", str(run / "last.pt"), str(run / "last.pt"), "--overwrite", check=False)
    assert proc.returncode == 2 and "is the checkpoint being exported" in proc.stderr
    assert (run / "last.pt").read_bytes() == before
    # what the file system refuses (here: a file where the folder goes) is one line too, not a traceback
    proc = run_cli("export", str(run / "last.pt"), str(out / "w.pt"), check=False)
    assert proc.returncode == 1 and proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr


def test_export_says_what_it_wrote_and_refuses_an_out_that_names_a_folder(run, tmp_path, capsys):
    """The line `export` prints: the file, its weights, and the run's final test accuracy (its summary
    describes this checkpoint). An OUT ending in a slash names a folder, not the file to write: refused,
    nothing made (a file named like the folder would be)."""
    from fasttrain import cli

    out = tmp_path / "weights.pt"
    assert cli.main(["export", str(run / "last.pt"), str(out)]) == 0
    said = capsys.readouterr().out
    accuracy = json.loads((run / "summary.json").read_text())["final_test_acc"]
    assert said.startswith(f"wrote {out} (") and "ema weights in fp32, epoch 1, " in said
    assert said.endswith(f", run's final test accuracy {accuracy:.2f}%\n")
    folder = tmp_path / "exports"
    assert cli.main(["export", str(run / "last.pt"), f"{folder}/"]) == 2
    assert "name the weights file to write, e.g. weights.pt" in capsys.readouterr().err
    assert not folder.exists()


@pytest.mark.parametrize("which", ["checkpoint", "bf16 export"])
def test_load_model_as_the_readme_uses_it_scores_what_eval_scores(run, cifar_dir, tmp_path, which):
    """`fasttrain.load_model` and the README's inference lines (uint8 RGB images -> [0, 1] -> the
    config's mean/std) predict what `eval` measures: the same weights (the EMA's), the same inputs."""
    import fasttrain
    from fasttrain.data.cifar import load_cifar10

    path = run / "last.pt"
    if which == "bf16 export":
        path = tmp_path / "bf16.pt"
        run_cli("export", str(run / "last.pt"), str(path), "--dtype", "bf16")
    model, cfg = fasttrain.load_model(path)
    assert not model.training and all(p.dtype == torch.float32 for p in model.parameters())
    measured = eval_json(path, cifar_dir)
    data = load_cifar10(cifar_dir, download=False)
    n = measured["test_images"]
    images = torch.from_numpy(data.test_x[:n]).permute(0, 3, 1, 2)  # uint8 N x 3 x 32 x 32, RGB
    mean = torch.tensor(cfg.data.mean).view(1, 3, 1, 1)
    std = torch.tensor(cfg.data.std).view(1, 3, 1, 1)
    with torch.no_grad():
        predicted = model((images.float() / 255 - mean) / std).argmax(1)
    accuracy = 100.0 * (predicted == torch.from_numpy(data.test_y[:n])).float().mean().item()
    # an export keeps one set of weights (the EMA's), under "model", and says whose they are
    assert measured["weights"] == "ema"
    assert abs(accuracy - measured["test_acc"]) <= 100.0 / n  # at most one image apart (summation order)


def test_bf16_export_casts_only_the_float_tensors(run, tmp_path):
    """BatchNorm's num_batches_tracked counters stay int64: a bf16 counter would round them."""
    out = tmp_path / "bf16.pt"
    run_cli("export", str(run / "last.pt"), str(out), "--dtype", "bf16")
    saved = load_checkpoint(out)["model"]
    ints = {k: v.dtype for k, v in saved.items() if not v.is_floating_point()}
    assert ints and set(ints.values()) == {torch.int64}
    assert {v.dtype for v in saved.values() if v.is_floating_point()} == {torch.bfloat16}


def test_exporting_again_over_a_file_keeps_no_prev_pt(run, tmp_path):
    """A weights file is no checkpoint generation: re-exporting it (into a run folder too) must not make,
    or replace, that folder's prev.pt, the run's fallback for --resume auto."""
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "prev.pt").write_bytes(b"the run's fallback")
    for _ in range(2):
        run_cli("export", str(run / "last.pt"), str(folder / "w.pt"), "--overwrite")
    assert (folder / "prev.pt").read_bytes() == b"the run's fallback"
    assert sorted(p.name for p in folder.iterdir()) == ["prev.pt", "w.pt"]


def test_weights_that_do_not_fit_their_config_are_not_exported(run, tmp_path):
    """A checkpoint whose config names another architecture than its weights (edited, or mixed up) is
    refused at export, not shipped to fail later."""
    from fasttrain.checkpoint import write_checkpoint
    from fasttrain.export import export_weights

    ckpt = load_checkpoint(run / "last.pt")
    ckpt["config"]["model"]["base_channels"] = 2 * ckpt["config"]["model"]["base_channels"]
    write_checkpoint(ckpt, tmp_path / "mixed.pt", previous=None)  # sealed again: a valid file
    with pytest.raises(CheckpointError, match="another architecture"):
        export_weights(tmp_path / "mixed.pt", tmp_path / "w.pt")
    assert not (tmp_path / "w.pt").exists()


def test_an_unknown_dtype_is_refused_before_the_checkpoint_is_read(tmp_path):
    """export_weights names the dtypes it writes: the CLI's choices guard them, and a script calling it
    directly gets the same one-line refusal up front (here the checkpoint does not even exist), nothing written."""
    from fasttrain.export import export_weights

    with pytest.raises(ValueError, match="^dtype 'fp16': expected one of fp32, bf16$"):
        export_weights(tmp_path / "missing.pt", tmp_path / "w.pt", dtype="fp16")
    assert list(tmp_path.iterdir()) == []


SHIPPED_WEIGHTS = Path(__file__).resolve().parent.parent / "benchmarks/results/2026-11-28-h200-muon/best/weights-best-bf16.pt"


def test_the_shipped_weights_are_best_yaml_s_network_and_classify(cifar_dir):
    """The weights the README ships (best.yaml, Muon for 36 epochs, trained on an H200) load as `eval` and
    `load_model` read them, are configs/best.yaml's network, say which data they were trained on, and classify:
    on the first 1,000 test images they score near the run's 92.40% with flip TTA (not a chance-level 10%, which a broken
    load, a wrong normalization or a layout mix-up would give)."""
    import fasttrain
    from fasttrain.config import load_config
    from fasttrain.model import count_params

    model, cfg = fasttrain.load_model(SHIPPED_WEIGHTS)
    assert cfg.model == load_config(Path(__file__).resolve().parent.parent / "configs/best.yaml").model
    assert count_params(model) == 3_147_662
    measured = json.loads(run_cli("eval", str(SHIPPED_WEIGHTS), "--device", "cpu", "--data.dir", str(cifar_dir),
                                  "--data.test_subset", "1000", "--tta", "flip", "--json").stdout)
    assert measured["test_images"] == 1000 and measured["epoch"] == 36
    assert "JPEG-75 stand-in" in measured["note"]
    assert measured["test_acc"] >= 88.0, measured
