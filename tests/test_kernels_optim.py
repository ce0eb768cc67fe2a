"""FusedLookaheadSGD (fasttrain.kernels.lookahead_sgd) against torch.optim.SGD + clip + Lookahead.

On CPU the kernel runs under TRITON_INTERPRET=1 (tests/conftest.py); `gpu`-marked tests run the
compiled kernel on CUDA, including inside a CUDA graph.
"""
import io
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from fasttrain.kernels import lookahead_sgd
from fasttrain.kernels.lookahead_sgd import BLOCK, FusedLookaheadSGD

# A conv weight, a bias, a tensor spanning a full (unmasked) chunk plus a tail, a matrix.
SHAPES = [(8, 3, 3, 3), (64,), (BLOCK + 52,), (10, 5)]
HYPER = dict(lr=0.1, momentum=0.9, weight_decay=5e-4)
FP32_TOL = dict(rtol=1e-5, atol=1e-6)


class ReferenceLookahead:
    """The plain Lookahead of the spec: after every k-th inner step, slow = lerp(slow, fast, alpha),
    fast = slow. Slow weights start as the parameters."""

    def __init__(self, params, k, alpha):
        self.params, self.k, self.alpha, self.t = params, k, alpha, 0
        self.slow = [p.detach().clone() for p in params]

    @torch.no_grad()
    def after_inner_step(self):
        self.t += 1
        if self.k and self.t % self.k == 0:
            for slow, p in zip(self.slow, self.params):
                slow.lerp_(p, self.alpha)
                p.copy_(slow)


class RoundOnceReference:
    """The kernel's dtype contract written plainly, for bf16/fp16 parameters: state in the parameter's
    dtype, each step's arithmetic in fp32, every result rounded once when stored. (torch.optim.SGD on
    bf16 rounds after each mul_/add_ and drifts a few ulps from it in 9 steps: no tight reference.)"""

    def __init__(self, params, lr, momentum, weight_decay, clip=None, k=0, alpha=0.5):
        self.params, self.lr, self.momentum, self.wd = params, lr, momentum, weight_decay
        self.clip, self.k, self.alpha, self.t = clip, k, alpha, 0
        self.buf = [torch.zeros_like(p) for p in params]
        self.slow = [p.detach().clone() for p in params]

    @torch.no_grad()
    def step(self):
        self.t += 1
        sync = self.k and self.t % self.k == 0
        for i, p in enumerate(self.params):
            p32 = p.float()
            if p.grad is not None:
                g = p.grad.float()
                g = g if self.clip is None else g.clamp(-self.clip, self.clip)
                buf = self.momentum * self.buf[i].float() + (g + self.wd * p32)
                self.buf[i] = buf.to(p.dtype)
                p32 = p32 - self.lr * buf
            if sync:
                p32 = torch.lerp(self.slow[i].float(), p32, self.alpha)
                self.slow[i] = p32.to(p.dtype)
            p.copy_(p32)


