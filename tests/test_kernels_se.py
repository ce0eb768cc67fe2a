"""The fused squeeze-excitation op (fasttrain.kernels.se) against its PyTorch reference.

On CPU the Triton kernels run under TRITON_INTERPRET=1 (tests/conftest.py sets it when there is no
CUDA device), so these tests execute the real kernel code; `gpu`-marked tests compile and run them on
CUDA. References are computed in fp32 from the very same (possibly low-precision) inputs.
"""
import contextlib
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from conftest import numerics_flags_restored
from fasttrain.kernels.se import se_gate, se_gate_reference

SHAPES = [(1, 16, 1, 1), (3, 24, 7, 5), (2, 64, 32, 32), (4, 256, 8, 8)]
# C -> C/r: r = 16 as in the model (Cr = 1, 4, 16) and a non-power-of-two hidden width (24 -> 6).
REDUCTION = {16: 16, 24: 4, 64: 16, 256: 16}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Outputs are rounded once from fp32: half an ulp, so eps covers them; fp32 leaves room for
# the different summation order of the kernels.
TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}
WEIGHT_GRAD_TOL = 1e-4  # fp32 sums of the same inputs on both sides


def _assert_close(actual, expected, tol):
    """Elementwise rtol plus an atol scaled to the tensor's magnitude (sums may cancel)."""
    expected = expected.float()
    atol = tol * max(1.0, expected.abs().max().item())
    torch.testing.assert_close(actual.float(), expected, rtol=tol, atol=atol)


