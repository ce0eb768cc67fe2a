"""EMA of the weights (train.ema_decay, train.ema_bn) and test-time augmentation views (train.tta), on the CPU."""
import copy
import itertools
import json

import pytest
import torch
from torch import nn
from torch.optim.swa_utils import update_bn

from fake_cuda_graphs import FakeCudaGraphs
from fasttrain.checkpoint import load_checkpoint
from fasttrain.config import ConfigError, load_config
from fasttrain.ema import batch_norms
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


def test_ema_reset_makes_the_average_the_live_model():
    """reset() (a resume from a checkpoint saved without EMA): every parameter and BN buffer of the EMA,
    the integer counter included, becomes the live model's, as a copy that later changes to the model do
    not reach."""
    model = tiny_model()
    ema = WeightEMA(model, 0.9)
    with torch.no_grad():  # the live model moves away from the EMA's deep copy: weights and BN buffers
        for tensor in itertools.chain(model.parameters(), model.buffers()):
            tensor.add_(3)
    live = {k: v.clone() for k, v in model.state_dict().items()}
    assert live.keys() == ema.state_dict().keys() and "1.running_var" in live and "1.num_batches_tracked" in live
    assert not any(torch.equal(v, live[k]) for k, v in ema.state_dict().items())
    ema.reset()
    for k, v in ema.state_dict().items():
        assert torch.equal(v, live[k]), k
    with torch.no_grad():
        model[0].weight.mul_(2)
    assert torch.equal(ema.state_dict()["0.weight"], live["0.weight"])  # copied, not shared


def test_resume_of_a_run_without_ema_starts_the_average_at_the_resumed_weights(cifar_dir, tmp_path):
    """A checkpoint saved with train.ema_decay 0, resumed with 0.9: right after construction the EMA is the
    resumed model (not the freshly initialised one the trainer copied before loading the checkpoint)."""
    one_step = {"data__train_subset": "64", "data__test_subset": "100"}  # one step of 64 images per epoch
    Trainer(tiny_config(cifar_dir, tmp_path, train__epochs="1", **one_step), device="cpu", console=quiet()).fit()
    assert load_checkpoint(tmp_path / "last.pt")["ema"] is None
    cfg = tiny_config(cifar_dir, tmp_path, train__epochs="2", train__ema_decay="0.9", **one_step)
    resumed = Trainer(cfg, device="cpu", console=quiet(), resume=tmp_path / "last.pt")
    live, averaged = resumed.model.state_dict(), resumed.ema.state_dict()
    assert live.keys() == averaged.keys()
    for k, v in averaged.items():
        assert torch.equal(v, live[k]), k
    assert resumed.start_epoch == 1


def test_ema_config_validation():
    assert load_config(None, ["--train.ema_decay", "0.999"]).train.ema_decay == 0.999
    default = load_config(None).train
    assert (default.ema_bn, default.ema_bn_batches) == ("average", 20)  # the default is unchanged: averaged
    cfg = load_config(None, ["--train.ema_decay", "0.999", "--train.ema_bn", "recompute", "--train.ema_bn_batches", "5"])
    assert (cfg.train.ema_bn, cfg.train.ema_bn_batches) == ("recompute", 5)
    for bad in (["--train.ema_decay", "1"], ["--train.ema_decay", "-0.1"], ["--train.ema_warmup_steps", "-1"],
                ["--train.ema_bn_batches", "0"], ["--train.ema_bn_batches", "-3"]):
        with pytest.raises(ConfigError, match=bad[0][2:].replace(".", r"\.")):
            load_config(None, bad)
    with pytest.raises(ConfigError, match=r"train\.ema_bn = 'swa' is out of range: one of average, recompute"):
        load_config(None, ["--train.ema_bn", "swa"])


def _bn_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 5, 3, padding=1),
                         nn.BatchNorm2d(5), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.5),
                         nn.Linear(5, 3))


def _buffers(module):
    return {k: v.clone() for k, v in module.state_dict().items() if "running" in k or "num_batches" in k}