def assert_rounded_alike(actual, expected):
    """Low-precision results of the same fp32 math: nearly every element equal bit for bit. The rest
    sat on a rounding boundary that fp32 contraction (an FMA on the GPU) tipped the other way, an ulp
    the later steps carry on: within 2 ulps of the tensor's largest magnitude."""
    differ = int((actual != expected).sum())
    assert differ <= max(1, expected.numel() // 100), f"{differ} of {expected.numel()} elements differ"
    atol = 2 * torch.finfo(expected.dtype).eps * expected.abs().max().item()
    torch.testing.assert_close(actual.float(), expected.float(), rtol=0, atol=atol)


def check_mixed_dtypes(build, device, clip, drop_grad_from=None):
    """Fused steps on fp32 and bf16/fp16 parameters at once (two buckets, one launch each) against
    torch.optim.SGD + Lookahead for the fp32 ones and RoundOnceReference for the others; from step
    `drop_grad_from` on the last parameter has no gradient (SGD skips it, Lookahead still syncs it)."""
    fused_params, ref_params, lowp_params = ([p.to(device).requires_grad_() for p in build()] for _ in range(3))
    fused = FusedLookaheadSGD(fused_params, **HYPER, clip_value=clip, lookahead_k=2)
    sgd, lookahead = torch.optim.SGD(ref_params, **HYPER), ReferenceLookahead(ref_params, 2, 0.5)
    round_once = RoundOnceReference(lowp_params, **HYPER, clip=clip, k=2)
    assert len(fused._buckets) == 2
    for t in range(1, 10):
        for params in (fused_params, ref_params, lowp_params):
            set_grads(params, t)
            if drop_grad_from is not None and t >= drop_grad_from:
                params[-1].grad = None
        fused.step()
        reference_step(sgd, lookahead, ref_params, clip)
        round_once.step()
    for p, q, r in zip(fused_params, ref_params, lowp_params):
        assert p.dtype == q.dtype and p.stride() == q.stride()
        if p.dtype == torch.float32:
            torch.testing.assert_close(p, q, **FP32_TOL)
            torch.testing.assert_close(r, q, **FP32_TOL)  # the plain reference is torch's SGD in fp32
        else:
            assert_rounded_alike(p, r)
    return fused


def reference_step(sgd, lookahead, params, clip):
    if clip is not None:
        torch.nn.utils.clip_grad_value_(params, clip)
    sgd.step()
    lookahead.after_inner_step()


def step_both(t, fused, fused_params, sgd, lookahead, ref_params, clip=None):
    """Step `t` of the fused optimizer and of the reference (torch SGD + ReferenceLookahead), same gradients."""
    set_grads(fused_params, t)
    set_grads(ref_params, t)
    fused.step()
    reference_step(sgd, lookahead, ref_params, clip)


def make_params(shapes, device="cpu", dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen).to(device, dtype).requires_grad_() for s in shapes]


def set_grads(params, step, scale=1.0):
    """Deterministic random gradients for `step` (the same for every optimizer under test)."""
    gen = torch.Generator().manual_seed(1000 + step)
    for p in params:
        p.grad = (scale * torch.randn(p.shape, generator=gen)).to(p.device, p.dtype)


def run_pair(steps, nesterov, clip, k, device="cpu", lr_at=lambda t: HYPER["lr"], alpha=0.5):
    """(fused params, reference params, fused optimizer) after `steps` identical steps."""
    fused_params, ref_params = make_params(SHAPES, device), make_params(SHAPES, device)
    fused = FusedLookaheadSGD(fused_params, **HYPER, nesterov=nesterov, clip_value=clip, lookahead_k=k,
                              lookahead_alpha=alpha)
    sgd = torch.optim.SGD(ref_params, **HYPER, nesterov=nesterov)
    lookahead = ReferenceLookahead(ref_params, k, alpha)
    for t in range(1, steps + 1):
        for opt in (fused, sgd):
            opt.param_groups[0]["lr"] = lr_at(t)
        step_both(t, fused, fused_params, sgd, lookahead, ref_params, clip)
    return fused_params, ref_params, fused


# ----------------------------------------------------------------------------------------------------
# CPU: the kernel under the Triton interpreter
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [0, 5], ids=["no-lookahead", "lookahead5"])
@pytest.mark.parametrize("clip", [None, 0.5], ids=["noclip", "clip"])
@pytest.mark.parametrize("nesterov", [False, True], ids=["momentum", "nesterov"])
def test_matches_torch_sgd_clip_lookahead(interpreted, nesterov, clip, k):
    fused_params, ref_params, fused = run_pair(50, nesterov, clip, k)
    for p, q in zip(fused_params, ref_params):
        torch.testing.assert_close(p, q, **FP32_TOL)
    assert int(fused.state[fused_params[0]]["step"]) == 50


@pytest.mark.parametrize("alpha", [0.3, 0.8, 1.0])
def test_lookahead_alpha_other_than_a_half(interpreted, alpha):
    """slow += alpha * (fast - slow): at alpha 0.5 the two weights of the interpolation are equal, so
    only another alpha tells the slow weight's share from the fast one's. alpha 1 (the sync keeps the
    fast weights) is allowed by optim.lookahead_alpha's range, so the optimizer must accept it too."""
    fused_params, ref_params, _ = run_pair(50, True, 0.5, 5, alpha=alpha)
    for p, q in zip(fused_params, ref_params):
        torch.testing.assert_close(p, q, **FP32_TOL)


