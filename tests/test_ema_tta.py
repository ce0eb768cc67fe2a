"""EMA of the weights (train.ema_decay) and test-time augmentation views (train.tta), on the CPU."""
import copy
import json

import pytest
import torch
from torch import nn

from fasttrain.checkpoint import load_checkpoint
from fasttrain.config import ConfigError, load_config
from fasttrain.evaluate import black_fill, evaluate, evaluate_checkpoint, shift_image, tta_views
from fasttrain.runtime import Precision
from fasttrain.trainer import Trainer, WeightEMA
from test_train import quiet, tiny_config


def tiny_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))


@pytest.mark.parametrize("warmup", [0, 3])
def test_ema_matches_a_hand_written_reference(warmup):
    model = tiny_model()
    ema = WeightEMA(model, 0.9, warmup_steps=warmup)
    ref = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    for step in range(1, 6):
        model.train()
        loss = model(torch.randn(8, 3, 8, 8)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema.update(step)
        d = 0.9 * min(1.0, step / warmup) if warmup else 0.9
        for k, v in model.state_dict().items():
            ref[k] = d * ref[k] + (1 - d) * v if v.is_floating_point() else v.clone()
        for k, v in ema.state_dict().items():  # parameters AND BN running stats are averaged
            torch.testing.assert_close(v, ref[k], rtol=1e-6, atol=1e-7, msg=k)
    assert ema.state_dict()["1.num_batches_tracked"] == 5
    assert not torch.equal(ema.state_dict()["0.weight"], model.state_dict()["0.weight"])
    assert not any(p.requires_grad for p in ema.module.parameters())
    other = WeightEMA(tiny_model(), 0.9)
    other.load_state_dict(copy.deepcopy(ema.state_dict()))  # round trip in place
    other.update(6)  # ...and the lists it updates still point at the loaded tensors
    assert not torch.equal(other.state_dict()["0.weight"], ema.state_dict()["0.weight"])


def test_ema_config_validation():
    assert load_config(None, ["--train.ema_decay", "0.999"]).train.ema_decay == 0.999
    for bad in (["--train.ema_decay", "1"], ["--train.ema_decay", "-0.1"], ["--train.ema_warmup_steps", "-1"]):
        with pytest.raises(ConfigError, match=bad[0][2:].replace(".", r"\.")):
            load_config(None, bad)


def test_tta_modes_in_config():
    assert load_config(None).train.tta == "none"
    assert load_config("configs/best.yaml").train.tta == "flip"
    with pytest.raises(ConfigError, match=r"train\.tta.*one of none, flip, flip_shift"):
        load_config(None, ["--train.tta", "shift"])
    with pytest.raises(ConfigError, match=r"train\.tta = 'true' is out of range: one of none, flip, flip_shift"):
        load_config(None, ["--train.tta", "true"])  # a string field takes the text as typed


def test_shift_image_moves_pixels_and_fills_the_border():
    x = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).reshape(2, 3, 4, 5) + 1  # no zeros inside
    down_right = shift_image(x, 1, 1)
    assert down_right.shape == x.shape
    assert torch.equal(down_right[:, :, 1:, 1:], x[:, :, :-1, :-1])
    assert (down_right[:, :, 0, :] == 0).all() and (down_right[:, :, :, 0] == 0).all()
    up_left = shift_image(x, -1, -1)
    assert torch.equal(up_left[:, :, :-1, :-1], x[:, :, 1:, 1:])
    assert (up_left[:, :, -1, :] == 0).all() and (up_left[:, :, :, -1] == 0).all()
    filled = shift_image(x, 1, 1, fill=[-1.0, -2.0, -3.0])  # per channel
    assert torch.equal(shift_image(x, 1, 1, fill=torch.tensor([-1.0, -2.0, -3.0])), filled)  # as evaluate passes it
    assert torch.equal(filled[:, :, 1:, 1:], x[:, :, :-1, :-1])
    for c, v in enumerate((-1.0, -2.0, -3.0)):
        assert (filled[:, c, 0, :] == v).all() and (filled[:, c, :, 0] == v).all()
    cl = shift_image(x.contiguous(memory_format=torch.channels_last), -1, -1)
    assert cl.is_contiguous(memory_format=torch.channels_last) and torch.equal(cl, up_left)
    assert black_fill([0.5, 0.5, 0.25], [0.25, 0.5, 0.5]) == [-2.0, -1.0, -0.5]


