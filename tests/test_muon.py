"""optim.name muon (fasttrain/muon.py) against references written from its formulas; on a GPU, its step as a
CUDA graph against the eager step."""
import math

import pytest
import torch

from fasttrain.config import ConfigError, OptimConfig, load_config
from fasttrain.graph import graph_problems
from fasttrain.checkpoint import CheckpointError
from fasttrain.model import build_model, squeeze_excite_weights
from fasttrain.muon import (NS_COEFFICIENTS, Muon, _bank_slot, muon_param_groups, orthogonalize,
                           orthogonalize_flops)
from fasttrain.optim import LRSchedule, build_optimizer
from fasttrain.trainer import Trainer
from test_train import quiet, tiny_config


@pytest.mark.parametrize("shape", [(5, 7), (7, 5), (64, 576), (128, 64), (3, 16, 144), (1, 1)],
                         ids=["wide", "tall", "filters-64x3x3", "shortcut-tall", "batched", "1x1"])
def test_orthogonalize_keeps_the_singular_vectors_and_pulls_the_singular_values_towards_1(shape):
    """Newton-Schulz changes only the singular values (U f(S) V^T): U^T O V is diagonal, and the quintic's
    five steps leave them in about 0.68..1.13 (from ~1e-2 x the largest up), whatever the input's scale."""
    torch.manual_seed(0)
    m = torch.randn(shape, dtype=torch.float64) * 37.0
    o = orthogonalize(m, dtype=torch.float64)
    assert o.shape == m.shape and o.dtype == torch.float64
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    core = u.mT @ o @ vh.mT  # [.., k, k]: diagonal iff O shares m's singular vectors
    diag = torch.diagonal(core, dim1=-2, dim2=-1)
    off = core - torch.diag_embed(diag)
    assert off.abs().max() < 1e-6
    kept = s >= 1e-2 * s[..., :1]  # tiny singular values rise slowly from 0 (Muon does not care)
    assert diag[kept].min() > 0.6 and diag.max() < 1.2


@pytest.mark.parametrize("shape", [(64, 27), (128, 576), (256, 2304), (256, 128), (4, 64)],
                         ids=["stem", "stage-2", "stage-3", "shortcut-tall", "se-squeeze"])
def test_orthogonalize_in_bf16_as_on_a_gpu(shape):
    """A GPU step orthogonalizes in bf16 (8 mantissa bits): on best.yaml's bank shapes, from a gradient's small
    scale, the result still shares m's singular vectors to 0.05 and holds its singular values in 0.6..1.25
    (measured on this CPU: 0.67..1.15, off-diagonal at most 0.031)."""
    torch.manual_seed(0)
    m = torch.randn(shape) * 1e-3
    o = orthogonalize(m, dtype=torch.bfloat16)
    assert o.dtype == torch.bfloat16 and o.shape == m.shape
    u, _, vh = torch.linalg.svd(m, full_matrices=False)
    core = u.mT @ o.float() @ vh.mT
    diag = torch.diagonal(core)
    assert (core - torch.diag(diag)).abs().max() < 0.05
    assert diag.min() > 0.6 and diag.max() < 1.25


def test_orthogonalize_is_the_documented_quintic():
    """One step by hand: x <- a x + (b xx^T + c (xx^T)^2) x on x / ||x||_F."""
    torch.manual_seed(1)
    m = torch.randn(4, 9, dtype=torch.float64)
    a, b, c = NS_COEFFICIENTS
    x = m / (m.norm() + 1e-7)
    g = x @ x.T
    torch.testing.assert_close(orthogonalize(m, steps=1, dtype=torch.float64), a * x + (b * g + c * g @ g) @ x)


