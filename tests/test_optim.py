"""Lookahead, schedules and clipping against plain references."""
import math

import pytest
import torch

from fasttrain.config import OptimConfig
from fasttrain.optim import LRSchedule, Lookahead, build_optimizer, clip_gradients, with_hyperparameters_of


def _problem(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    data = [(torch.randn(16, 6), torch.randint(0, 3, (16,))) for _ in range(23)]
    return model, data


def _loss(model, x, y):
    return torch.nn.functional.cross_entropy(model(x), y)


def _step(model, opt, x, y) -> None:
    """One training step of `model` on the batch (x, y) with `opt`."""
    opt.zero_grad()
    _loss(model, x, y).backward()
    opt.step()


@pytest.mark.parametrize("k, alpha", [(1, 0.5), (5, 0.5), (3, 0.8)])
def test_lookahead_matches_a_hand_written_reference(k, alpha):
    model, data = _problem()
    ref_model, _ = _problem()
    opt = Lookahead(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), k=k, alpha=alpha)
    ref_opt = torch.optim.SGD(ref_model.parameters(), lr=0.1, momentum=0.9)
    slow = [p.detach().clone() for p in ref_model.parameters()]
    for step, (x, y) in enumerate(data, start=1):
        for m, o in ((model, opt), (ref_model, ref_opt)):
            _step(m, o, x, y)
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
        _step(model, opt, x, y)
    saved_model = {k: v.clone() for k, v in model.state_dict().items()}
    saved_opt = opt.state_dict()
    torch.save(saved_opt, buf := __import__("io").BytesIO())
    buf.seek(0)
    loaded_opt_state = torch.load(buf, weights_only=True)
    for x, y in data[7:]:
        _step(model, opt, x, y)

    model2, _ = _problem(seed=1)  # other initial weights: everything must come from the checkpoint
    model2.load_state_dict(saved_model)
    opt2 = build_optimizer(model2.parameters(), cfg)
    opt2.load_state_dict(loaded_opt_state)
    for x, y in data[7:]:
        _step(model2, opt2, x, y)
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


def test_the_longest_accepted_warmup_is_a_warmup_as_long_as_the_run():
    """The config accepts any finite warmup_epochs: one whose step count overflows to infinity (1e308 epochs
    of 10 steps) plans the same schedule as a warmup of 5 epochs, not an OverflowError."""
    model, _ = _problem()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    sched = LRSchedule(opt, OptimConfig(lr=0.5, warmup_epochs=1e308), steps_per_epoch=10, epochs=2)
    five = LRSchedule(opt, OptimConfig(lr=0.5, warmup_epochs=5), steps_per_epoch=10, epochs=2)
    assert sched.warmup_steps == 19
    assert [sched.lr_at(step) for step in range(20)] == [five.lr_at(step) for step in range(20)]


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


# ------------------------------------------------------------------------------- what mutants showed
def test_lookahead_refuses_k_and_alpha_outside_their_range_and_alpha_1_is_plain_sgd_synced():
    """k 0 would divide by zero at the first step; alpha 1 (the config's upper edge) is allowed: the slow
    weights jump to the fast ones, so the trajectory is plain SGD's."""
    model, data = _problem()
    for k, alpha in ((0, 0.5), (-1, 0.5), (5, 0.0), (5, 1.5)):
        with pytest.raises(ValueError, match="Lookahead"):
            Lookahead(torch.optim.SGD(model.parameters(), lr=0.1), k=k, alpha=alpha)
    ref_model, _ = _problem()
    opt = build_optimizer(model.parameters(), OptimConfig(lr=0.1, clip="none", lookahead_k=3, lookahead_alpha=1.0))
    ref = torch.optim.SGD(ref_model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    for x, y in data[:7]:
        for m, o in ((model, opt), (ref_model, ref)):
            _step(m, o, x, y)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)


def test_a_state_saved_without_lookahead_starts_lookahead_at_the_current_weights():
    """A resume that switches Lookahead on: the inner state loads and the slow weights are the parameters
    as they are now (the resumed ones), not those the optimizer was built with; the k-step count restarts."""
    model, data = _problem()
    plain = build_optimizer(model.parameters(), OptimConfig(lookahead_k=0))
    for x, y in data[:2]:
        _step(model, plain, x, y)
    opt = build_optimizer(model.parameters(), OptimConfig(lookahead_k=5))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # what loading the checkpoint's weights does after the optimizer was built
    opt.lookahead_step = 3
    opt.load_state_dict(plain.state_dict())
    assert opt.lookahead_step == 0
    for s, p in zip(opt.slow, model.parameters()):
        torch.testing.assert_close(s, p.detach(), rtol=0, atol=0)
    for p in model.parameters():
        torch.testing.assert_close(opt.state[p]["momentum_buffer"], plain.state[p]["momentum_buffer"], rtol=0, atol=0)


