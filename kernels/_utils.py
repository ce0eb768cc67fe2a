"""Small helpers shared by the Triton kernel files (device dispatch, block-size arithmetic)."""
from __future__ import annotations

import contextlib
import os
import sys

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


# ----------------------------------------------------------------------------------------------------
# Benchmark helpers (benchmarks/kernels/*.py): CUDA-event timing, copy bandwidth, run metadata
# ----------------------------------------------------------------------------------------------------
def require_cuda(script: str) -> None:
    """GPU benchmarks refuse to run (exit status 2, a message on stderr) without a CUDA device."""
    if not torch.cuda.is_available():
        sys.stderr.write(f"{script}: this is a GPU benchmark and no CUDA device is available\n")
        raise SystemExit(2)


def cuda_times_ms(fn, warmup: int = 20, iters: int = 100, flush_l2: bool = True) -> list[float]:
    """Per-call GPU times of ``fn()`` in ms from CUDA events (median these). With ``flush_l2`` a
    256 MiB buffer is overwritten before each call, outside the timed region, so tensors that fit in
    L2 (50 MiB on H100) are read from HBM as in training."""
    scratch = torch.empty(256 << 20, dtype=torch.uint8, device="cuda") if flush_l2 else None
    for _ in range(warmup):
        fn()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
    for start, end in events:
        if scratch is not None:
            scratch.zero_()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return [start.elapsed_time(end) for start, end in events]


def median(values: list[float]) -> float:
    values = sorted(values)
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else 0.5 * (values[mid - 1] + values[mid])


def copy_bandwidth_gbs(nbytes: int = 1 << 30) -> float:
    """Measured device-to-device copy bandwidth in GB/s (bytes read + bytes written per second):
    the practical ceiling that kernels' effective bandwidth is compared against."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = median(cuda_times_ms(lambda: dst.copy_(src), warmup=5, iters=20, flush_l2=False))
    return 2 * nbytes / (ms * 1e-3) / 1e9


def run_metadata() -> dict:
    """Device, versions, git commit and the command line of a benchmark run."""
    import datetime
    import subprocess

    import triton

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10).stdout.strip() or "unknown (no commit)"
    except (OSError, subprocess.SubprocessError):
        sha = "unknown"
    props = torch.cuda.get_device_properties(0)
    return {
        "device": props.name, "capability": f"{props.major}.{props.minor}",
        "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
        "git_sha": sha, "command": " ".join([sys.executable] + sys.argv),
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def results_path(folder: str, stem: str, device: str) -> str:
    """``folder/stem_<device>.json`` with the device name made file-name safe."""
    slug = "".join(ch if ch.isalnum() else "-" for ch in device).strip("-").lower()
    os.makedirs(folder, exist_ok=True)
    return os.path.join(folder, f"{stem}_{slug}.json")


def print_table(title: str, columns: list[str], rows: list[list]) -> None:
    """A rich table when rich is installed, aligned plain text otherwise (logs stay readable)."""
    cells = [[c if isinstance(c, str) else f"{c:,.2f}" if isinstance(c, float) else str(c) for c in row]
             for row in rows]
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        widths = [max(len(x) for x in col) for col in zip(columns, *cells)]
        print(title)
        for row in [columns] + cells:
            print("  ".join(x.rjust(w) for x, w in zip(row, widths)))
        return
    table = Table(title=title)
    for name in columns:
        table.add_column(name, justify="right")
    for row in cells:
        table.add_row(*row)
    Console().print(table)