def test_each_newton_schulz_iteration_brings_the_small_singular_values_closer_to_1():
    """What optim.muon_ns_steps trades: on a filter bank's shape with singular values spread over 3 decades,
    every added iteration up to Muon's 5 raises the smallest kept ones (each multiplies a small one by
    ~3.4445; measured here: 0.015, 0.053, 0.18, 0.59, 0.68, where a 6th leaves them), none past 1.25; 3
    iterations leave a direction at 1% of the largest at under half the step of the largest ones."""
    torch.manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(64, 64, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(576, 64, dtype=torch.float64))
    s = torch.logspace(0, -3, 64, dtype=torch.float64)
    m = u @ torch.diag(s) @ v.T
    lows = []
    for steps in range(1, 6):
        core = u.T @ orthogonalize(m, steps=steps, dtype=torch.float64) @ v
        sv = torch.diagonal(core)
        assert sv.max() < 1.25, steps
        lows.append(float(sv[s >= 1e-2].min()))
    assert all(a < b for a, b in zip(lows, lows[1:])), lows
    assert lows[2] < 0.5 < 0.6 < lows[4], lows  # 3 iterations against Muon's 5


def test_orthogonalize_flops_counts_the_products_of_every_filter_bank():
    """By hand for two banks, and best.yaml's figure the README quotes (13.9 GFLOPs a step, 21 banks)."""
    banks = [torch.zeros(16, 8, 3, 3), torch.zeros(32, 8, 1, 1), torch.zeros(10, 5)]  # the last is no filter bank
    per_iteration = (4 * 16 ** 2 * 72 + 2 * 16 ** 3) + (4 * 8 ** 2 * 32 + 2 * 8 ** 3)  # 72 = 8*3*3; 32x8 is tall
    assert orthogonalize_flops(banks) == 5 * per_iteration
    model = build_model(load_config("configs/best.yaml", []).model, device="cpu")
    assert sum(p.ndim == 4 for p in model.parameters()) == 21
    assert orthogonalize_flops(model.parameters()) == pytest.approx(13.86e9, rel=1e-3)
    # padded: every bank counted at the largest wide orientation, 256 x 2304 (64 x 27's, too: its padding)
    assert orthogonalize_flops(banks, batching="padded") == 2 * 5 * (4 * 16 ** 2 * 72 + 2 * 16 ** 3)
    padded = 21 * 5 * (4 * 256 ** 2 * 2304 + 2 * 256 ** 3)  # 67 GFLOPs
    assert orthogonalize_flops(model.parameters(), batching="padded") == padded


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_a_banks_slot_is_its_matrix_at_the_top_left_of_the_padded_batch(layout):
    """The padded batch holds bank i's [out, in*kh*kw] matrix (a tall one transposed, as Newton-Schulz runs
    it) in its top-left corner and zeros elsewhere, whatever the bank's memory layout."""
    torch.manual_seed(0)
    banks = [torch.randn(4, 2, 3, 3), torch.randn(6, 2, 1, 1), torch.randn(3, 5, 1, 1)]  # 4x18, tall 6x2, 3x5
    banks = [b.contiguous(memory_format=layout) for b in banks]
    padded = torch.zeros(3, 4, 18)
    for i, b in enumerate(banks):
        _bank_slot(padded, i, b).copy_(b)
    expected = torch.zeros(3, 4, 18)
    expected[0, :4, :18] = banks[0].reshape(4, 18)
    expected[1, :2, :6] = banks[1].reshape(6, 2).T
    expected[2, :3, :5] = banks[2].reshape(3, 5)
    assert torch.equal(padded, expected)
    for i, b in enumerate(banks):
        assert torch.equal(_bank_slot(padded, i, b), b)  # and read back as the bank


def test_newton_schulz_on_a_zero_padded_batch_is_newton_schulz_on_each_matrix():
    """Why optim.muon_batching padded is the same update: each matrix's result sits in its top-left block
    and the padding stays exactly zero."""
    torch.manual_seed(0)
    mats = [torch.randn(5, 9, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64) * 50,
            torch.randn(6, 6, dtype=torch.float64) * 1e-3]
    padded = torch.zeros(3, 6, 9, dtype=torch.float64)
    for i, m in enumerate(mats):
        padded[i, :m.size(0), :m.size(1)] = m
    out = orthogonalize(padded, dtype=torch.float64)
    for i, m in enumerate(mats):
        torch.testing.assert_close(out[i, :m.size(0), :m.size(1)], orthogonalize(m, dtype=torch.float64))
        rest = out[i].clone()
        rest[:m.size(0), :m.size(1)] = 0
        assert not rest.any()


