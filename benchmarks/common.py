"""Helpers shared by the benchmark scripts: run metadata (device, versions, git sha, command line),
result-file naming and JSON writing, and the clean-error wrapper around a script's main.

The scripts are run as files (`python benchmarks/NAME.py`), so this module is imported as `common`
from the scripts' own folder.
"""
from __future__ import annotations

import json
import math
import os
import re
import shlex
import sys
import time
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO_ROOT = Path(__file__).resolve().parents[1]

try:  # the documented set-up is `pip install -e .`; a bare checkout still finds the package
    import fasttrain  # noqa: F401
except ImportError:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

from fasttrain.trainer import device_name, git_sha  # noqa: E402

# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s, from the vendors' datasheets. Matched on the
# name torch reports; an unknown card gets no peak (null) rather than a guess.
BF16_PEAK_TFLOPS = (
    (("H100", "PCIE"), 756.0),
    (("H100", "HBM3"), 989.0),   # the SXM5 board reports itself as "NVIDIA H100 80GB HBM3"
    (("H100", "SXM"), 989.0),
    (("H200",), 989.0),
    (("A100",), 312.0),
)


def bf16_peak_tflops(name: str) -> float | None:
    upper = name.upper()
    for words, peak in BF16_PEAK_TFLOPS:
        if all(w in upper for w in words):
            return peak
    return None


def device_slug(device: torch.device) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'; any CPU -> 'cpu' (for file names)."""
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-")


def _module_version(module: str) -> str | None:
    try:
        mod = __import__(module, fromlist=["__version__"])
    except Exception:  # absent, or a broken install failing inside its own imports
        return None
    return getattr(mod, "__version__", None)


def versions() -> dict:
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": cudnn,
        "triton": _module_version("triton"),
        "dali": _module_version("nvidia.dali"),
        "torchvision": _module_version("torchvision"),
    }


def command_line() -> str:
    """The command as typed (interpreter + script + arguments), shell-quoted so it can be re-run."""
    return shlex.join([Path(sys.executable).name, *sys.argv])


def run_metadata(device: torch.device) -> dict:
    return {
        "device": device_name(device),
        "device_type": device.type,
        "versions": versions(),
        "git_sha": git_sha(),
        "command": command_line(),
        "cwd": os.getcwd(),
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def default_result_path(kind: str, name: str, device: torch.device, suffix: str = ".json") -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return RESULTS_DIR / f"{kind}-{name}-{device_slug(device)}-{stamp}{suffix}"


def _finite_or_none(value):
    """JSON has no NaN/Infinity: strict parsers reject them, so they are written as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(v) for v in value]
    return value


def write_json(path: Path, payload: dict) -> Path:
    """Write via a temporary file and rename, so an interrupted run never leaves half a result file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(_finite_or_none(payload), indent=2, allow_nan=False) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


def wide_console():
    """A rich console for the result tables; in a log file (no terminal) 200 columns, so tables never wrap."""
    from rich.console import Console

    console = Console(highlight=False)
    return console if console.is_terminal else Console(highlight=False, width=200)


def run_main(main) -> None:
    """Known problems (bad config, missing data, a missing extra, a diverged run) end with one
    `error:` line and a non-zero exit, like `python -m fasttrain`; anything else keeps its traceback."""
    from fasttrain.checkpoint import CheckpointError
    from fasttrain.config import ConfigError
    from fasttrain.data.cifar import DataError
    from fasttrain.trainer import TrainingError

    try:
        code = main(sys.argv[1:])
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        code = 2
    except (DataError, CheckpointError, TrainingError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        code = 1
    sys.exit(code)
