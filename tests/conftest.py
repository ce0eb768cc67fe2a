"""Shared test set-up.

Triton kernels run on the CPU under the interpreter: TRITON_INTERPRET must be set before any kernel
module is imported, so it is set here, at collection time, when there is no CUDA device. On the GPU
machine it stays unset and the `gpu`-marked tests compile the real kernels.
"""
import contextlib
import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(min(2, os.cpu_count() or 1))

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def one_torch_thread():
    """For tests that run torch ops next to DALI's worker threads: on 2 shared cores one intra-op
    thread was 4-6x faster than a 2-thread OpenMP team, whose barriers spin-wait when the CPU is busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# Process-wide numerics switches the Trainer sets on CUDA (TF32 matmuls and convolutions, cuDNN
# autotuning). A test that builds a Trainer must not hand them to the next test in its worker: a kernel
# test's fp32 reference computed with TF32 is off by ~1e-4 relative, 10x its tolerance: the most likely
# cause of the 14 SE kernel failures on the GPU machine (2026-11-26), which passed in an earlier order.
_NUMERICS_FLAGS = [(torch.backends.cuda.matmul, "allow_tf32"), (torch.backends.cudnn, "allow_tf32"),
                   (torch.backends.cudnn, "benchmark"), (torch.backends.cudnn, "deterministic")]


@contextlib.contextmanager
def numerics_flags_restored():
    """The block may change the numerics switches; they are as before when it ends."""
    saved = [getattr(owner, name) for owner, name in _NUMERICS_FLAGS]
    precision = torch.get_float32_matmul_precision()
    try:
        yield
    finally:
        for (owner, name), value in zip(_NUMERICS_FLAGS, saved):
            setattr(owner, name, value)
        torch.set_float32_matmul_precision(precision)


@pytest.fixture(autouse=True)
def _restore_numerics_flags():
    """Every test starts from the same numerics switches, whatever the previous test set."""
    with numerics_flags_restored():
        yield


@pytest.fixture
def rank_of_a_torchrun_job(monkeypatch):
    """This process as rank RANK of a torchrun job of `nodes` nodes of 2 ranks each (LOCAL_RANK = RANK % 2), watched
    by torchrun's agent (which sets TORCHELASTIC_RUN_ID for its workers): what the CLI's error report and its
    once-only lines read. Call it with the rank."""
    def be(rank: int, nodes: int = 1) -> None:
        for name, value in (("RANK", rank), ("LOCAL_RANK", rank % 2), ("WORLD_SIZE", 2 * nodes),
                            ("TORCHELASTIC_RUN_ID", "test")):
            monkeypatch.setenv(name, str(value))
    return be


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def cifar_dir() -> Path:
    """The folder holding real CIFAR-10, found the way the trainer finds it: $FASTTRAIN_DATA, else ./data.

    If neither holds it, the official tarball is downloaded into ./data once (md5-checked); offline,
    the tests fail with the loader's message saying where to put which files. CI decodes the JPEG-75
    stand-in instead (`python ../shared/data/cifar10-jpeg75/build.py DIR; export FASTTRAIN_DATA=DIR`).
    """
    from fasttrain.data.cifar import DataError, find_cifar10, load_cifar10, resolve_data_dir

    root = resolve_data_dir(None)
    if find_cifar10(root) is None:
        try:
            load_cifar10(root, download=True)
        except DataError as e:
            pytest.fail(f"no CIFAR-10 for the tests: {e}")
    return root


def _interpreter_problem() -> str | None:
    """Why the Triton interpreter cannot run a plain kernel here (None: it can). Seen: triton 3.6's
    interpreter converts 1-element arrays with int(), which numpy 2.4 no longer allows."""
    import triton
    import triton.language as tl

    @triton.jit
    def _probe(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, n, BLOCK):  # a loop over a runtime bound, as every kernel here has
            acc += tl.load(x_ptr + start + tl.arange(0, BLOCK))
        tl.store(y_ptr + tl.arange(0, BLOCK), acc)

    x, y = torch.arange(8, dtype=torch.float32), torch.zeros(4)
    try:
        _probe[(1,)](x, y, 8, BLOCK=4)
    except Exception as e:  # noqa: BLE001 - any failure is the answer
        return f"{type(e).__name__}: {e}"
    return None if torch.equal(y, torch.tensor([4.0, 6.0, 8.0, 10.0])) else f"wrong result {y.tolist()}"


@pytest.fixture(scope="session")
def interpreted():
    """CPU kernel tests: CPU tensors must take the interpreted Triton path, and the interpreter must work."""
    from fasttrain.kernels._utils import use_triton

    if not use_triton(torch.empty(0)):
        pytest.skip("CPU kernel tests need TRITON_INTERPRET=1 (set above on machines without CUDA); on a "
                    "CUDA machine the gpu-marked tests run the real kernels")
    problem = _interpreter_problem()
    if problem is not None:
        import numpy
        import triton

        pytest.fail(f"the Triton {triton.__version__} interpreter cannot run kernels with numpy "
                    f"{numpy.__version__} ({problem}). Seen with triton 3.6 and numpy >= 2.4 (triton 3.8 works): "
                    "pip install 'numpy<2.4', or a newer triton, for the CPU kernel tests", pytrace=False)