def _net(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1, bias=False), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3, padding=1, bias=False), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 16, 1, bias=False),  # a 1x1 shortcut-like bank: 16 x 8 is tall
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, 4))


def _batches(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(6, 3, 8, 8, generator=g), torch.randint(0, 4, (6,), generator=g)) for _ in range(n)]


def _train(net, opt, batches, lrs=None):
    for i, (x, y) in enumerate(batches):
        if lrs is not None:
            for group in opt.param_groups:
                group["lr"] = lrs[i] * group.get("lr_scale", 1.0)
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()


def _muon(net, *, lr=0.1, muon_lr=0.05, wd=5e-4, nesterov=True, batching="shape", ns_steps=5, normalize=False):
    params = list(net.parameters())
    others = [{"params": [p for p in params if p.ndim != 4]}]
    groups = muon_param_groups([p for p in params if p.ndim == 4], others, lr=lr, muon_lr=muon_lr, muon_momentum=0.95,
                               weight_decay=wd)
    return Muon(groups, lr=lr, momentum=0.9, nesterov=nesterov, weight_decay=wd, batching=batching,
                ns_steps=ns_steps, normalize=normalize)


@pytest.mark.parametrize("ns_steps, normalize", [(5, False), (3, False), (5, True)],
                         ids=["ns5", "ns3", "normalized"])
@pytest.mark.parametrize("batching", ["shape", "padded"])
@pytest.mark.parametrize("nesterov", [True, False])
def test_muon_matches_its_formulas_step_by_step(nesterov, batching, ns_steps, normalize):
    """Filters: buf = mu buf + g; d = g + mu buf; p = p (1 - lr wd) - lr sqrt(max(1, rows/cols)) NS(d), or with
    normalize p = p sqrt(out) / ||p||_F - lr sqrt(max(1, rows/cols)) NS(d); the rest: torch.optim.SGD's update
    (L2, momentum, Nesterov as configured), with the lr changing every step. Both batchings of the banks (by
    shape, or all in one zero-padded batch) take this update, NS with the configured count of Newton-Schulz
    iterations."""
    net, ref = _net(), _net()
    opt = _muon(net, nesterov=nesterov, batching=batching, ns_steps=ns_steps, normalize=normalize)
    lr_scale = 0.05 / 0.1
    ref_others = torch.optim.SGD([p for p in ref.parameters() if p.ndim != 4], lr=0.1, momentum=0.9,
                                 nesterov=nesterov, weight_decay=5e-4)
    ref_filters = [p for p in ref.parameters() if p.ndim == 4]
    bufs = [torch.zeros_like(p) for p in ref_filters]
    lrs = [0.1, 0.05, 0.2, 0.01]
    batches = _batches(len(lrs))
    _train(net, opt, batches, lrs)
    for lr, (x, y) in zip(lrs, batches):
        ref.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(ref(x), y).backward()
        for group in ref_others.param_groups:
            group["lr"] = lr
        ref_others.step()
        with torch.no_grad():
            for p, buf in zip(ref_filters, bufs):
                buf.mul_(0.95).add_(p.grad)
                d = p.grad + 0.95 * buf
                rows, cols = p.shape[0], p[0].numel()
                o = orthogonalize(d.reshape(rows, cols), steps=ns_steps).reshape(p.shape)
                p.mul_(math.sqrt(rows) / p.norm() if normalize else 1 - lr * lr_scale * 5e-4)
                p.sub_(lr * lr_scale * math.sqrt(max(1.0, rows / cols)) * o)
    for (name, a), b in zip(ref.named_parameters(), net.parameters()):
        torch.testing.assert_close(b, a, atol=2e-6, rtol=1e-5, msg=name)
    for p, buf in zip([p for p in net.parameters() if p.ndim == 4], bufs):
        torch.testing.assert_close(opt.state[p]["momentum_buffer"], buf, atol=2e-6, rtol=1e-5)