def test_with_hyperparameters_of_keeps_the_saved_state_and_takes_the_optimizers_settings():
    model, data = _problem()
    old = build_optimizer(model.parameters(), OptimConfig(lookahead_k=0, momentum=0.9, weight_decay=5e-4))
    _step(model, old, *data[0])
    new = build_optimizer(model.parameters(), OptimConfig(lookahead_k=0, momentum=0.5, weight_decay=0.01))
    saved = old.state_dict()
    merged = with_hyperparameters_of(new, saved)
    assert merged["state"] is saved["state"] and merged["param_groups"][0]["params"] == saved["param_groups"][0]["params"]
    assert (merged["param_groups"][0]["momentum"], merged["param_groups"][0]["weight_decay"]) == (0.5, 0.01)
    assert saved["param_groups"][0]["momentum"] == 0.9  # the saved dict itself is left alone
    two_groups = build_optimizer(model.parameters(), OptimConfig(lookahead_k=0, decay_norm_and_bias=False))
    assert with_hyperparameters_of(two_groups, saved) is saved  # groups that do not pair: load_state_dict refuses


@pytest.mark.parametrize("impl, name, nesterov", [("torch", "sgd", False), ("torch", "sgd", True),
                                                  ("fused", "sgd", False), ("fused", "sgd", True),
                                                  ("torch", "adamw", False)])
def test_build_optimizer_hands_every_setting_to_the_optimizer(impl, name, nesterov):
    """Each config value reaches the optimizer: its trajectory is that of torch's optimizer built from
    the same numbers (none of them a default) inside a Lookahead of the same k and alpha."""
    cfg = OptimConfig(impl=impl, name=name, lr=0.05, momentum=0.8, nesterov=nesterov, weight_decay=0.01,
                      betas=[0.8, 0.95], eps=1e-3, clip="none", lookahead_k=3, lookahead_alpha=0.7)
    model, data = _problem()
    ref_model, _ = _problem()
    opt = build_optimizer(model.parameters(), cfg)
    if name == "sgd":
        inner = torch.optim.SGD(ref_model.parameters(), lr=0.05, momentum=0.8, nesterov=nesterov, weight_decay=0.01)
    else:
        inner = torch.optim.AdamW(ref_model.parameters(), lr=0.05, betas=(0.8, 0.95), eps=1e-3, weight_decay=0.01)
    ref = Lookahead(inner, k=3, alpha=0.7)
    for x, y in data[:8]:
        for m, o in ((model, opt), (ref_model, ref)):
            _step(m, o, x, y)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("clip, expected", [("value", [0.9, 0.95]), ("norm", [-1.0, 0.95]), ("none", [-1.0, 0.95])])
def test_the_fused_step_clamps_gradients_only_for_clip_value(clip, expected):
    """clip norm is the caller's (clip_gradients, before the step): the fused kernel must not also clamp each
    element to clip_value, which would clip the gradient twice."""
    p = torch.nn.Parameter(torch.ones(2))
    p.grad = torch.tensor([2.0, 0.05])
    opt = build_optimizer([p], OptimConfig(impl="fused", lr=1.0, momentum=0.0, weight_decay=0.0, clip=clip,
                                           clip_value=0.1, lookahead_k=0))
    opt.step()
    torch.testing.assert_close(p.detach(), torch.tensor(expected))


def test_the_schedule_sets_every_groups_lr():
    """optim.decay_norm_and_bias false makes two groups: the one without weight decay follows the schedule
    too (it kept the peak lr otherwise); `lr` is the lr the next step trains with."""
    model, _ = _problem()
    cfg = OptimConfig(lr=0.4, warmup_epochs=1, decay_norm_and_bias=False)
    opt = build_optimizer(model.parameters(), cfg)
    sched = LRSchedule(opt, cfg, steps_per_epoch=4, epochs=3)
    assert len(opt.param_groups) == 2
    for step in range(12):
        assert [g["lr"] for g in opt.param_groups] == [sched.lr_at(step)] * 2 and sched.lr == sched.lr_at(step)
        sched.step()
