"""Small helpers shared by the Triton kernel files (device dispatch, block-size arithmetic)."""
from __future__ import annotations

import contextlib
import os

import torch

# Triton decides at ``@triton.jit`` decoration time whether kernels are interpreted, so the flag is
# read once at import, exactly like Triton reads it: set ``TRITON_INTERPRET=1`` before importing.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(t: torch.Tensor) -> bool:
    """True when ``t`` should go through the Triton kernels.

    CUDA tensors always do. CPU tensors do only under ``TRITON_INTERPRET=1``, so that the tests run the
    real kernel code on a machine without a GPU; otherwise CPU tensors take the PyTorch reference path.
    """
    return t.is_cuda or (INTERPRET and t.device.type == "cpu")


def next_pow2(n: int) -> int:
    """Smallest power of two >= max(n, 1) (``tl.arange`` extents must be powers of two)."""
    return 1 << max(int(n) - 1, 0).bit_length()


def same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when dense tensors ``a`` and ``b`` of one shape put each element at the same offset.

    Strides of size-1 dimensions are ignored: they never multiply a nonzero index. Autograd relies on
    the same rule (its gradient-layout contract), so a parameter of shape [C, Cr, 1, 1] in
    channels_last can get a gradient whose size-1 strides differ and that is still laid out alike.
    """
    return (a.shape == b.shape and is_dense(a) and is_dense(b)
            and all(sa == sb for sa, sb, n in zip(a.stride(), b.stride(), a.shape) if n != 1))


def is_dense(t: torch.Tensor) -> bool:
    """True when ``t`` covers exactly ``numel`` consecutive elements of memory in some dim order.

    Contiguous and channels_last tensors (and any permutation of a contiguous tensor) qualify; then
    element ``i`` of the memory span ``[data_ptr, data_ptr + numel)`` is well defined and two dense
    tensors with equal sizes and strides map the same logical element to the same span index.
    """
    if t.numel() == 0:
        return True
    expected = 1
    for size, stride in sorted(zip(t.shape, t.stride()), key=lambda d: d[1]):
        if size == 1:
            continue
        if stride != expected:
            return False
        expected *= size
    return True


# ----------------------------------------------------------------------------------------------------
# Development aid: compile kernel launches for a GPU on a machine without one
# ----------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def record_launches():
    """Within the block, Triton launches are recorded as ``(kernel, args, kwargs)`` and not run.

    Used with :func:`compile_for_gpu` to check, on a CPU-only machine, that the launchers' real
    arguments compile for a GPU. Needs real (not interpreted) kernels: do not set TRITON_INTERPRET.
    """
    from triton.runtime.jit import JITFunction

    launches, original = [], JITFunction.run

    def record(self, *args, grid, warmup=False, **kwargs):
        launches.append((self, args, kwargs))

    JITFunction.run = record
    try:
        yield launches
    finally:
        JITFunction.run = original


def compile_for_gpu(kernel, args, kwargs, capability: int = 90):
    """Compile one recorded launch for CUDA ``sm_<capability>`` with Triton's own argument
    specialization (stride-1 ints become constants, 16-byte-aligned pointers get divisibility hints),
    exactly as a launch would. Returns the compiled kernel (``.asm["ptx"]``, ...). Relies on Triton
    internals of the 3.x series (checked on 3.8)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.compiler import ASTSource
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", capability, 32)
    backend = CUDABackend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    source = ASTSource(kernel, signature, constexprs, attrs)
    return triton.compile(source, target=target, options=options.__dict__)