def test_muon_buffers_exist_from_construction_in_the_parameters_layout():
    """A CUDA graph's warmup snapshot and capture must find every tensor a step changes before the first
    step: zero momentum buffers with each parameter's strides (channels_last filters stay channels_last)."""
    net = _net().to(memory_format=torch.channels_last)
    opt = _muon(net)
    for p in net.parameters():
        buf = opt.state[p]["momentum_buffer"]
        assert buf.stride() == p.stride() and not buf.any()
    assert opt.build_count == 1


@pytest.mark.parametrize("batching", ["shape", "padded"])
def test_a_channels_last_network_takes_the_same_steps_as_a_contiguous_one(batching):
    """The trainer runs channels_last: its filters' gradients and directions are channels_last 4-D tensors,
    which the step stacks and views as [bank, rows, cols] (a copy there), or copies into the padded batch;
    the layout must not change a step. The same gradients go to both (a backward through channels_last
    convolutions rounds differently, ~1e-8, which Newton-Schulz amplifies in a small rank-deficient bank),
    four steps at changing rates; a bank without a gradient is left alone (its buffer too)."""
    plain, last = _net(), _net().to(memory_format=torch.channels_last)
    assert any(p.ndim == 4 and not p.is_contiguous() for p in last.parameters())
    opts = _muon(plain, batching=batching), _muon(last, batching=batching)
    idle = [p for p in last.parameters() if p.ndim == 4][1]
    idle_before = idle.detach().clone()
    g = torch.Generator().manual_seed(3)
    for lr in (0.1, 0.05, 0.2, 0.01):
        for a, b in zip(plain.parameters(), last.parameters()):
            a.grad = torch.randn(a.shape, generator=g) * 1e-2
            b.grad = a.grad.clone().to(memory_format=torch.channels_last) if b.ndim == 4 else a.grad.clone()
            if b is idle:
                a.grad = b.grad = None
        for opt in opts:
            for group in opt.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)
            opt.step()
    for (name, a), b in zip(plain.named_parameters(), last.parameters()):
        torch.testing.assert_close(b, a, atol=1e-7, rtol=1e-6, msg=name)
        assert b.ndim != 4 or b.is_contiguous(memory_format=torch.channels_last), name  # the update kept the layout
    assert torch.equal(idle, idle_before) and not opts[1].state[idle]["momentum_buffer"].any()


def test_muon_state_dict_resumes_the_same_trajectory():
    """3 steps, save, a fresh net and optimizer load it, 3 more == 6 steps straight; the load rebuilds
    (build_count: a captured graph would hold the old buffers' addresses)."""
    batches = _batches(6)
    net = _net()
    opt = _muon(net)
    _train(net, opt, batches)
    other = _net(seed=5)
    opt2 = _muon(other)
    half = _net()
    opt_half = _muon(half)
    _train(half, opt_half, batches[:3])
    other.load_state_dict(half.state_dict())
    opt2.load_state_dict(opt_half.state_dict())
    assert opt2.build_count == 2
    _train(other, opt2, batches[3:])
    for a, b in zip(net.parameters(), other.parameters()):
        assert torch.equal(a, b)


def test_an_unchanged_lr_is_not_written_again_and_a_changed_one_is():
    """The lr reaches its device tensor only when it changes (what keeps a CUDA-graph capture free of writes)."""
    net = _net()
    opt = _muon(net)
    tensors = opt._lr_tensors
    assert [float(t) for t in tensors] == pytest.approx([0.05, 0.1])
    opt.param_groups[0]["lr"] = 0.5
    opt._sync_hyperparameters()
    assert [float(t) for t in tensors] == pytest.approx([0.5, 0.1])
    with torch.no_grad():
        tensors[1].fill_(7.0)  # stands in for "not rewritten": an unchanged lr leaves the tensor alone
    opt._sync_hyperparameters()
    assert float(tensors[1]) == 7.0


def test_a_zero_learning_rate_leaves_every_parameter_where_it_is():
    net = _net()
    before = [p.detach().clone() for p in net.parameters()]
    opt = _muon(net)
    _train(net, opt, _batches(2), lrs=[0.0, 0.0])
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))