def test_lr_changes_take_effect(interpreted):
    """A schedule writing floats into param_group["lr"] every step, including 0 (frozen params)."""
    schedule = lambda t: 0.0 if 8 <= t < 11 else 0.2 / t  # noqa: E731
    fused_params, ref_params, _ = run_pair(14, False, None, 4, lr_at=schedule)
    for p, q in zip(fused_params, ref_params):
        torch.testing.assert_close(p, q, **FP32_TOL)
    frozen_a, frozen_b = make_params(SHAPES[:1]), make_params(SHAPES[:1])
    opt = FusedLookaheadSGD(frozen_a, lr=0.0, lookahead_k=0)
    set_grads(frozen_a, 1)
    opt.step()
    assert torch.equal(frozen_a[0], frozen_b[0])


def test_tensor_lr(interpreted):
    """lr as a 0-d tensor (what a CUDA graph needs): updates in place are picked up."""
    lr = torch.tensor(0.1)
    params, ref = make_params(SHAPES), make_params(SHAPES)
    fused = FusedLookaheadSGD(params, lr=lr, momentum=0.9, lookahead_k=3)
    sgd = torch.optim.SGD(ref, lr=0.1, momentum=0.9)
    lookahead = ReferenceLookahead(ref, 3, 0.5)
    for t in range(1, 8):
        lr.fill_(0.1 / t)
        sgd.param_groups[0]["lr"] = 0.1 / t
        step_both(t, fused, params, sgd, lookahead, ref)
    for p, q in zip(params, ref):
        torch.testing.assert_close(p, q, **FP32_TOL)


def _snapshot(params, opt):
    return [p.detach().clone() for p in params] + [
        v.clone() for p in params for v in opt.state[p].values() if isinstance(v, torch.Tensor)]


def test_state_dict_round_trip_mid_run(interpreted):
    """Save at step 23, load (weights_only) into a fresh optimizer on fresh params, continue to
    step 40 (Lookahead syncs at 25, 30, ... after the resume): identical to the uninterrupted run."""
    shapes, kw = SHAPES[:2], dict(**HYPER, nesterov=True, clip_value=0.5, lookahead_k=5)
    params = make_params(shapes)
    opt = FusedLookaheadSGD(params, **kw)
    for t in range(1, 41):
        if t == 24:
            buffer = io.BytesIO()
            torch.save({"params": [p.detach() for p in params], "optim": opt.state_dict()}, buffer)
        set_grads(params, t)
        opt.step()

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = make_params(shapes, seed=7)
    with torch.no_grad():
        for p, value in zip(resumed, saved["params"]):
            p.copy_(value)
    opt2 = FusedLookaheadSGD(resumed, lr=1.0, lookahead_k=5)  # hyperparameters come from the state
    opt2.load_state_dict(saved["optim"])
    assert int(opt2.state[resumed[0]]["step"]) == 23
    for t in range(24, 41):
        set_grads(resumed, t)
        opt2.step()
    for a, b in zip(_snapshot(params, opt), _snapshot(resumed, opt2)):
        assert torch.equal(a, b)


def test_state_layout(interpreted):
    """torch's per-parameter layout: buffers shaped (and strided) like their parameter."""
    conv = torch.randn(8, 4, 3, 3).to(memory_format=torch.channels_last).requires_grad_()
    bias = torch.randn(8, requires_grad=True)
    opt = FusedLookaheadSGD([conv, bias], lookahead_k=2)
    for t in range(1, 4):
        set_grads([conv, bias], t)
        opt.step()
    state = opt.state_dict()["state"]
    assert set(state[0]) == {"momentum_buffer", "slow_param", "step"}
    assert state[0]["momentum_buffer"].stride() == conv.stride()
    assert state[0]["slow_param"].shape == conv.shape and int(state[1]["step"]) == 3
    opt2 = FusedLookaheadSGD([torch.zeros(3, requires_grad=True)], lookahead_k=0)
    assert "slow_param" not in opt2.state_dict()["state"][0]