def test_recompute_bn_equals_swa_update_bn_and_fixes_the_averaged_statistics():
    """WeightEMA.recompute_bn gives exactly what torch.optim.swa_utils.update_bn gives on the same batches,
    whatever statistics the EMA held before; it changes nothing else, draws no random numbers, and the
    EMA goes on averaging the same tensors afterwards. And why it exists: the EMA of weights that kept
    turning (here the first conv's filters rotated between two states) is not normalised by the averaged
    running statistics, while the recomputed ones normalise its activations."""
    model = _bn_net()
    ema = WeightEMA(model, 0.5)
    batches = [torch.randn(16, 3, 8, 8) * 2 + 1 for _ in range(4)]
    conv = model[0]
    first = conv.weight.detach().clone()
    turned = torch.roll(first, 1, dims=0) * torch.tensor([1.0, -1, 1, -1, 1, -1]).view(-1, 1, 1, 1)  # other filters
    for step, weight in enumerate([first, turned, first, turned], start=1):
        with torch.no_grad():
            conv.weight.copy_(weight)
        model.train()
        for x in batches:
            model(x)  # the live running statistics of this weight
        ema.update(step)

    def first_bn_output(module, x):  # per-channel statistics of the first BN's eval-mode output
        out = module[1](module[0](x)).transpose(0, 1).flatten(1)
        return out.mean(1), out.var(1, unbiased=False)

    x = batches[0]
    with torch.no_grad():
        _, var_averaged = first_bn_output(ema.module, x)
    assert (var_averaged - 1).abs().max() > 0.2  # the averaged statistics do not normalise the averaged weights

    params = {k: v.clone() for k, v in ema.module.named_parameters()}
    reference = copy.deepcopy(ema.module)
    update_bn(batches, reference)
    with torch.no_grad():
        for bn in batch_norms(ema.module):  # garbage before: the result must not depend on it
            bn.running_mean.fill_(7.0), bn.running_var.fill_(0.01), bn.num_batches_tracked.fill_(99)
    rng = torch.get_rng_state()
    assert ema.recompute_bn(batches) == 4
    assert torch.equal(torch.get_rng_state(), rng)  # the dropout stayed off: no random numbers drawn
    expected = _buffers(reference)
    for k, v in _buffers(ema.module).items():
        torch.testing.assert_close(v, expected[k], rtol=1e-6, atol=1e-7, msg=k)
    assert int(ema.module[1].num_batches_tracked) == 4
    assert all(torch.equal(v, params[k]) for k, v in ema.module.named_parameters())
    assert not any(m.training for m in ema.module.modules()) and all(bn.momentum == 0.1 for bn in batch_norms(ema.module))

    one = WeightEMA(model, 0.5)  # one batch: eval-mode outputs on it are normalised like a training forward's
    one.module.load_state_dict(ema.module.state_dict())
    one.recompute_bn([x])
    with torch.no_grad():
        mean, var = first_bn_output(one.module, x)
    n = x.shape[0] * x.shape[2] * x.shape[3]
    torch.testing.assert_close(mean, torch.zeros_like(mean), atol=1e-5, rtol=0)
    torch.testing.assert_close(var, torch.full_like(var, (n - 1) / n), atol=1e-3, rtol=0)  # running_var is unbiased

    before = _buffers(ema.module)
    with pytest.raises(ValueError, match="at least one batch"):
        ema.recompute_bn(iter([]))
    assert all(torch.equal(v, before[k]) for k, v in _buffers(ema.module).items())  # nothing was reset
    ema.update(5)  # the averaged lists still point at the recomputed buffers: they move towards the live ones
    assert not torch.equal(ema.module[1].running_mean, before["1.running_mean"])
    torch.testing.assert_close(ema.module[1].running_mean, 0.5 * before["1.running_mean"] + 0.5 * model[1].running_mean)


def test_recompute_bn_weights_batches_equally_without_reading_the_batch_count():
    """BatchNorm with momentum None computes each batch's weight as 1 / float(num_batches_tracked): a host
    read of a device tensor (a sync per layer and batch on a GPU, where the run's final recompute is on the
    training clock). recompute_bn sets the same weights as momenta instead: 1, 1/2, 1/3, ... per batch."""
    ema = WeightEMA(_bn_net(), 0.5)
    seen = {}
    for i, bn in enumerate(batch_norms(ema.module)):
        bn.register_forward_pre_hook(lambda m, args, i=i: seen.setdefault(i, []).append(m.momentum))
    ema.recompute_bn([torch.randn(8, 3, 8, 8) for _ in range(3)])
    assert seen and all(momenta == [1.0, 1 / 2, 1 / 3] for momenta in seen.values()), seen