def test_build_optimizer_passes_optim_muon_batching_and_ns_steps_and_muon_refuses_bad_ones():
    net = _net()
    for batching, ns_steps, normalize in (("shape", 5, False), ("padded", 3, True)):
        cfg = OptimConfig(name="muon", lookahead_k=0, muon_batching=batching, muon_ns_steps=ns_steps,
                          muon_normalize=normalize)
        opt = build_optimizer(net.parameters(), cfg)
        assert (opt.batching, opt.ns_steps, opt.normalize) == (batching, ns_steps, normalize)
    with pytest.raises(ValueError, match="batching"):
        _muon(net, batching="stacked")
    for bad in (0, 2.0):
        with pytest.raises(ValueError, match="ns_steps"):
            _muon(net, ns_steps=bad)


@pytest.mark.parametrize("placement", ["stem", "blocks"])
def test_optim_muon_se_false_leaves_the_se_layers_to_sgd(placement):
    """The SE blocks' fc1 / fc2 are 1x1 convolutions, filter banks by shape: Muon's with optim.muon_se true (the
    default), SGD's (with the head) with false; every other filter bank stays Muon's either way."""
    model_cfg = load_config("configs/best.yaml", ["--model.se_placement", placement]).model
    net = build_model(model_cfg, device="cpu")
    se = squeeze_excite_weights(net)
    assert len(se) == (2 if placement == "stem" else 2 * sum(model_cfg.blocks)) and all(p.ndim == 4 for p in se)
    filters = {id(p) for p in net.parameters() if p.ndim == 4}
    for muon_se, in_muon in ((True, filters), (False, filters - {id(p) for p in se})):
        cfg = OptimConfig(name="muon", lookahead_k=0, muon_se=muon_se, decay_norm_and_bias=False)
        opt = build_optimizer(net.parameters(), cfg, se)
        muon, decayed, plain = opt.param_groups
        assert muon["muon"] and {id(p) for p in muon["params"]} == in_muon, muon_se
        assert {id(p) for p in decayed["params"]} == {id(p) for p in net.parameters() if p.ndim > 1} - in_muon
        assert all(p.ndim == 1 for p in plain["params"]) and not decayed["muon"]


def test_a_muon_checkpoint_does_not_resume_under_the_other_muon_se(cifar_dir, tmp_path):
    """optim.muon_se moves the SE's weights between groups: a checkpoint's momentum buffers cannot pair up
    with the other grouping, and the error names the saved setting and the fix."""
    muon = {"optim__name": "muon", "optim__lookahead_k": "0"}
    saved = Trainer(tiny_config(cifar_dir, tmp_path, **muon), device="cpu", console=quiet())
    assert any(id(p) in {id(q) for q in saved.optimizer.param_groups[0]["params"]}
               for p in squeeze_excite_weights(saved.model))  # smoke.yaml has an SE: muon_se true takes it
    saved.save_checkpoint(1)
    with pytest.raises(CheckpointError, match="muon_se True.*config.yaml"):
        Trainer(tiny_config(cifar_dir, tmp_path, optim__muon_se="false", **muon), device="cpu", console=quiet(),
                resume=tmp_path / "last.pt")


def test_muon_refuses_a_non_filter_in_its_group():
    with pytest.raises(ValueError, match="convolution filters"):
        Muon([{"params": [torch.nn.Parameter(torch.zeros(3, 4))], "muon": True}])


def test_build_optimizer_puts_the_filters_in_muons_group_and_the_schedule_scales_it():
    net = _net()
    cfg = OptimConfig(name="muon", lr=0.4, muon_lr=0.1, muon_momentum=0.8, lookahead_k=0, decay_norm_and_bias=False,
                      nesterov=True, momentum=0.9, weight_decay=1e-3)
    opt = build_optimizer(net.parameters(), cfg)
    assert isinstance(opt, Muon)
    muon, decayed, plain = opt.param_groups
    assert muon["muon"] and {id(p) for p in muon["params"]} == {id(p) for p in net.parameters() if p.ndim == 4}
    assert (muon["momentum"], muon["lr_scale"], muon["weight_decay"]) == (0.8, pytest.approx(0.25), 1e-3)
    assert [p.ndim for p in decayed["params"]] == [2] and all(p.ndim == 1 for p in plain["params"])
    assert plain["weight_decay"] == 0.0 and not decayed["muon"] and decayed["momentum"] == 0.9
    schedule = LRSchedule(opt, OptimConfig(**{**cfg.__dict__, "schedule": "constant"}), steps_per_epoch=4, epochs=2)
    assert schedule.lr == pytest.approx(0.4)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.1, 0.4, 0.4])