def test_mixed_dtypes_layouts_and_missing_grads(interpreted):
    """fp32 and fp16 parameters, a channels_last conv weight, a parameter whose gradient disappears.
    fp16, not bf16, on the CPU: the Triton interpreter (3.8) truncates fp32 -> bf16 stores, even with
    fp_downcast_rounding="rtne", where the GPU rounds to nearest; the GPU test below runs bf16."""
    def build():
        gen = torch.Generator().manual_seed(3)
        return [torch.randn(16, 8, 3, 3, generator=gen).to(memory_format=torch.channels_last),
                torch.randn(40, generator=gen).to(torch.float16),
                torch.randn(3, 7, generator=gen).to(torch.float16),
                torch.randn(30, generator=gen)]

    check_mixed_dtypes(build, "cpu", clip=1.0, drop_grad_from=4)


def test_round_once_reference_is_tight():
    """The bf16 reference's tolerance can tell a kernel that rounds twice per step from one that
    rounds once: torch.optim.SGD on bf16 (rounding after each mul_/add_) fails assert_rounded_alike."""
    gen = torch.Generator().manual_seed(5)
    start = torch.randn(4099, generator=gen).to(torch.bfloat16)
    once, twice = start.clone().requires_grad_(), start.clone().requires_grad_()
    round_once, sgd = RoundOnceReference([once], **HYPER), torch.optim.SGD([twice], **HYPER)
    for t in range(1, 10):
        set_grads([once], t)
        set_grads([twice], t)
        round_once.step()
        sgd.step()
    with pytest.raises(AssertionError, match="elements differ"):
        assert_rounded_alike(twice.detach(), once.detach())


def test_cpu_fallback_is_the_same_optimizer(interpreted, monkeypatch):
    """Without the interpreter CPU tensors take the PyTorch path: same math, same state."""
    kernel_params, torch_params = make_params(SHAPES), make_params(SHAPES)
    kw = dict(**HYPER, nesterov=True, clip_value=0.5, lookahead_k=3, lookahead_alpha=0.8)  # alpha != 1 - alpha
    kernel_opt, torch_opt = FusedLookaheadSGD(kernel_params, **kw), FusedLookaheadSGD(torch_params, **kw)
    for t in range(1, 8):
        set_grads(kernel_params, t)
        set_grads(torch_params, t)
        kernel_opt.step()
        with monkeypatch.context() as m:
            m.setattr(lookahead_sgd, "use_triton", lambda tensor: False)
            torch_opt.step()
    for a, b in zip(_snapshot(kernel_params, kernel_opt), _snapshot(torch_params, torch_opt)):
        torch.testing.assert_close(a, b, **FP32_TOL)


def test_size_one_strides_do_not_force_a_gradient_copy():
    """A [C, Cr, 1, 1] channels_last parameter whose gradient has other strides only on its size-1
    dimensions (what autograd hands back through the Triton SE's reshape) is used in place: a copy
    each step would cost a pass and, under a CUDA graph, rewrite the address table mid-capture."""
    from fasttrain.kernels._utils import same_layout

    p = torch.zeros(16, 4, 1, 1).to(memory_format=torch.channels_last)
    assert p.stride() == (4, 1, 4, 4)
    g = torch.randn(16, 4).view(16, 4, 1, 1)  # strides (4, 1, 1, 1)
    assert same_layout(g, p) and FusedLookaheadSGD._grad_like_param(_with_grad(p, g)) is g
    other = torch.randn(4, 16).t().reshape(16, 4, 1, 1)  # a real difference: channels-major
    assert not same_layout(other, p)
    copied = FusedLookaheadSGD._grad_like_param(_with_grad(p, other))
    assert copied is not other and copied.stride() == p.stride() and torch.equal(copied, other)
    gappy = torch.zeros(16, 8, 1, 1)[:, ::2]  # the right shape with gaps in memory: never in place
    assert gappy.shape == p.shape and not same_layout(gappy, p)


def _with_grad(p, g):
    p = p.clone().requires_grad_()
    p.grad = g
    return p


def test_invalid_arguments():
    p = [torch.zeros(2, requires_grad=True)]
    for bad, says in ((dict(lr=-1.0), "invalid lr -1.0"), (dict(momentum=0.0, nesterov=True), "Nesterov"),
                      (dict(clip_value=0.0), "invalid clip_value 0.0"), (dict(lookahead_k=-1), "invalid lookahead_k -1"),
                      (dict(lookahead_alpha=0.0), "invalid lookahead_alpha 0.0"),
                      (dict(momentum=-0.5), "invalid momentum -0.5"),
                      (dict(weight_decay=-1e-4), "invalid weight_decay -0.0001")):
        with pytest.raises(ValueError, match=says):  # each refused for its own reason
            FusedLookaheadSGD(p, **bad)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on CUDA machines the gpu tests compile the kernel")