def _se_inputs(shape, dtype, device, channels_last=False, residual=True, reduction=4, conv_weights=True):
    """x (+ residual) in `dtype`, fp32 SE weights shaped like SqueezeExcite's 1x1 convs."""
    n, c, h, w = shape
    cr = max(1, c // reduction)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(shape, device=device).to(dtype=dtype, memory_format=fmt)
    r = torch.randn(shape, device=device).to(dtype=dtype, memory_format=fmt) if residual else None
    tail = (1, 1) if conv_weights else ()
    w1 = torch.randn(cr, c, *tail, device=device) * (2.0 / c) ** 0.5
    w2 = torch.randn(c, cr, *tail, device=device) * (2.0 / cr) ** 0.5
    b1, b2 = torch.randn(cr, device=device) * 0.1, torch.randn(c, device=device) * 0.1
    if residual:
        r = _off_the_relu_kink(x, w1, b1, w2, b2, r)
    return [x, w1, b1, w2, b2, r]


def _off_the_relu_kink(x, w1, b1, w2, b2, r):
    """r moved so that no pre-activation x * s + r lies within 16 eps of 0, where relu' jumps. There
    the kernel and the reference may legitimately disagree: the kernel's backward masks with its stored
    output (an fp16 y under 2^-25 rounds to 0), the fp32 reference with the unrounded one, and one ulp
    of difference in s flips the mask. The same step as gradcheck keeping clear of kinks; the moved
    elements stay random, and both sides get the same inputs."""
    with ieee_fp32_matmuls():
        gated = se_gate_reference(x.float(), w1, b1, w2, b2)  # x * s in fp32
    pre, margin = gated + r.float(), 16 * torch.finfo(r.dtype).eps
    push = torch.where(pre.abs() < margin, 2 * margin * torch.where(pre >= 0, 1.0, -1.0), 0.0)
    moved = torch.empty_like(r).copy_(r.float() + push)  # keeps r's memory format
    assert ((gated + moved.float()).abs() >= margin / 2).all()  # still clear after rounding to r's dtype
    return moved


def _run(fn, inputs, dy=None):
    """fn(*inputs), its output and the gradients of every tensor input for upstream grad dy."""
    leaves = [t.detach().requires_grad_() if t is not None else None for t in inputs]
    y = fn(*leaves[:5], residual=leaves[5])
    dy = torch.randn_like(y) if dy is None else dy
    y.backward(dy)
    return y, dy, [t.grad if t is not None else None for t in leaves]


@contextlib.contextmanager
def ieee_fp32_matmuls():
    """The reference's two small matmuls in full fp32 even where TF32 is on (as the Trainer sets it on
    CUDA): TF32 rounds their inputs to 10 mantissa bits, ~1e-4 relative, 10x the fp32 tolerance."""
    with numerics_flags_restored():
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        yield


def check_against_reference(inputs, dy=None):
    """se_gate vs the fp32 reference on the same inputs: values, dtypes, memory formats, all grads
    (for upstream gradient dy, random if None)."""
    x = inputs[0]
    y, dy, grads = _run(se_gate, inputs, dy)
    ref_inputs = [t.float() if t is not None else None for t in inputs]
    with ieee_fp32_matmuls():
        y_ref, _, grads_ref = _run(se_gate_reference, ref_inputs, dy.float())

    assert y.dtype == x.dtype and y.stride() == x.stride()
    _assert_close(y, y_ref, TOL[x.dtype])
    names = ["x", "w1", "b1", "w2", "b2", "residual"]
    for name, t, g, g_ref in zip(names, inputs, grads, grads_ref):
        if t is None:
            continue
        assert g.shape == t.shape and g.dtype == t.dtype, name
        tol = TOL[x.dtype] if name in ("x", "residual") else WEIGHT_GRAD_TOL
        _assert_close(g, g_ref, tol)
    assert grads[0].stride() == x.stride()


# ----------------------------------------------------------------------------------------------------
# CPU: the kernels under the Triton interpreter
# ----------------------------------------------------------------------------------------------------
def _cpu_cases():
    """Every shape x dtype x layout with the fused residual; the plain gate on all layouts and
    dtypes of the small shapes and in fp32 for the large ones (the interpreter is slow)."""
    for shape in SHAPES:
        for dtype in DTYPES:
            for channels_last in (False, True):
                for residual in (False, True):
                    if residual or shape[1] < 64 or dtype == torch.float32:
                        yield shape, dtype, channels_last, residual


def _case_id(case):
    shape, dtype, channels_last, residual = case
    return "-".join(["x".join(map(str, shape)), str(dtype)[6:], "nhwc" if channels_last else "nchw",
                     "residual" if residual else "gate"])


@pytest.mark.parametrize("case", list(_cpu_cases()), ids=_case_id)
def test_se_gate_matches_reference(interpreted, case):
    shape, dtype, channels_last, residual = case
    torch.manual_seed(0)
    check_against_reference(_se_inputs(shape, dtype, "cpu", channels_last, residual, REDUCTION[shape[1]]))


@pytest.mark.parametrize("shape, reduction, dtype, channels_last, residual", [
    ((20, 512, 2, 2), 16, torch.float32, False, False),   # 4 channel blocks in the MLP, 10 image blocks in dW
    ((3, 1000, 1, 3), 16, torch.bfloat16, True, True),    # C not a power of two: 16 channel blocks, Cr = 62
], ids=["20x512x2x2-fp32-nchw-gate", "3x1000x1x3-bf16-nhwc-residual"])
def test_se_gate_matches_reference_over_several_mlp_blocks(interpreted, shape, reduction, dtype, channels_last,
                                                           residual):
    """Widths where the excitation MLP loops over several channel blocks and the weight gradients over
    several image blocks (the SHAPES above fit one block of each): each block's sum must add up."""
    from fasttrain.kernels import se
    c = shape[1]
    block_c, _ = se._mlp_blocks(c, c // reduction)
    assert block_c < c  # the loop over channel blocks runs more than once
    torch.manual_seed(4)
    check_against_reference(_se_inputs(shape, dtype, "cpu", channels_last, residual, reduction))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("channels_last, residual", [(False, False), (True, True), (False, True)],
                         ids=["nchw-gate", "nhwc-residual", "nchw-residual"])
def test_cpu_path_without_triton_matches_autograd_of_the_reference(monkeypatch, dtype, channels_last, residual):
    """Where Triton cannot run (a CPU without the interpreter) the op takes its PyTorch path, whose
    backward is written by hand: it must equal autograd through the reference, and pass opcheck."""
    from fasttrain.kernels import se
    monkeypatch.setattr(se, "use_triton", lambda tensor: False)
    torch.manual_seed(6)
    inputs = _se_inputs((3, 24, 7, 5), dtype, "cpu", channels_last, residual, reduction=4, conv_weights=False)
    check_against_reference(inputs)
    leaves = [t.detach().requires_grad_() if t is not None else None for t in inputs]
    torch.library.opcheck(torch.ops.fasttrain.se_gate.default, tuple(leaves))


def test_matrix_weights_in_activation_dtype(interpreted):
    """A pure-bf16 model: [Cr, C] matrices in bf16 give bf16 weight gradients of the right value."""
    torch.manual_seed(1)
    inputs = _se_inputs((3, 24, 7, 5), torch.bfloat16, "cpu", conv_weights=False)
    inputs[1:5] = [w.to(torch.bfloat16) for w in inputs[1:5]]
    y, dy, grads = _run(se_gate, inputs)
    y_ref, _, grads_ref = _run(se_gate_reference, [t.float() for t in inputs], dy.float())
    _assert_close(y, y_ref, TOL[torch.bfloat16])
    for g, g_ref in zip(grads, grads_ref):
        assert g.dtype == torch.bfloat16
        _assert_close(g, g_ref, TOL[torch.bfloat16])


def test_mixed_broadcast_and_unflattenable_layouts(interpreted):
    """Residual in the other memory format, a stride-0 upstream gradient (from .sum()), and an x
    whose H and W do not flatten into one strided axis (copied internally; y keeps x's strides)."""
    torch.manual_seed(2)
    x, w1, b1, w2, b2, _ = _se_inputs((2, 8, 5, 3), torch.float32, "cpu")
    x = x.transpose(2, 3).contiguous().transpose(2, 3)  # dense, but stride_h == 1, stride_w == H
    r = torch.randn(2, 8, 5, 3).to(memory_format=torch.channels_last)
    leaves = [t.clone().requires_grad_() for t in (x, w1, b1, w2, b2, r)]
    y = se_gate(*leaves[:5], residual=leaves[5])
    y.sum().backward()
    ref = [t.clone().requires_grad_() for t in (x, w1, b1, w2, b2, r)]
    y_ref = se_gate_reference(*ref[:5], residual=ref[5])
    y_ref.sum().backward()
    assert y.stride() == x.stride() and leaves[0].grad.stride() == x.stride()
    _assert_close(y, y_ref, TOL[torch.float32])
    for a, b in zip(leaves, ref):
        _assert_close(a.grad, b.grad, WEIGHT_GRAD_TOL)


@pytest.mark.parametrize("residual", [False, True], ids=["gate", "residual"])
def test_width_one_input_sliced_from_a_wider_one(interpreted, residual):
    """W == 1 with a stride_w that is not stride_h's: x[..., :1] of a wider tensor. H is then the
    strided axis, so stride_hw must be stride_h (stride_w would read the next columns)."""
    torch.manual_seed(8)
    _, w1, b1, w2, b2, r = _se_inputs((2, 8, 5, 1), torch.float32, "cpu", residual=residual)
    x = torch.randn(2, 8, 5, 4)[..., :1]
    assert x.stride()[2:] == (4, 1)
    if residual:
        r = torch.randn(2, 8, 5, 4)[..., 1:2].copy_(r)  # sliced the same way, off the kink as before
    inputs = [x, w1, b1, w2, b2, r]
    dy = torch.randn(2, 8, 5, 4)[..., 2:3]  # the upstream gradient sliced too
    y, _, grads = _run(se_gate, inputs, dy)
    with ieee_fp32_matmuls():
        y_ref, _, grads_ref = _run(se_gate_reference, inputs, dy)
    _assert_close(y, y_ref, TOL[torch.float32])
    for name, g, g_ref in zip(["x", "w1", "b1", "w2", "b2", "residual"], grads, grads_ref):
        if g_ref is not None:
            assert g.shape == g_ref.shape, name
            _assert_close(g, g_ref, WEIGHT_GRAD_TOL)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_upstream_gradient_whose_hw_do_not_flatten(interpreted, channels_last):
    """dy with H and W swapped in memory (stride_h == 1): the kernels write dresidual into a contiguous
    scratch tensor, which must be copied into the returned gradient (which keeps dy's layout)."""
    torch.manual_seed(9)
    inputs = _se_inputs((2, 8, 5, 3), torch.float32, "cpu", channels_last, residual=True)
    dy = torch.randn(2, 8, 3, 5).transpose(2, 3)
    assert dy.shape == inputs[0].shape and dy.stride()[2:] == (1, 5)
    check_against_reference(inputs, dy)


def test_weights_in_transposed_layout(interpreted):
    """[Cr, C] / [C, Cr] weights that arrive transposed in memory (legal matrices): the kernels index
    them row-major, so the launchers must make them contiguous, forward and backward."""
    torch.manual_seed(10)
    inputs = _se_inputs((3, 24, 7, 5), torch.float32, "cpu", residual=True, conv_weights=False)
    inputs[1], inputs[3] = (w.t().contiguous().t() for w in (inputs[1], inputs[3]))
    assert not inputs[1].is_contiguous() and not inputs[3].is_contiguous()
    check_against_reference(inputs)


def test_reference_computes_in_fp32_under_autocast():
    """The reference (the op's CPU path and the tests' yardstick) ignores autocast: under bf16 autocast
    its fp32 result is the same as without, not one whose MLP ran in bf16."""
    torch.manual_seed(11)
    x, w1, b1, w2, b2, r = _se_inputs((3, 24, 7, 5), torch.float32, "cpu", residual=True)
    for residual in (None, r):
        plain = se_gate_reference(x, w1, b1, w2, b2, residual)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast = se_gate_reference(x, w1, b1, w2, b2, residual)
        assert autocast.dtype == torch.float32
        torch.testing.assert_close(autocast, plain, rtol=1e-6, atol=1e-6)


def _numerics_switches():
    return (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark,
            torch.backends.cudnn.deterministic, torch.get_float32_matmul_precision())


def test_numerics_switches_do_not_outlive_their_block():
    """What keeps a Trainer's TF32 out of the next test's fp32 reference (conftest's autouse fixture),
    and the reference's own IEEE block, each restore every switch they may change."""
    before = _numerics_switches()
    with numerics_flags_restored():
        torch.set_float32_matmul_precision("high")  # as TF32 does
        torch.backends.cudnn.allow_tf32 = not before[1]
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = not before[2], not before[3]
        assert _numerics_switches() != before
    assert _numerics_switches() == before
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        with ieee_fp32_matmuls():
            assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        assert torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before[0]


def test_bad_shapes_are_refused():
    x, w1, b1, w2, b2, _ = _se_inputs((2, 8, 4, 4), torch.float32, "cpu", residual=False)
    with pytest.raises(RuntimeError, match="do not fit"):
        se_gate(x, w1[:, :4], b1, w2, b2)
    with pytest.raises(RuntimeError, match="residual"):
        se_gate(x, w1, b1, w2, b2, residual=x[:, :4])
    for bad_b1, bad_b2 in ((torch.zeros(3), b2), (b1, torch.zeros(9))):  # the kernels would read past b1/b2
        with pytest.raises(RuntimeError, match="bias"):
            se_gate(x, w1, bad_b1, w2, bad_b2)


@pytest.mark.parametrize("channels_last, residual", [(False, False), (True, True)],
                         ids=["nchw-gate", "nhwc-residual"])
def test_opcheck(interpreted, channels_last, residual):
    """Schema, fake (meta) kernel incl. strides, autograd registration and AOT dispatch of the op."""
    torch.manual_seed(3)
    inputs = _se_inputs((1, 8, 3, 5), torch.float32, "cpu", channels_last, residual, conv_weights=False)
    inputs = [t.requires_grad_() if t is not None else None for t in inputs]
    torch.library.opcheck(torch.ops.fasttrain.se_gate.default, tuple(inputs))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_opcheck_backward_with_transposed_weights(request, device):
    """The backward op's fake kernel promises what both real paths return: contiguous weight gradients,
    also for weights that arrive transposed (a legal [Cr, C] matrix). On CUDA too: torch 2.11's opcheck
    compares the fake kernel's strides with the real ones only for CUDA tensors."""
    if device == "cpu":
        request.getfixturevalue("interpreted")
    torch.manual_seed(5)
    x, w1, b1, w2, b2, _ = _se_inputs((2, 8, 3, 3), torch.float32, device, residual=False, conv_weights=False)
    w1_transposed = w1.t().contiguous().t()
    assert not w1_transposed.is_contiguous()
    dy = torch.randn_like(x)
    torch.library.opcheck(torch.ops.fasttrain.se_gate_backward.default, (dy, x, w1_transposed, b1, w2, b2, None))


@pytest.mark.parametrize("shape", [(2, 8, 0, 3), (0, 8, 4, 4)], ids=["no-pixels", "no-images"])
def test_empty_inputs_give_empty_outputs_and_zero_weight_grads(interpreted, shape):
    """No pixels (or no images) to gate: the output is empty and nothing moves the weights. The mean
    of no pixels is taken as 0 on both paths, not as a division by zero (kernel) or NaN (reference)."""
    for fn in (se_gate, se_gate_reference):
        x, w1, b1, w2, b2, r = _se_inputs(shape, torch.float32, "cpu", residual=True)
        y, _, grads = _run(fn, [x, w1, b1, w2, b2, r])
        assert y.shape == shape, fn.__name__
        for g in grads[1:5]:
            assert torch.equal(g, torch.zeros_like(g)), fn.__name__


@pytest.mark.parametrize("N, C, HW, channels_fast", [
    (1, 2048, 256 * 256, True), (1, 512, 512 * 512, True), (2, 64, 1500 * 1500, True),
    (70_000, 16, 1, False), (512, 64, 32 * 32, True), (3, 24, 35, False)])
def test_gate_grid_stays_within_cuda_limits(N, C, HW, channels_fast):
    """CUDA launches at most 65,535 programs on grid axes 1 and 2 (2^31 - 1 on axis 0). With the GPU's
    tile sizes, an axis of HW blocks alone passes that for large channels_last images."""
    from fasttrain.kernels import se
    for tile in (1024, 2048, 8192):
        block_c, block_hw = se._blocks(C, HW, channels_fast, tile)
        (programs, c_blocks), hw_blocks = se._gate_grid(N, C, HW, block_c, block_hw)
        assert programs == N * hw_blocks and programs <= 2**31 - 1 and c_blocks <= 65_535
        assert c_blocks * block_c >= C and hw_blocks * block_hw >= HW  # every element has a program
        assert (hw_blocks - 1) * block_hw < HW  # and no program is wholly outside


class _SEBlock(nn.Module):
    """conv -> BN -> se_gate(+ residual, ReLU): the way the model uses the op."""

    def __init__(self, c=16, reduction=4):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)
        self.fc1 = nn.Conv2d(c, c // reduction, 1)
        self.fc2 = nn.Conv2d(c // reduction, c, 1)

    def forward(self, x):
        out = self.bn(self.conv(x))
        return se_gate(out, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias, residual=x)


def _check_compiled(device, backend, dtype=torch.float32):
    """torch.compile(fullgraph=True) of a block using the op: one opaque op node in the captured graph,
    and the compiled forward and backward equal eager ones."""
    torch.manual_seed(4)
    model = _SEBlock().to(device)
    x = torch.randn(2, 16, 8, 8, device=device)
    graphs = []

    def recording_backend(gm, example_inputs):
        graphs.append(gm)
        return torch._dynamo.lookup_backend(backend)(gm, example_inputs)

    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend=recording_backend)
    with torch.autocast(device_type=device, dtype=dtype, enabled=dtype != torch.float32):
        y = compiled(x)
        y.float().square().sum().backward()
        grads = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        y_eager = model(x)
        y_eager.float().square().sum().backward()
    assert len(graphs) == 1
    assert any(n.target is torch.ops.fasttrain.se_gate.default for n in graphs[0].graph.nodes)
    assert y.dtype == y_eager.dtype
    tol = TOL[dtype] * 4 if dtype != torch.float32 else 1e-5
    _assert_close(y, y_eager, tol)
    for g, p in zip(grads, model.parameters()):
        _assert_close(g, p.grad, tol)


def test_compile_fullgraph_cpu(interpreted):
    _check_compiled("cpu", "aot_eager")


@pytest.mark.parametrize("placement, gates", [("stem", 1), ("blocks", 3)])
def test_whole_model_compiles_fullgraph_with_every_se_as_the_op(interpreted, placement, gates):
    """The model as the trainer builds it (model.se_impl: triton), not one block: torch.compile(fullgraph=True)
    captures it whole, every SE gate is the opaque op, and forward and backward equal eager."""
    from fasttrain.config import ModelConfig
    from fasttrain.model import build_model

    torch.manual_seed(7)
    cfg = ModelConfig(layers=3, blocks=[1, 1, 1], conv_kernel=[3] * 3, shortcut_kernel=[1] * 3, base_channels=8,
                      pool_kernel=8, se=True, se_placement=placement, se_reduction=4, se_impl="triton")
    model = build_model(cfg)
    graphs = []

    def recording_backend(gm, example_inputs):
        graphs.append(gm)
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    torch._dynamo.reset()
    x = torch.randn(2, 3, 32, 32)
    y = torch.compile(model, fullgraph=True, backend=recording_backend)(x)
    y.square().sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    y_eager = model(x)
    y_eager.square().sum().backward()
    assert len(graphs) == 1
    assert sum(n.target is torch.ops.fasttrain.se_gate.default for n in graphs[0].graph.nodes) == gates
    _assert_close(y, y_eager, 1e-5)
    for g, p in zip(grads, model.parameters()):
        _assert_close(g, p.grad, 1e-5)


@pytest.mark.slow
def test_compile_fullgraph_cpu_inductor(interpreted):
    _check_compiled("cpu", "inductor")


@pytest.mark.skipif(torch.cuda.is_available(), reason="on CUDA machines the gpu tests compile the kernels")
def test_kernels_compile_for_h100():
    """The interpreter is lenient (types of if-branches, constexpr rules): compile every launch the
    forward and backward make for sm_90 in a process without it, and check the vector loads."""
    script = textwrap.dedent("""
        import torch
        from fasttrain.kernels import se
        from fasttrain.kernels._utils import compile_for_gpu, record_launches
        cases = [((4, 64, 32, 32), torch.bfloat16, torch.channels_last, True),
                 ((3, 24, 7, 5), torch.float32, torch.contiguous_format, False)]
        for shape, dtype, fmt, residual in cases:
            x = torch.randn(shape).to(dtype=dtype, memory_format=fmt)
            c, cr = shape[1], max(1, shape[1] // 16)
            w = (torch.randn(cr, c), torch.randn(cr), torch.randn(c, cr), torch.randn(c))
            with record_launches() as launches:
                y = se._se_gate_triton(x, *w, x.clone() if residual else None)
                se._se_gate_backward_triton(torch.randn_like(x), x, *w, y if residual else None)
            for kernel, args, kwargs in launches:
                ptx = compile_for_gpu(kernel, args, kwargs).asm["ptx"]
                vector = "ld.global.v4" in ptx or "ld.global.nc.v4" in ptx
                print(kernel.fn.__name__, shape[2] * shape[3] % 16 == 0 and vector)
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [line.split() for line in out.stdout.splitlines()]
    assert len(lines) == 2 * 7, out.stdout
    # The elementwise and reduction kernels of the aligned shape must use 16-byte vector loads.
    big = {"_se_pool_kernel", "_se_gate_kernel", "_se_bwd_reduce_kernel", "_se_gate_bwd_kernel"}
    assert all(ok == "True" for name, ok in lines[:7] if name in big), out.stdout


# ----------------------------------------------------------------------------------------------------
# GPU: the compiled kernels (deselected on CPU with -m "not gpu")
# ----------------------------------------------------------------------------------------------------
GPU_SHAPES = SHAPES + [(128, 64, 32, 32), (128, 128, 16, 16), (128, 256, 8, 8)]


@pytest.mark.gpu
@pytest.mark.parametrize("residual", [False, True], ids=["gate", "gate+residual+relu"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_se_gate_cuda_matches_reference(shape, dtype, channels_last, residual):
    torch.manual_seed(0)
    check_against_reference(_se_inputs(shape, dtype, "cuda", channels_last, residual, reduction=16))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_compile_fullgraph_cuda(dtype):
    """Inductor on CUDA, fp32 and under bf16 autocast (bf16 activations, fp32 SE weights)."""
    _check_compiled("cuda", "inductor", dtype)


@pytest.mark.gpu
def test_opcheck_cuda():
    torch.manual_seed(3)
    inputs = _se_inputs((4, 64, 8, 8), torch.bfloat16, "cuda", True, True, conv_weights=False)
    inputs = [t.requires_grad_() for t in inputs]
    torch.library.opcheck(torch.ops.fasttrain.se_gate.default, tuple(inputs))