@pytest.mark.parametrize("flags, key, words", [
    (["--optim.lookahead_k", "5"], "optim.lookahead_k", "--optim.lookahead_k 0"),
    (["--optim.lookahead_k", "0", "--optim.impl", "fused"], "optim.impl", "SGD only"),
    (["--optim.lookahead_k", "0", "--optim.muon_lr", "0"], "optim.muon_lr", "must be > 0"),
    (["--optim.lookahead_k", "0", "--optim.muon_momentum", "1.0"], "optim.muon_momentum", "0 <= momentum < 1"),
    (["--optim.lookahead_k", "0", "--optim.muon_batching", "stacked"], "optim.muon_batching", "padded"),
    (["--optim.lookahead_k", "0", "--optim.muon_ns_steps", "0"], "optim.muon_ns_steps", "must be 1..10"),
    (["--optim.lookahead_k", "0", "--optim.muon_ns_steps", "50"], "optim.muon_ns_steps", "must be 1..10"),
    (["--optim.lookahead_k", "0", "--optim.muon_ns_steps", "2.5"], "optim.muon_ns_steps", "int"),
])
def test_muon_config_mistakes_are_named(flags, key, words):
    with pytest.raises(ConfigError) as refused:
        load_config("configs/smoke.yaml", ["--optim.name", "muon", *flags])
    assert key in str(refused.value) and words in str(refused.value)


def test_the_cuda_graph_takes_muon_and_still_refuses_torch_sgd():
    muon = load_config("configs/best.yaml")  # best.yaml runs Muon with the graph
    assert muon.optim.name == "muon" and muon.train.cuda_graph
    assert graph_problems(muon, world_size=1, precision="bf16") == []
    sgd = load_config("configs/best.yaml", ["--optim.name", "sgd", "--optim.impl", "torch"])
    assert any("--optim.impl fused" in p for p in graph_problems(sgd, world_size=1, precision="bf16"))