def test_kernel_compiles_for_h100_with_vector_loads():
    """Compile the real launch for sm_90 (in a process without the interpreter): 16-byte vector
    loads for fp32 and bf16 buckets, and the scalar fallback when an address is misaligned."""
    script = textwrap.dedent("""
        import torch
        from fasttrain.kernels._utils import compile_for_gpu, record_launches
        from fasttrain.kernels.lookahead_sgd import FusedLookaheadSGD
        storage = torch.randn(5000)
        cases = [[torch.randn(3000), torch.randn(64, 3, 3, 3)],
                 [torch.randn(3000, dtype=torch.bfloat16)],
                 [storage[1:4001]]]  # 4-byte aligned only
        for params in cases:
            params = [p.requires_grad_() for p in params]
            for p in params:
                p.grad = torch.randn_like(p)
            opt = FusedLookaheadSGD(params)
            with record_launches() as launches:
                opt._launch(opt._buckets[0])
            ptx = compile_for_gpu(*launches[0]).asm["ptx"]
            print(opt._buckets[0].vec, "ld.global.v4" in ptx)
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["4", "True", "8", "True", "1", "False"], out.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="on CUDA machines the gpu tests run the kernel")
@pytest.mark.parametrize("decay_all", ["true", "false"], ids=["one-group", "no-decay-group"])
def test_one_kernel_launch_per_step_for_the_papers_network(decay_all):
    """Issue 4's "one launch per optimizer step over all parameters": the paper's network (81 tensors,
    4,697,742 parameters), with weight decay on all of them or with a second, no-decay group for norms
    and biases, steps with one Triton launch, recorded rather than run (in a process without the
    interpreter, the launcher as it would run on a GPU)."""
    script = textwrap.dedent(f"""
        import torch
        from fasttrain.config import load_config
        from fasttrain.kernels import lookahead_sgd
        from fasttrain.kernels._utils import record_launches
        from fasttrain.model import build_model
        from fasttrain.optim import build_optimizer
        cfg = load_config("configs/seed.yaml", ["--optim.impl", "fused", "--optim.decay_norm_and_bias", "{decay_all}"])
        model = build_model(cfg.model)
        opt = build_optimizer(model.parameters(), cfg.optim)
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        lookahead_sgd.use_triton = lambda tensor: True
        with record_launches() as launches:
            for _ in range(3):
                opt.step()
        print(type(opt).__name__, len(opt.param_groups), sum(p.numel() for p in model.parameters()), len(launches))
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr[-3000:]
    name, groups, params, launches = out.stdout.split()
    assert name == "FusedLookaheadSGD" and int(params) == 4_697_742
    assert int(groups) == (1 if decay_all == "true" else 2)
    assert int(launches) == 3, f"{launches} launches for 3 steps over {groups} parameter group(s)"


def _steps_with_a_change_at(t_change, change, steps=8, k=3):
    """(fused params, reference params) after `steps` steps, `change` (a dict of hyperparameters)
    written into param_groups[0] of both before step `t_change`."""
    fused_params, ref_params = make_params(SHAPES[:2]), make_params(SHAPES[:2])
    fused = FusedLookaheadSGD(fused_params, **HYPER, lookahead_k=k)
    sgd, lookahead = torch.optim.SGD(ref_params, **HYPER), ReferenceLookahead(ref_params, k, 0.5)
    clip = None
    for t in range(1, steps + 1):
        if t == t_change:
            fused.param_groups[0].update(change)
            sgd.param_groups[0].update({key: v for key, v in change.items() if key in sgd.param_groups[0]})
            clip = change.get("clip_value", clip)
            lookahead.k = change.get("lookahead_k", lookahead.k)
            lookahead.alpha = change.get("lookahead_alpha", lookahead.alpha)
        step_both(t, fused, fused_params, sgd, lookahead, ref_params, clip)
    return fused_params, ref_params


@pytest.mark.parametrize("change", [
    dict(momentum=0.5, weight_decay=1e-2),
    dict(nesterov=True, clip_value=0.3),
    dict(lookahead_k=2, lookahead_alpha=0.8),
], ids=["momentum-wd", "nesterov-clip", "lookahead"])
def test_hyperparameter_changes_mid_run_take_effect(interpreted, change):
    """Not only lr: momentum, weight decay, Nesterov, clipping and Lookahead's k and alpha written into
    param_groups mid-run reach the kernel's table (a table written once would ignore them)."""
    fused_params, ref_params = _steps_with_a_change_at(4, change)
    for p, q in zip(fused_params, ref_params):
        torch.testing.assert_close(p, q, **FP32_TOL)


@pytest.mark.parametrize("path", ["kernel", "pytorch"])
def test_lookahead_turned_on_mid_run_starts_from_the_weights_of_then(request, monkeypatch, path):
    """lookahead_k from 0 to 2 before step 4: the slow weights start as the parameters are then (as
    Lookahead wrapped around the run from that step), not as they were at construction (the kernel pulled
    the weights back toward their initial values; the PyTorch path raised KeyError 'slow_param'), and
    state_dict carries them from then on; back to 0, they are dropped."""
    if path == "kernel":
        request.getfixturevalue("interpreted")
    else:
        monkeypatch.setattr(lookahead_sgd, "use_triton", lambda tensor: False)
    fused_params, ref_params = make_params(SHAPES[:2]), make_params(SHAPES[:2])
    fused = FusedLookaheadSGD(fused_params, **HYPER, lookahead_k=0)
    sgd = torch.optim.SGD(ref_params, **HYPER)
    lookahead = ReferenceLookahead(ref_params, 0, 0.5)
    for t in range(1, 9):
        if t == 4:
            fused.param_groups[0]["lookahead_k"] = 2
            lookahead.k, lookahead.slow = 2, [p.detach().clone() for p in ref_params]
        step_both(t, fused, fused_params, sgd, lookahead, ref_params)
    for p, q in zip(fused_params, ref_params):
        torch.testing.assert_close(p, q, **FP32_TOL)
    saved = fused.state_dict()["state"]
    assert all("slow_param" in saved[i] for i in range(len(fused_params)))
    torch.testing.assert_close(saved[0]["slow_param"], lookahead.slow[0], **FP32_TOL)
    fused.param_groups[0]["lookahead_k"] = 0
    fused.step()
    assert not any("slow_param" in state for state in fused.state_dict()["state"].values())


def test_gradient_updated_in_place_in_another_layout(interpreted):
    """A channels_last parameter whose .grad is one contiguous tensor, refilled in place every step
    (same address each step): the kernel reads a re-laid-out copy, which must be made afresh each
    step, not kept from the step that first saw the address."""
    conv = torch.randn(8, 4, 3, 3).to(memory_format=torch.channels_last).requires_grad_()
    ref = conv.detach().clone().requires_grad_()
    fused = FusedLookaheadSGD([conv], **HYPER, lookahead_k=0)
    sgd = torch.optim.SGD([ref], **HYPER)
    conv.grad = torch.zeros(conv.shape)  # contiguous: not conv's layout
    for t in range(1, 5):
        g = torch.randn(conv.shape, generator=torch.Generator().manual_seed(t))
        conv.grad.copy_(g)
        ref.grad = g.clone()
        fused.step()
        sgd.step()
        assert conv.grad.is_contiguous()
    torch.testing.assert_close(conv, ref, **FP32_TOL)


def test_clipping_keeps_nan_gradients(interpreted):
    """Clip-by-value keeps a NaN gradient NaN (like clamp and clip_grad_value_), so divergence shows
    in the parameters instead of being clipped to -clip_value and hidden."""
    p = torch.zeros(4, requires_grad=True)
    q = torch.zeros(4, requires_grad=True)
    fused = FusedLookaheadSGD([p], lr=0.1, momentum=0.9, clip_value=1.0, lookahead_k=0)
    sgd = torch.optim.SGD([q], lr=0.1, momentum=0.9)
    p.grad = torch.tensor([float("nan"), 5.0, -5.0, 0.5])
    q.grad = p.grad.clone()
    fused.step()
    torch.nn.utils.clip_grad_value_([q], 1.0)
    sgd.step()
    assert torch.isnan(p[0]) and torch.isnan(q[0])
    torch.testing.assert_close(p, q, equal_nan=True, **FP32_TOL)
    assert torch.equal(p[1:], torch.tensor([-0.1, 0.1, -0.05]))


def test_cpu_fallback_counts_each_step_once_over_several_buckets(monkeypatch):
    """The PyTorch path with an fp32 and an fp16 bucket: only the device's last bucket advances the
    shared step counter, so Lookahead (k=2) syncs on the same steps as the reference."""
    monkeypatch.setattr(lookahead_sgd, "use_triton", lambda tensor: False)

    def build():
        gen = torch.Generator().manual_seed(8)
        return [torch.randn(5, 3, generator=gen), torch.randn(12, generator=gen).to(torch.float16)]

    fused = check_mixed_dtypes(build, "cpu", clip=1.0)
    assert all(int(state["step"]) == 9 for state in fused.state.values())


def test_grad_of_another_dtype_is_refused():
    """An fp16 gradient on an fp32 parameter (autograd allows it once grad_dtype is None): the kernel
    would read its bytes as fp32."""
    p = torch.zeros(8, requires_grad=True)
    opt = FusedLookaheadSGD([p], lookahead_k=0)
    p.grad_dtype = None
    p.grad = torch.zeros(8, dtype=torch.float16)
    with pytest.raises(RuntimeError, match="dense gradients with the parameter's dtype"):
        FusedLookaheadSGD._grad_like_param(p)
    with pytest.raises(RuntimeError, match="dense gradients with the parameter's dtype"):
        opt.step()


def test_clips_by_value_needs_every_group():
    """fasttrain.optim skips its own clamp only when the kernel clamps every group's gradients."""
    a, b = torch.zeros(2, requires_grad=True), torch.zeros(2, requires_grad=True)
    mixed = FusedLookaheadSGD([{"params": [a], "clip_value": 1.0}, {"params": [b]}], clip_value=None)
    assert not mixed.clips_by_value
    assert FusedLookaheadSGD([{"params": [a]}, {"params": [b]}], clip_value=1.0).clips_by_value
    assert not FusedLookaheadSGD([a, b], clip_value=None).clips_by_value


def test_bucket_of_empty_parameters_still_counts_steps(interpreted):
    """A bucket whose parameters are all empty launches nothing, yet the step counter (and so the
    Lookahead schedule) must advance."""
    empty = torch.zeros(0, requires_grad=True)
    opt = FusedLookaheadSGD([empty], lookahead_k=2)
    for _ in range(2):
        empty.grad = torch.zeros(0)
        opt.step()
    assert int(opt.state[empty]["step"]) == 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_state_offsets_are_16_byte_aligned(dtype):
    """Every parameter's slice of the flat state starts on a 16-byte boundary (the GPU kernel's vector
    loads assume it), whatever the sizes of the parameters before it."""
    params = [torch.zeros(s, dtype=dtype, requires_grad=True) for s in [(27,), (5,), (10, 5)]]
    opt = FusedLookaheadSGD(params)
    (bucket,) = opt._buckets
    size = bucket.momentum.element_size()
    offsets = bucket.tensor_table[:, 1].tolist()
    assert len(set(offsets)) == 3 and all(off * size % 16 == 0 for off in offsets), offsets
    for p in params:
        for key in ("momentum_buffer", "slow_param"):
            assert opt.state[p][key].data_ptr() % 16 == 0, key


# ----------------------------------------------------------------------------------------------------
# GPU: the compiled kernel (deselected on CPU with -m "not gpu")
# ----------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("k", [0, 5], ids=["no-lookahead", "lookahead5"])
@pytest.mark.parametrize("clip", [None, 0.5], ids=["noclip", "clip"])
@pytest.mark.parametrize("nesterov", [False, True], ids=["momentum", "nesterov"])
def test_matches_torch_on_cuda(nesterov, clip, k):
    fused_params, ref_params, _ = run_pair(50, nesterov, clip, k, device="cuda")
    for p, q in zip(fused_params, ref_params):
        torch.testing.assert_close(p, q, **FP32_TOL)


@pytest.mark.gpu
def test_cuda_graph_capture_with_tensor_lr():
    """step() captured once in a CUDA graph and replayed: lr tensor updates and the in-kernel step
    counter (Lookahead every 3rd replay) behave exactly like eager steps."""
    lr = torch.tensor(0.1, device="cuda")
    graphed, eager = make_params(SHAPES, "cuda"), make_params(SHAPES, "cuda")
    kw = dict(momentum=0.9, weight_decay=5e-4, nesterov=True, clip_value=0.5, lookahead_k=3)
    graph_opt, eager_opt = FusedLookaheadSGD(graphed, lr=lr, **kw), FusedLookaheadSGD(eager, lr=0.1, **kw)
    set_grads(graphed, 1)
    set_grads(eager, 1)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up step: compiles the kernel, fills the address table
        graph_opt.step()
    torch.cuda.current_stream().wait_stream(side)
    eager_opt.step()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graph_opt.step()
    for t in range(2, 12):
        gen = torch.Generator().manual_seed(t)
        for p, q in zip(graphed, eager):
            g = torch.randn(p.shape, generator=gen).cuda()
            p.grad.copy_(g)  # the graph reads these very buffers
            q.grad = g.clone()
        lr.fill_(0.1 / t)
        eager_opt.param_groups[0]["lr"] = 0.1 / t
        graph.replay()
        eager_opt.step()
    torch.cuda.synchronize()
    for p, q in zip(graphed, eager):
        assert torch.equal(p, q)
    assert int(graph_opt.state[graphed[0]]["step"]) == 11


@pytest.mark.gpu
def test_mixed_dtypes_on_cuda():
    def build():
        gen = torch.Generator().manual_seed(4)
        return [torch.randn(64, 32, 3, 3, generator=gen).to(memory_format=torch.channels_last),
                torch.randn(4099, generator=gen).to(torch.bfloat16), torch.randn(7, generator=gen)]

    check_mixed_dtypes(build, "cuda", clip=None)


def test_a_state_dict_with_bad_hyperparameters_is_refused_on_load():
    """A saved group's settings are checked like the constructor's (a hand-edited or foreign state)."""
    p = torch.zeros(4, requires_grad=True)
    saved = FusedLookaheadSGD([p], lr=0.1, lookahead_k=2).state_dict()
    saved["param_groups"][0]["lookahead_alpha"] = 0.0
    target = FusedLookaheadSGD([p], lr=0.1, lookahead_k=2)
    before = target.state_dict()
    with pytest.raises(ValueError, match="alpha"):
        target.load_state_dict(saved)
    # refused before anything was replaced: the settings and the state the kernel updates are as they were
    after = target.state_dict()
    assert after["param_groups"] == before["param_groups"] and after["param_groups"][0]["lookahead_alpha"] == 0.5
    assert target.state[p]["momentum_buffer"].data_ptr() == target._buckets[0].momentum.data_ptr()
    # a torch.optim.SGD state (no clip_value, no Lookahead) is named as such, not a bare KeyError
    sgd_state = torch.optim.SGD([p], lr=0.1, momentum=0.9).state_dict()
    with pytest.raises(ValueError, match=r"has no clip_value, lookahead_k, lookahead_alpha: it was not saved by "
                                         r"FusedLookaheadSGD"):
        target.load_state_dict(sgd_state)
    assert target.state_dict()["param_groups"] == before["param_groups"]


def test_a_refused_param_group_leaves_the_optimizer_as_it_was():
    """add_param_group with a bad setting, or with parameters the kernel cannot take: refused, and the
    groups (and the next step) are those of before (a refused group stayed, and step() then failed)."""
    p, q = torch.zeros(4, requires_grad=True), torch.zeros(4, requires_grad=True)
    opt = FusedLookaheadSGD([p], lr=0.1, lookahead_k=2)
    with pytest.raises(ValueError, match="invalid lookahead_alpha 0.0"):
        opt.add_param_group({"params": [q], "lookahead_alpha": 0.0})
    strided = torch.zeros(4, 2)[:, 0].requires_grad_()  # a view with gaps: not dense
    with pytest.raises(ValueError, match="needs dense parameters"):
        opt.add_param_group({"params": [strided]})
    assert len(opt.param_groups) == 1 and opt.param_groups[0]["params"] == [p]
    p.grad = torch.ones(4)
    opt.step()
    torch.testing.assert_close(p.detach(), torch.full((4,), -0.1))