@pytest.mark.parametrize("graph", [False, True], ids=["eager", "fake-cuda-graph"])
def test_ema_averages_the_weights_the_trainer_trains(cifar_dir, tmp_path, monkeypatch, graph):
    """The wiring, through the real Trainer with the recipe's engine switches that run on a CPU: the fused
    Lookahead-SGD (its PyTorch path), channels_last, the compile warmup's throwaway steps and restore, and
    (faked) CUDA-graph capture and replay. (1) decay ~0: the EMA is the live model bit for bit, and its
    evaluation is the live model's; (2) decay 0.9 with a warmup ramp: after every step the EMA equals an
    average kept by hand of the live model's state (parameters and BN statistics) as the trainer leaves it."""
    fake = FakeCudaGraphs(monkeypatch.setattr) if graph else None
    for decay in ("1e-9", "0.9"):
        if fake is not None:
            fake.captures = fake.replays = 0
        cfg = tiny_config(cifar_dir, tmp_path / decay, **{
            "optim.impl": "fused", "train.ema_decay": decay, "train.ema_warmup_steps": "4",
            "data.val_size": "200", "train.eval_every": "1"})
        trainer = Trainer(cfg, device="cpu", console=quiet())
        trainer.use_graph = graph  # a CPU run switches it off: force the graph path onto the fakes
        assert trainer.channels_last and type(trainer.optimizer).__name__ == "FusedLookaheadSGD"
        ema, live = trainer.ema, trainer.model
        reference = {k: v.clone() for k, v in ema.state_dict().items()}
        real_update, real_warmup = ema.update, trainer.warmup
        updates = []

        def update(step):  # the hand-kept average, from what the trainer left in the live model
            real_update(step)
            d = float(decay) * min(1.0, step / 4)
            for k, v in live.state_dict().items():
                reference[k] = d * reference[k] + (1 - d) * v if v.is_floating_point() else v.clone()
            for k, v in ema.state_dict().items():
                torch.testing.assert_close(v, reference[k], rtol=1e-5, atol=1e-6, msg=k)
            updates.append(step)

        def warmup():  # its throwaway steps update the EMA (and the reference): both must be as before
            before = {k: v.clone() for k, v in ema.state_dict().items()}
            seconds = real_warmup()
            for k, v in ema.state_dict().items():
                assert torch.equal(v, before[k]), k
            reference.update(before)
            return seconds

        monkeypatch.setattr(ema, "update", update)
        monkeypatch.setattr(trainer, "warmup", warmup)
        if not graph:
            trainer.warmup()  # what train.compile runs before the clock starts (the graph path runs it in fit)
        summary = trainer.fit()
        steps = 2 * trainer.steps_per_epoch
        assert updates[-steps:] == list(range(1, steps + 1))  # every real step, after the warmup's
        if fake is not None:  # the real steps were the graph's replays
            assert (fake.captures, fake.replays) == (1, steps)
        if decay == "0.9":  # a real average, not a copy
            assert not torch.equal(ema.state_dict()["fc.weight"], live.state_dict()["fc.weight"])
        else:
            for k, v in live.state_dict().items():
                assert torch.equal(ema.state_dict()[k], v), k
            for split, loader in trainer._eval_splits():
                acc = evaluate(live, loader, trainer.precision, trainer.device)
                assert summary[f"final_{split}_acc"] == acc, split


def test_tta_modes_in_config():
    assert load_config(None).train.tta == "none"
    assert load_config("configs/best.yaml").train.tta == "flip_shift"
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
    filled_up_left = shift_image(x, -1, -1, fill=[-1.0, -2.0, -3.0])  # the other corner keeps every source pixel
    assert torch.equal(filled_up_left[:, :, :-1, :-1], x[:, :, 1:, 1:])
    for c, v in enumerate((-1.0, -2.0, -3.0)):
        assert (filled_up_left[:, c, -1, :] == v).all() and (filled_up_left[:, c, :, -1] == v).all()
    cl = shift_image(x.contiguous(memory_format=torch.channels_last), -1, -1)
    assert cl.is_contiguous(memory_format=torch.channels_last) and torch.equal(cl, up_left)
    assert down_right.is_contiguous() and up_left.is_contiguous()  # NCHW in, NCHW out (not a strided view)
    # any translation, not only one pixel: two rows down, columns unchanged
    two_down = shift_image(x, 2, 0)
    assert torch.equal(two_down[:, :, 2:], x[:, :, :-2]) and (two_down[:, :, :2] == 0).all()
    # a fill that is 0 in one channel only (black_fill of a channel with mean 0) still fills the others
    partly = shift_image(x, 1, 1, fill=[0.0, -2.0, -3.0])
    for c, v in enumerate((0.0, -2.0, -3.0)):
        assert (partly[:, c, 0, :] == v).all() and (partly[:, c, :, 0] == v).all()
    # a bf16 batch with an fp32 fill tensor stays bf16 (the fill is cast, the batch is not promoted)
    half = shift_image(x.bfloat16(), 1, 1, fill=torch.tensor([-1.0, -2.0, -3.0]))
    assert half.dtype == torch.bfloat16 and torch.equal(half, filled.bfloat16())
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
    # the shifted views' border takes evaluate's fill (the trainer passes black in normalized units)
    black = [-1.0, -2.0, -3.0]
    with_black = sum(w * model(v) for v, w in tta_views(x, "flip_shift", fill=torch.tensor(black))).argmax(1)
    assert not torch.equal(with_black, expected)  # so a fill that went missing would be seen
    assert evaluate(model, [(x, with_black)], Precision.resolve("fp32", torch.device("cpu")), torch.device("cpu"),
                    tta="flip_shift", fill=black) == 100.0