@pytest.mark.parametrize("batching", ["shape", "padded"])
def test_smoke_run_with_muon_learns_and_resumes_exactly(cifar_dir, tmp_path, batching):
    """The trainer end to end: clearly above chance, and 1 epoch + resume + 1 epoch == 2 epochs (the momentum
    buffers and the schedule's position travel in the checkpoint), with either batching of the banks."""
    muon = {"optim__name": "muon", "optim__lookahead_k": "0", "optim__muon_lr": "0.05",
            "optim__muon_batching": batching}
    full = Trainer(tiny_config(cifar_dir, tmp_path / "a", **muon), device="cpu", console=quiet())
    assert full.optimizer.batching == batching
    summary = full.fit()
    assert summary["final_test_acc"] > 20.0, summary  # chance is 10%
    half = Trainer(tiny_config(cifar_dir, tmp_path / "b", **muon), device="cpu", console=quiet())
    half.fit(stop_after_epochs=1)
    resumed = Trainer(half.cfg, device="cpu", console=quiet(), resume=tmp_path / "b" / "last.pt")
    resumed.fit()
    for (name, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name


def test_a_muon_resume_trains_with_the_configs_muon_settings(cifar_dir, tmp_path):
    """A resume under another muon_lr / muon_momentum / muon_batching / muon_ns_steps / muon_normalize trains
    with them (the saved groups' values would otherwise come back with load_state_dict), the filters' lr the
    schedule's times the new ratio."""
    muon = {"optim__name": "muon", "optim__lookahead_k": "0"}
    Trainer(tiny_config(cifar_dir, tmp_path, **muon), device="cpu", console=quiet()).save_checkpoint(1)
    changed = tiny_config(cifar_dir, tmp_path, optim__muon_lr="0.02", optim__muon_momentum="0.5",
                          optim__muon_batching="padded", optim__muon_ns_steps="3", optim__muon_normalize="true",
                          **muon)
    resumed = Trainer(changed, device="cpu", console=quiet(), resume=tmp_path / "last.pt")
    # how the step batches its banks, how many iterations it runs and whether it normalizes are the config's
    assert (resumed.optimizer.batching, resumed.optimizer.ns_steps, resumed.optimizer.normalize) == ("padded", 3, True)
    filters, rest = resumed.optimizer.param_groups[:2]
    assert filters["muon"] and filters["momentum"] == 0.5 and not rest["muon"]
    lr = resumed.schedule.lr_at(resumed.schedule.step_count)
    assert (filters["lr"], rest["lr"]) == (pytest.approx(lr * 0.02 / changed.optim.lr), pytest.approx(lr))


@pytest.mark.gpu
@pytest.mark.parametrize("batching, normalize", [("shape", "false"), ("padded", "false"), ("shape", "true")])
def test_muon_replayed_as_a_cuda_graph_trains_like_the_eager_step(cifar_dir, tmp_path, batching, normalize):
    """Same init and batches, 8 steps with the lr changing every step: a learning rate frozen at capture, or a
    buffer the graph does not address, would show (fp32, deterministic kernels)."""
    settings = dict(optim__name="muon", optim__impl="torch", optim__lookahead_k="0", train__precision="fp32",
                    train__deterministic="true", optim__schedule="cosine", optim__warmup_epochs="0.5",
                    optim__muon_batching=batching, optim__muon_normalize=normalize)
    eager = Trainer(tiny_config(cifar_dir, tmp_path / "e", train__cuda_graph="false", **settings), device="cuda",
                    console=quiet())
    graphed = Trainer(tiny_config(cifar_dir, tmp_path / "g", train__cuda_graph="true", **settings), device="cuda",
                      console=quiet())
    eager.data.train.set_epoch(0)
    batches = [(x.clone(), y.clone()) for (x, y), _ in zip(eager.data.train, range(8))]
    graphed.capture_graph(*batches[0])
    for images, labels in batches:
        le, _ = eager._train_step(images, labels)
        lg, _ = graphed._train_step(images, labels)
        torch.testing.assert_close(lg, le, atol=1e-5, rtol=1e-5)
    for (name, a), b in zip(eager.model.state_dict().items(), graphed.model.state_dict().values()):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.gpu
def test_on_a_gpu_padded_batching_takes_the_steps_of_batching_by_shape():
    """On the GPU Newton-Schulz runs in bf16, where the padded batch's products may sum in another order:
    best.yaml's network, channels_last, 3 steps from the same gradients. Each filter bank moves the same way
    to 5% of its movement (bf16 keeps 8 bits: rounding differs by under 1%; a transposed or mis-scaled bank
    would differ by its whole size); the other parameters take the same SGD step."""
    _same_steps_both_ways("cuda")


def _same_steps_both_ways(device: str) -> None:
    model_cfg = load_config("configs/best.yaml", []).model
    torch.manual_seed(0)
    nets = [build_model(model_cfg, device=device).to(memory_format=torch.channels_last) for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    start = [p.detach().clone() for p in nets[0].parameters()]
    opts = [build_optimizer(net.parameters(), OptimConfig(name="muon", lookahead_k=0, muon_batching=batching))
            for net, batching in zip(nets, ("shape", "padded"))]
    g = torch.Generator(device=device).manual_seed(1)
    for _ in range(3):
        for a, b in zip(nets[0].parameters(), nets[1].parameters()):
            a.grad = torch.randn(a.shape, generator=g, device=device) * 1e-2
            if a.ndim == 4:
                a.grad = a.grad.contiguous(memory_format=torch.channels_last)
            b.grad = a.grad.clone()
        for opt in opts:
            opt.step()
    for (name, a), b, p0 in zip(nets[0].named_parameters(), nets[1].parameters(), start):
        if a.ndim == 4:
            moved = (a - p0).norm()
            assert moved > 1e-3 and (b - a).norm() <= 0.05 * moved, name
        else:
            torch.testing.assert_close(b, a, msg=name)