def test_tta_views_and_weights():
    x = torch.randn(2, 3, 6, 6)
    assert [w for _, w in tta_views(x, "none")] == [1.0]
    flip = tta_views(x, "flip")
    assert [w for _, w in flip] == [0.5, 0.5] and torch.equal(flip[1][0], x.flip(3))
    views = tta_views(x, "flip_shift", fill=0.0)
    assert [w for _, w in views] == [0.25, 0.25, 0.125, 0.125, 0.125, 0.125]
    expected = [x, x.flip(3), shift_image(x, 1, 1), shift_image(x, 1, 1).flip(3),
                shift_image(x, -1, -1), shift_image(x, -1, -1).flip(3)]
    for (v, _), e in zip(views, expected):
        assert v.shape == x.shape and torch.equal(v, e)
    with pytest.raises(ValueError, match="flip_shift"):
        tta_views(x, "rotate")


def test_flip_shift_logits_are_the_weighted_view_average():
    """evaluate() scores argmax of sum_i w_i * model(view_i): labels built from exactly that sum
    (a linear model over all pixels, so every view changes the logits) are all counted correct."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 6 * 6, 4))
    x = torch.randn(50, 3, 6, 6)
    expected = sum(w * model(v) for v, w in tta_views(x, "flip_shift", fill=0.0)).argmax(1)
    acc = evaluate(model, [(x, expected)], Precision.resolve("fp32", torch.device("cpu")), torch.device("cpu"),
                   tta="flip_shift")
    assert acc == 100.0
    plain = model(x).argmax(1)
    assert evaluate(model, [(x, plain)], Precision.resolve("fp32", torch.device("cpu")), torch.device("cpu")) == 100.0


def test_ema_checkpoint_round_trip_and_eval(cifar_dir, tmp_path):
    cfg = tiny_config(cifar_dir, tmp_path, train__epochs="1", train__ema_decay="0.8", train__tta="flip_shift")
    trainer = Trainer(cfg, device="cpu", console=quiet())
    summary = trainer.fit()
    assert summary["tta_mode"] == "flip_shift" and summary["final_test_acc_tta"] is not None
    assert summary["eval_weights"] == "ema"
    saved = load_checkpoint(tmp_path / "last.pt")
    for k, v in trainer.ema.state_dict().items():
        assert torch.equal(saved["ema"][k], v), k
    result = evaluate_checkpoint(tmp_path / "last.pt", device="cpu", data_dir=str(cifar_dir))
    assert result["weights"] == "ema" and result["test_acc"] == pytest.approx(summary["final_test_acc"])
    shifted = evaluate_checkpoint(tmp_path / "last.pt", tta="flip_shift", device="cpu", data_dir=str(cifar_dir))
    assert shifted["test_acc"] == pytest.approx(summary["final_test_acc_tta"])
    live = evaluate_checkpoint(tmp_path / "last.pt", device="cpu", data_dir=str(cifar_dir), weights="model")
    assert live["weights"] == "model"
    assert json.loads((tmp_path / "summary.json").read_text())["tta_mode"] == "flip_shift"


def test_eval_test_false_never_touches_the_test_set(cifar_dir, tmp_path, monkeypatch):
    """Tuning on the validation split: per epoch, at the end and with TTA only val is evaluated."""
    import fasttrain.trainer as trainer_mod

    cfg = tiny_config(cifar_dir, tmp_path, **{"data.val_size": "101", "train.eval_test": "false",
                                              "train.tta": "flip", "train.epochs": "2"})
    trainer = Trainer(cfg, device="cpu", console=quiet())
    seen = []
    real_evaluate = trainer_mod.evaluate
    monkeypatch.setattr(trainer_mod, "evaluate", lambda net, loader, *a, **kw: (
        seen.append((loader, kw.get("tta", "none"))), real_evaluate(net, loader, *a, **kw))[1])
    summary = trainer.fit()
    assert seen and all(loader is trainer.data.val for loader, _ in seen)
    assert [tta for _, tta in seen] == ["none", "none", "flip"]  # two epochs, then the TTA pass
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(r["test_acc"] is None and 0 <= r["val_acc"] <= 100 for r in rows)
    assert summary["final_test_acc"] is None and summary["final_test_acc_tta"] is None
    assert summary["best_test_acc"] is None
    assert summary["final_val_acc"] == rows[-1]["val_acc"] and 0 <= summary["final_val_acc_tta"] <= 100


def test_eval_test_false_needs_a_validation_split():
    with pytest.raises(ConfigError, match=r"train\.eval_test.*data\.val_size"):
        load_config(None, ["--train.eval_test", "false"])