def test_evaluate_scores_in_eval_mode_and_gives_the_model_back_in_its_mode():
    """evaluate() scores the model in eval mode (BatchNorm's running statistics, no dropout), leaves those
    statistics as they were, and hands the model back in the mode it came in: a training model goes on
    training, an eval-mode one (the EMA's) stays in eval mode. An empty loader scores 0, not a ZeroDivisionError."""
    model = _bn_net()  # BatchNorm and dropout
    x = torch.randn(40, 3, 8, 8)
    model.train()
    for _ in range(3):
        model(x)  # running statistics other than the initial ones
    model.eval()
    with torch.no_grad():
        expected = model(x).argmax(1)
    before = _buffers(model)
    cpu = torch.device("cpu")
    fp32 = Precision.resolve("fp32", cpu)
    for training in (True, False):
        model.train(training)
        assert evaluate(model, [(x[:25], expected[:25]), (x[25:], expected[25:])], fp32, cpu) == 100.0
        assert all(m.training == training for m in model.modules()), training
        assert all(torch.equal(v, before[k]) for k, v in _buffers(model).items()), training
    assert evaluate(model, [], fp32, cpu) == 0.0


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
    live_acc = evaluate(trainer.model, trainer.data.test, trainer.precision, trainer.device)  # the live weights'
    assert live["weights"] == "model" and live["test_acc"] == pytest.approx(live_acc)
    assert live_acc != pytest.approx(summary["final_test_acc"])  # the two sets of weights score apart here
    assert json.loads((tmp_path / "summary.json").read_text())["tta_mode"] == "flip_shift"


def test_eval_on_another_machine_finds_the_data_by_fasttrain_data(cifar_dir, tmp_path, monkeypatch):
    """The checkpoint saves the training machine's data.dir; where that path is not, FASTTRAIN_DATA (as
    `eval --help` says) names this machine's copy instead of an error that suggests it in vain."""
    trained_with = tmp_path / "their-data"
    trained_with.symlink_to(cifar_dir, target_is_directory=True)
    cfg = tiny_config(trained_with, tmp_path / "run", train__epochs="1")
    summary = Trainer(cfg, device="cpu", console=quiet()).fit()
    trained_with.unlink()
    monkeypatch.setenv("FASTTRAIN_DATA", str(cifar_dir))
    result = evaluate_checkpoint(tmp_path / "run" / "last.pt", device="cpu")
    assert result["test_acc"] == pytest.approx(summary["final_test_acc"])


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


def test_ema_bn_recompute_without_an_ema_is_unused(cifar_dir, tmp_path):
    """train.ema_bn concerns the EMA's statistics: with train.ema_decay 0 (no EMA) a recompute setting is
    unused, as the config says, and scoring the run's weights (what the benchmarks do after fit) scores the
    model as it is instead of failing on an EMA that does not exist."""
    cfg = tiny_config(cifar_dir, tmp_path, **{"train.ema_bn": "recompute", "train.ema_decay": "0"})
    trainer = Trainer(cfg, device="cpu", console=quiet())
    expected = evaluate(trainer.model, trainer.data.test, trainer.precision, trainer.device)
    assert trainer.accuracy_by_tta(["none"]) == {"test": {"none": expected}}


RECOMPUTE = {"train.ema_decay": "0.9", "train.ema_warmup_steps": "4", "data.val_size": "200"}


