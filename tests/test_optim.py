"""Lookahead, schedules and clipping against plain references."""
import math

import pytest
import torch

from fasttrain.config import OptimConfig
from fasttrain.optim import LRSchedule, Lookahead, build_optimizer, clip_gradients


def _problem(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    data = [(torch.randn(16, 6), torch.randint(0, 3, (16,))) for _ in range(23)]
    return model, data


def _loss(model, x, y):
    return torch.nn.functional.cross_entropy(model(x), y)


@pytest.mark.parametrize("k, alpha", [(1, 0.5), (5, 0.5), (3, 0.8)])
def test_lookahead_matches_a_hand_written_reference(k, alpha):
    model, data = _problem()
    ref_model, _ = _problem()
    opt = Lookahead(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), k=k, alpha=alpha)
    ref_opt = torch.optim.SGD(ref_model.parameters(), lr=0.1, momentum=0.9)
    slow = [p.detach().clone() for p in ref_model.parameters()]
    for step, (x, y) in enumerate(data, start=1):
        for m, o in ((model, opt), (ref_model, ref_opt)):
            o.zero_grad()
            _loss(m, x, y).backward()
            o.step()
        if step % k == 0:
            with torch.no_grad():
                for s, p in zip(slow, ref_model.parameters()):
                    s += alpha * (p - s)
                    p.copy_(s)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_state_dict_round_trip_resumes_identically(name):
    cfg = OptimConfig(name=name, lr=0.05, lookahead_k=5)
    model, data = _problem()
    opt = build_optimizer(model.parameters(), cfg)
    for x, y in data[:7]:  # stop mid Lookahead period
        opt.zero_grad(); _loss(model, x, y).backward(); opt.step()
    saved_model = {k: v.clone() for k, v in model.state_dict().items()}
    saved_opt = opt.state_dict()
    torch.save(saved_opt, buf := __import__("io").BytesIO())
    buf.seek(0)
    loaded_opt_state = torch.load(buf, weights_only=True)
    for x, y in data[7:]:
        opt.zero_grad(); _loss(model, x, y).backward(); opt.step()

    model2, _ = _problem(seed=1)  # other initial weights: everything must come from the checkpoint
    model2.load_state_dict(saved_model)
    opt2 = build_optimizer(model2.parameters(), cfg)
    opt2.load_state_dict(loaded_opt_state)
    for x, y in data[7:]:
        opt2.zero_grad(); _loss(model2, x, y).backward(); opt2.step()
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)


def test_lookahead_k0_is_the_plain_optimizer():
    model, _ = _problem()
    assert isinstance(build_optimizer(model.parameters(), OptimConfig(lookahead_k=0)), torch.optim.SGD)


def test_cosine_schedule_shape():
    model, _ = _problem()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    sched = LRSchedule(opt, OptimConfig(lr=0.4, schedule="cosine", warmup_epochs=1, final_lr_frac=0.1),
                       steps_per_epoch=10, epochs=5)
    lrs = [sched.lr_at(s) for s in range(50)]
    assert lrs[0] == pytest.approx(0.04) and lrs[9] == pytest.approx(0.4)      # linear warmup over 10 steps
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))                    # then non-increasing
    assert sched.lr_at(10 + 20) == pytest.approx(0.04 + 0.36 * 0.5)          # half-way down the cosine
    assert sched.lr_at(50) == pytest.approx(0.04)                              # ends at final_lr_frac
    assert lrs[10] == pytest.approx(0.4) and max(lrs) <= 0.4 + 1e-12          # the peak, never above it
    assert sched.lr_at(50 + 7) == pytest.approx(0.04)                          # and stays at the floor
    assert opt.param_groups[0]["lr"] == pytest.approx(lrs[0])
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(lrs[1])


def test_a_fractional_warmup_rounds_to_the_nearest_step():
    model, _ = _problem()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    assert LRSchedule(opt, OptimConfig(warmup_epochs=0.29), steps_per_epoch=10, epochs=2).warmup_steps == 3
    assert LRSchedule(opt, OptimConfig(warmup_epochs=0.21), steps_per_epoch=10, epochs=2).warmup_steps == 2


def test_a_warmup_as_long_as_the_run_still_reaches_the_peak():
    """warmup_epochs beyond the run: the warmup takes every step but the last, which trains at the peak
    (a warmup of all of them would never reach it)."""
    model, _ = _problem()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    sched = LRSchedule(opt, OptimConfig(lr=0.5, schedule="cosine", warmup_epochs=5), steps_per_epoch=10, epochs=2)
    assert sched.warmup_steps == 19
    assert sched.lr_at(0) == pytest.approx(0.5 / 19) and sched.lr_at(18) == pytest.approx(0.5)


def test_linear_and_constant_schedules():
    model, _ = _problem()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    lin = LRSchedule(opt, OptimConfig(lr=1.0, schedule="linear"), steps_per_epoch=4, epochs=1)
    assert [lin.lr_at(s) for s in range(4)] == pytest.approx([1.0, 0.75, 0.5, 0.25])
    const = LRSchedule(opt, OptimConfig(lr=0.3, schedule="constant"), steps_per_epoch=4, epochs=3)
    assert {const.lr_at(s) for s in range(12)} == {0.3}


def test_schedule_state_resumes():
    model, _ = _problem()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    cfg = OptimConfig(lr=0.2)
    a = LRSchedule(opt, cfg, 7, 3)
    for _ in range(11):
        a.step()
    b = LRSchedule(opt, cfg, 7, 3)
    b.load_state_dict(a.state_dict())
    assert b.lr == a.lr and opt.param_groups[0]["lr"] == pytest.approx(a.lr_at(11))


def test_clipping_by_value_and_norm():
    model, data = _problem()
    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=0.1)
    _loss(model, *data[0]).mul(100).backward()
    clip_gradients(params, OptimConfig(clip="value", clip_value=0.01), opt)
    assert max(p.grad.abs().max().item() for p in params) <= 0.01 + 1e-9
    opt.zero_grad()
    _loss(model, *data[0]).mul(100).backward()
    clip_gradients(params, OptimConfig(clip="norm", clip_value=0.5), opt)
    total = math.sqrt(sum(p.grad.pow(2).sum().item() for p in params))
    assert total == pytest.approx(0.5, rel=1e-4)


@pytest.mark.parametrize("impl", ["torch", "fused"])
def test_no_decay_on_norm_and_bias_when_asked(impl):
    """optim.decay_norm_and_bias false: with zero gradients, one step shrinks only the conv/linear
    weights (weight decay); BN scales/shifts and biases stay. The default decays everything (the paper)."""
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                              torch.nn.LazyLinear(2))
    net(torch.randn(1, 3, 5, 5))  # materialize the lazy layer
    for decay_all in (True, False):
        params = [p.detach().clone().requires_grad_() for p in net.parameters()]
        for p in params:
            p.data.fill_(1.0)
            p.grad = torch.zeros_like(p)
        cfg = OptimConfig(impl=impl, lr=0.1, momentum=0.0, weight_decay=0.5, clip="none", lookahead_k=0,
                          decay_norm_and_bias=decay_all)
        opt = build_optimizer(params, cfg)
        assert len(opt.param_groups) == (1 if decay_all else 2)
        opt.step()
        for p in params:
            decayed = decay_all or p.ndim > 1
            assert torch.allclose(p, torch.full_like(p, 0.95 if decayed else 1.0)), (p.ndim, decay_all)