def test_ema_bn_recompute_through_the_trainer(cifar_dir, tmp_path):
    """train.ema_bn recompute: the run trains exactly as with average (same data, RNG, live weights and EMA
    weights); only the EMA's BN statistics differ, and they are update_bn's on the first ema_bn_batches
    training batches of the epoch just trained, applied to the EMA weights. Those are what is evaluated
    (per epoch, off the clock, and at the end), saved, and scored again by `eval`; the final recompute
    counts in train_seconds."""
    averaged = Trainer(tiny_config(cifar_dir, tmp_path / "a", **RECOMPUTE), device="cpu", console=quiet())
    a = averaged.fit()  # saves after both epochs: prev.pt holds epoch 1
    trainer = Trainer(tiny_config(cifar_dir, tmp_path / "r", **RECOMPUTE, **{
        "train.ema_bn": "recompute", "train.ema_bn_batches": "3", "train.checkpoint_every": "2"}),
        device="cpu", console=quiet())
    r = trainer.fit()  # evaluates after epoch 1 without saving
    for k, v in averaged.model.state_dict().items():
        assert torch.equal(trainer.model.state_dict()[k], v), k
    for k, v in averaged.ema.module.named_parameters():
        assert torch.equal(dict(trainer.ema.module.named_parameters())[k], v), k
    assert not torch.equal(batch_norms(trainer.ema.module)[0].running_var, batch_norms(averaged.ema.module)[0].running_var)

    def recomputed(ema_state, epoch):  # the reference: update_bn on that epoch's first 3 training batches
        module = copy.deepcopy(averaged.ema.module)
        module.load_state_dict(ema_state)
        loader = trainer.data.train
        loader.set_epoch(epoch)
        update_bn([images for images, _ in itertools.islice(loader, 3)], module)
        return module.eval()

    reference = recomputed(averaged.ema.state_dict(), 1)
    expected = _buffers(reference)
    got = _buffers(trainer.ema.module)
    assert got.keys() == expected.keys() and len(got) > 3
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=1e-6, atol=1e-7, msg=k)
    for k, v in load_checkpoint(tmp_path / "r" / "last.pt")["ema"].items():  # saved: the recomputed statistics
        assert torch.equal(v, trainer.ema.state_dict()[k]), k
    for split, data in (("val", trainer.data.val), ("test", trainer.data.test)):
        assert r[f"final_{split}_acc"] == evaluate(reference, data, trainer.precision, trainer.device), split
    assert evaluate_checkpoint(tmp_path / "r" / "last.pt", device="cpu", data_dir=str(cifar_dir))["test_acc"] == \
        r["final_test_acc"]
    rows = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    epoch1 = recomputed(load_checkpoint(tmp_path / "a" / "prev.pt")["ema"], 0)
    assert rows[0]["val_acc"] == evaluate(epoch1, trainer.data.val, trainer.precision, trainer.device)
    assert (r["ema_bn"], a["ema_bn"], a["ema_bn_seconds"]) == ("recompute", "average", None)
    assert r["ema_bn_seconds"] > 0
    assert r["train_seconds"] == pytest.approx(sum(row["epoch_seconds"] for row in rows) + r["ema_bn_seconds"])

    with torch.no_grad():  # a checkpoint written where nothing recomputed yet recomputes first
        for bn in batch_norms(trainer.ema.module):
            bn.running_var.fill_(5.0)
    trainer._ema_bn_at = None
    trainer.save_checkpoint(2, name="again.pt")
    for k, v in _buffers(reference).items():
        torch.testing.assert_close(load_checkpoint(tmp_path / "r" / "again.pt")["ema"][k], v, rtol=1e-6, atol=1e-7)


def test_ema_bn_recompute_resumes_exactly(cifar_dir, tmp_path):
    """2 epochs in one go == 1 epoch, stop, resume, 1 more, with train.ema_bn recompute. The run in one go
    neither evaluates nor saves after epoch 1, so it recomputes only at the end; the stopped run
    recomputes after epoch 1 too (to evaluate and save): the statistics depend on the EMA weights and
    the batches only, so the final EMA is the same bit for bit."""
    settings = {**RECOMPUTE, "train.ema_bn": "recompute", "train.ema_bn_batches": "2", "train.eval_every": "2",
                "train.checkpoint_every": "2"}
    straight = Trainer(tiny_config(cifar_dir, tmp_path / "a", **settings), device="cpu", console=quiet())
    full = straight.fit()
    half = Trainer(tiny_config(cifar_dir, tmp_path / "b", **settings), device="cpu", console=quiet())
    half.fit(stop_after_epochs=1)
    saved = load_checkpoint(tmp_path / "b" / "last.pt")["ema"]
    counts = {int(v) for k, v in saved.items() if k.endswith("num_batches_tracked")}
    assert counts == {2}  # recomputed after epoch 1 (averaged, it would be the live model's 10 steps)
    resumed = Trainer(tiny_config(cifar_dir, tmp_path / "b", **settings), device="cpu", console=quiet(),
                      resume=tmp_path / "b" / "last.pt")
    summary = resumed.fit()
    for a, b in ((straight.model.state_dict(), resumed.model.state_dict()),
                 (straight.ema.state_dict(), resumed.ema.state_dict())):
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), k
    assert summary["final_test_acc"] == full["final_test_acc"]
    assert summary["final_val_acc"] == full["final_val_acc"]
