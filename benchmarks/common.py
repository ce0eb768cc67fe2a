"""The one home of the benchmark scripts' shared helpers (none of this ships in the fasttrain package):
run metadata (device, versions, git sha, command line, timestamp), device names and result-file naming,
JSON writing, GPU timing (CUDA events, copy bandwidth), the result-table printer, and the clean-error
wrapper around a script's main.

The scripts are run as files (`python benchmarks/NAME.py`), so this module is imported as `common`:
from the scripts' own folder, and by benchmarks/kernels/*.py and bench_loader.py after putting
benchmarks/ on sys.path. Importing it puts the repository root on sys.path when fasttrain is not installed.
"""
from __future__ import annotations

import argparse
import functools
import gc
import json
import math
import os
import platform
import re
import shlex
import statistics
import sys
import time
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO_ROOT = Path(__file__).resolve().parents[1]
# A_paper, issue 6's accuracy target: configs/seed.yaml (the paper's exact recipe, 200 epochs) trained on
# the data the project measures on (the JPEG-75 stand-in), its mean final test accuracy over the seeds
# in this folder. Read from the run summaries, never copied as a number that could drift from them.
APAPER_RUNS = RESULTS_DIR / "2026-11-26-h200-apaper" / "apaper"

try:  # the documented set-up is `pip install -e .`; a bare checkout still finds the package
    import fasttrain  # noqa: F401
except ImportError:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

from fasttrain.runtime import device_name, git_sha  # noqa: E402

# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s, from the vendors' datasheets. Matched on the
# name torch reports; an unknown card gets no peak (null) rather than a guess.
BF16_PEAK_TFLOPS = (
    (("H100", "PCIE"), 756.0),
    (("H100", "HBM3"), 989.0),   # the SXM5 board reports itself as "NVIDIA H100 80GB HBM3"
    (("H100", "SXM"), 989.0),
    (("H200", "NVL"), 835.0),    # the NVL board's lower power limit: 1,671 with sparsity, not 1,979
    (("H200",), 989.0),
    (("A100",), 312.0),
)


def a_paper(runs: Path = APAPER_RUNS) -> float:
    """A_paper in percent (2 decimals): the mean `final_test_acc` of the seed.yaml runs' summary.json
    files under ``runs`` (one folder per seed)."""
    accs = []
    for summary in sorted(runs.glob("*/summary.json")):
        run = json.loads(summary.read_text())
        if run.get("name") != "seed" or run.get("epochs") != 200 or run.get("final_test_acc") is None:
            raise ValueError(f"{summary} is not a finished 200-epoch run of configs/seed.yaml: A_paper is "
                             "the mean of those alone")
        accs.append(run["final_test_acc"])
    if len(accs) < 2:
        raise ValueError(f"A_paper needs at least 2 seeds of configs/seed.yaml in {runs}, found {len(accs)}")
    return round(statistics.fmean(accs), 2)


def accuracy_target(text: str) -> float:
    """A --targets entry: a percentage, or `apaper` for A_paper (read from the recorded runs)."""
    if text.strip().lower().replace("_", "") == "apaper":
        try:
            return a_paper()
        except ValueError as e:  # argparse shows only an ArgumentTypeError's message; a ValueError's is lost
            raise argparse.ArgumentTypeError(f"apaper: {e}") from None
    try:
        return float(text)
    except ValueError:  # argparse prints an ArgumentTypeError's own message
        raise argparse.ArgumentTypeError(f"{text!r} is not an accuracy: give a percentage such as 94, "
                                         "or apaper") from None


def add_targets_argument(parser: argparse.ArgumentParser, default: list[float], split: str) -> None:
    """--targets, as both time_to_accuracy.py and recipe_ablation.py take it (checked by check_targets)."""
    shown = " ".join(f"{t:g}" for t in default)
    parser.add_argument("--targets", type=accuracy_target, nargs="+", default=default,
                        help=f"{split} accuracies in percent; `apaper` is A_paper, the paper's recipe on our data "
                             f"(benchmarks/results/2026-11-26-h200-apaper), e.g. --targets apaper {shown} "
                             f"(default: {shown})")


def check_targets(targets: list[float]) -> None:
    from fasttrain.config import ConfigError

    if any(not 0 <= t <= 100 for t in targets):
        raise ConfigError(f"--targets {targets}: accuracies are percentages in 0..100")
    if any(0 < t < 1 for t in targets):  # 0.94 would be reached by any run: a fraction meant as a percentage
        raise ConfigError(f"--targets {targets}: accuracies are percentages (94, not 0.94)")


def check_out(path: Path | None) -> None:
    """Refuse, before anything trains, an --out that cannot be written: its first write comes after the
    first run, which a traceback there would throw away."""
    from fasttrain.config import ConfigError

    if path is None:
        return
    if path.is_dir():  # the probe below writes beside it, so a folder would pass and fail at the first write
        raise ConfigError(f"--out {path} is a folder: --out names the result file (e.g. {path / 'result.json'})")
    probe = path.with_name(f".{path.name}.probe")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"--out {path}: cannot write there ({e.strerror or e}); pass another --out") from None


def check_runs_dir(runs_dir: Path | None, names: list[str], overwrite: bool) -> None:
    """Refuse, before anything trains, a --runs-dir whose run folders (`names`) already hold runs,
    unless --overwrite: found one by one, the later runs would fail after the first trained."""
    from fasttrain.checkpoint import holds_run
    from fasttrain.config import ConfigError

    if runs_dir is None or overwrite:
        return
    held = [name for name in names if holds_run(runs_dir / name)]
    if held:
        raise ConfigError(f"--runs-dir {runs_dir} already holds runs ({', '.join(held)}): pass --overwrite to "
                          "replace them, or another --runs-dir")


def parse_known_overrides(parser: argparse.ArgumentParser, argv: list[str]) -> tuple[argparse.Namespace, dict]:
    """The script's own flags, and the rest as config overrides ({"optim.lr": 0.2}): a flag that is
    neither gets the closest of the script's options and the config keys as a suggestion."""
    from fasttrain.config import parse_overrides

    args, rest = parser.parse_known_args(argv)
    options = tuple(o for action in parser._actions for o in action.option_strings
                    if o.startswith("--") and o != "--help")
    return args, parse_overrides(rest, options) if rest else {}


def bf16_peak_tflops(name: str) -> float | None:
    upper = name.upper()
    for words, peak in BF16_PEAK_TFLOPS:
        if all(w in upper for w in words):
            return peak
    return None


def device_label(device: torch.device) -> str:
    """The device as result files and table titles name it: the GPU's name, or 'CPU (arch, N cores)'
    (fasttrain.runtime.device_name, capitalised for a CPU)."""
    name = device_name(device)
    if device.type != "cuda" and name.startswith("cpu"):
        name = "CPU" + name[len("cpu"):]
    return name


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


def host() -> dict:
    """The host's CPU: what a host-bound figure (the paper's DataLoader, DALI's per-sample work, an eager step)
    depends on, and differs between two machines of the same GPU kind. The load average says whether
    something else was running."""
    cpu = None
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
    except OSError:  # not Linux
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {"cpu": cpu or platform.processor() or None, "cpus": os.cpu_count(), "usable_cpus": usable,
            "loadavg_1m": load}


def command_line(argv: list[str] | None = None) -> str:
    """The command as typed (interpreter + script + arguments), shell-quoted so it can be re-run.
    `argv` (script and arguments) replaces sys.argv when a script's main is called in-process."""
    return shlex.join([Path(sys.executable).name, *(sys.argv if argv is None else argv)])


def run_metadata(device: torch.device, *, argv: list[str] | None = None, flat: bool = False) -> dict:
    """What every result file records about its run: device (name, type, CUDA capability), versions
    (python, torch, CUDA, cuDNN, triton, DALI, torchvision), the host's CPU, git sha, command line, working directory
    and timestamp. `flat` also puts each version, and the timestamp as `time`, at the top level: the
    layout bench_loader.py's and the kernel benchmarks' result files have always had."""
    capability = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        capability = f"{props.major}.{props.minor}"
    meta = {
        "device": device_label(device),
        "device_type": device.type,
        "capability": capability,
        "versions": versions(),
        "host": host(),
        "git_sha": git_sha(),
        "command": command_line(argv),
        "cwd": os.getcwd(),
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if flat:
        meta = {**meta, **meta["versions"], "time": meta["timestamp"]}
    return meta


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


def write_complete(path: Path, payload: dict) -> Path:
    """The last write of a result that is rewritten as it grows: marked complete, and said so."""
    payload["complete"] = True
    write_json(path, payload)
    print(f"wrote {path}")
    return path


def wide_console():
    """A rich console for the result tables; in a log file (no terminal) 200 columns, so tables never wrap."""
    from rich.console import Console

    console = Console(highlight=False)
    return console if console.is_terminal else Console(highlight=False, width=200)


def print_table(title: str, columns: list[str], rows: list[list]) -> None:
    """A right-aligned rich table on stdout (wide_console). Cells: strings as given, floats as
    `1,234.57`, anything else via str()."""
    from rich.table import Table

    table = Table(title=title)
    for name in columns:
        table.add_column(name, justify="right")
    for row in rows:
        table.add_row(*(c if isinstance(c, str) else f"{c:,.2f}" if isinstance(c, float) else str(c) for c in row))
    wide_console().print(table)


# ----------------------------------------------------------------------------------------------------
# GPU timing
# ----------------------------------------------------------------------------------------------------
def release_memory() -> None:
    """Free what a finished run left before the next one builds: a Trainer sits in reference cycles
    (model, EMA, CUDA graph, GPU-resident data), which only a collection frees; then the CUDA cache's
    blocks go back, so the next run compiles and captures on a clean device."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def require_cuda(script: str, hint: str = "run it on the GPU machine") -> None:
    """GPU benchmarks refuse to run without a CUDA device: one line on stderr, then SystemExit(2)."""
    if not torch.cuda.is_available():
        print(f"{script}: no CUDA device. This is a GPU benchmark: {hint}.", file=sys.stderr)
        raise SystemExit(2)


def endless(loader):
    """A loader's batches epoch after epoch (set_epoch 0, 1, ...), so a timing window never ends at
    an epoch boundary."""
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        yield from loader
        epoch += 1


class Timer:
    """Wall time of queued device work, in `.seconds`: CUDA events on the current stream (the start
    event after a synchronize, so nothing earlier is counted; the end event waited on), perf_counter
    on a CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __enter__(self) -> "Timer":
        if self.cuda:
            torch.cuda.synchronize()
            self._start = torch.cuda.Event(enable_timing=True)
            self._end = torch.cuda.Event(enable_timing=True)
            self._start.record()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            self._end.record()
            self._end.synchronize()
            self.seconds = self._start.elapsed_time(self._end) / 1e3
        else:
            self.seconds = time.perf_counter() - self._t0


@functools.lru_cache(maxsize=None)
def _spin_cycles_per_ms(device_index: int) -> float:
    """Clock cycles of torch.cuda._sleep per millisecond on this GPU (measured once)."""
    cycles = 1 << 21
    torch.cuda._sleep(cycles)  # the first call pays for loading the kernel
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(cycles)
    end.record()
    end.synchronize()
    return cycles / start.elapsed_time(end)


def cuda_times_ms(fn, warmup: int = 20, iters: int = 100, flush_l2: bool = True,
                  include_host: bool = False) -> list[float]:
    """Per-call GPU times of ``fn()`` in ms from CUDA events (median these). With ``flush_l2`` a
    256 MiB buffer is overwritten before each call, outside the timed region, so tensors that fit in
    L2 (50 MiB on H100) are read from HBM as in training.

    By default the time is the GPU's alone: before each call the GPU is held in a spin loop for twice
    the host's measured time to queue ``fn`` (its median over the second half of the warmup calls), so
    all of ``fn``'s launches are queued before the start event runs. Without that hold, an ``fn`` whose
    Python and launch overhead exceeds its GPU work (autograd.grad over a few small kernels) would be
    charged for the GPU idling between its launches. ``include_host`` instead synchronizes before each
    call: the GPU then idles until ``fn``'s first launch, and a host-bound ``fn`` is charged for its
    overhead (what a training loop without CUDA graphs pays)."""
    scratch = torch.empty(256 << 20, dtype=torch.uint8, device="cuda") if flush_l2 else None
    host_ms = []
    for _ in range(warmup):
        t0 = time.perf_counter()
        fn()
        host_ms.append(1e3 * (time.perf_counter() - t0))
    hold = 0
    if not include_host and host_ms:
        queue_ms = statistics.median(host_ms[len(host_ms) // 2:])
        hold = int(_spin_cycles_per_ms(torch.cuda.current_device()) * (2 * queue_ms + 0.02))
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
    for start, end in events:
        if scratch is not None:
            scratch.zero_()
        if include_host:
            torch.cuda.synchronize()
        elif hold:
            torch.cuda._sleep(hold)
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return [start.elapsed_time(end) for start, end in events]


def matmul_tflops(n: int = 8192, iters: int = 10) -> float:
    """Measured dense bf16 matrix-product rate in TFLOP/s (random n x n operands, median of `iters`):
    the practical compute ceiling, beside the datasheet peak (both ceilings are reported)."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms = statistics.median(cuda_times_ms(lambda: a @ b, warmup=3, iters=iters, flush_l2=False))
    return 2 * n ** 3 / (ms * 1e-3) / 1e12


def times_ms(device: torch.device, fn, warmup: int = 20, iters: int = 100, **cuda_options) -> list[float]:
    """cuda_times_ms on a GPU. On the CPU (a kernel benchmark's --cpu-smoke, which checks that the
    script works, not how fast) the host clock's time of each call, after `warmup` untimed calls."""
    if device.type == "cuda":
        return cuda_times_ms(fn, warmup, iters, **cuda_options)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - t0))
    return times


def copy_bandwidth_gbs(device: torch.device | str = "cuda", nbytes: int = 1 << 30) -> float:
    """Measured device-to-device copy bandwidth in GB/s (bytes read + bytes written per second):
    the practical ceiling that kernels' effective bandwidth is compared against."""
    device = torch.device(device)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = statistics.median(times_ms(device, lambda: dst.copy_(src), warmup=5, iters=20, flush_l2=False))
    return 2 * nbytes / (ms * 1e-3) / 1e9


# ----------------------------------------------------------------------------------------------------
# The kernel microbenchmarks (benchmarks/kernels/*.py): opening, and result file + table
# ----------------------------------------------------------------------------------------------------
def start_gpu_benchmark(script: str, cpu_smoke: bool = False) -> tuple[torch.device, dict, float]:
    """Refuse without CUDA (require_cuda); else (device, run metadata, measured device-to-device copy
    GB/s, the reference the kernels' bandwidth is compared with), the copy bandwidth told on stderr.
    `cpu_smoke`: the CPU instead, for a run that checks the script works (metadata says cpu_smoke)."""
    if not cpu_smoke:
        require_cuda(script, "run it on the GPU machine, or pass --cpu-smoke for a tiny CPU run that only "
                             "checks it works")
    device = torch.device("cpu") if cpu_smoke else torch.device("cuda", torch.cuda.current_device())
    meta = {**run_metadata(device, flat=True), "cpu_smoke": cpu_smoke}
    copy_gbs = copy_bandwidth_gbs(device, nbytes=(64 << 20) if cpu_smoke else (1 << 30))
    print(f"{meta['device']}: device-to-device copy {copy_gbs:,.0f} GB/s", file=sys.stderr)
    return device, meta, copy_gbs


def add_kernel_bench_arguments(parser: argparse.ArgumentParser, smoke_help: str) -> None:
    """--out and --cpu-smoke, as every kernel benchmark takes them (see kernel_bench_out); `smoke_help`:
    what its smoke run does."""
    parser.add_argument("--out", help="folder for the JSON results (default benchmarks/results/; a temporary "
                                      "folder with --cpu-smoke)")
    parser.add_argument("--cpu-smoke", action="store_true", help=smoke_help)


def kernel_bench_out(args: argparse.Namespace) -> str:
    """Where a kernel benchmark writes: --out, else benchmarks/results/ for a GPU run and a temporary
    folder for a --cpu-smoke run (its numbers are not results)."""
    if args.out:
        return args.out
    if args.cpu_smoke:
        import tempfile

        return str(Path(tempfile.gettempdir()) / "fasttrain-cpu-smoke")
    return str(RESULTS_DIR)


def gpu_result_path(folder: str | Path, stem: str, device: torch.device, partial: bool = False) -> Path:
    """`folder/<stem>_<device slug>.json` (one file per script and card: a rerun replaces it); with
    `partial`, the `.partial.json` a script rewrites as it goes, until finish_gpu_benchmark."""
    return Path(folder) / f"{stem}_{device_slug(device)}{'.partial' if partial else ''}.json"


def save_partial(folder: str | Path, stem: str, device: torch.device, payload: dict) -> None:
    """The results so far, so that a run stopped by a time limit keeps the cases it finished."""
    write_json(gpu_result_path(folder, stem, device, partial=True), {**payload, "complete": False})


def finish_gpu_benchmark(folder: str | Path, stem: str, device: torch.device, payload: dict,
                         table: tuple[str, list[str], list[list]]) -> Path:
    """Write `payload` to gpu_result_path (replacing any partial file), say so on stderr, then print
    `table` = (title, columns, rows) with print_table."""
    path = write_json(gpu_result_path(folder, stem, device), payload)
    gpu_result_path(folder, stem, device, partial=True).unlink(missing_ok=True)
    print(f"wrote {path}", file=sys.stderr)
    title, columns, rows = table
    print_table(f"CPU smoke run, its times mean nothing: {title}" if payload.get("cpu_smoke") else title, columns, rows)
    return path


def run_main(main) -> None:
    """Known problems (bad config, missing data, a missing extra, a diverged run) end with one
    `error:` line and a non-zero exit, like `python -m fasttrain`; anything else keeps its traceback."""
    from fasttrain.checkpoint import CheckpointError
    from fasttrain.config import ConfigError
    from fasttrain.data.cifar import DataError
    from fasttrain.files import file_error_line
    from fasttrain.trainer import TrainingError

    try:
        code = main(sys.argv[1:])
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        code = 2
    except (DataError, CheckpointError, TrainingError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        code = 1
    except OSError as e:
        line = file_error_line(e)
        if line is None:
            raise
        print(line, file=sys.stderr)
        code = 1
    sys.exit(code)


# --------------------------------------------------------------------------------------------
# The paper's data path, the baseline every loader benchmark compares against
# --------------------------------------------------------------------------------------------
class ArrayDataset(torch.utils.data.Dataset):
    """`torchvision.datasets.CIFAR10` without the download: a PIL image from an NHWC uint8 array,
    then the transform, per sample, in the DataLoader worker."""

    def __init__(self, x, y, transform):
        self.x, self.y, self.transform = x, y, transform

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        from PIL import Image

        return self.transform(Image.fromarray(self.x[i])), int(self.y[i])


class PaperLoader:
    """The paper's loader: torchvision RandomCrop(32, padding) + RandomHorizontalFlip + ToTensor +
    Normalize in DataLoader CPU workers, pinned batches copied to the device per step. Same
    (images, labels) protocol as fasttrain's loaders; `channels_last` converts on the device."""

    def __init__(self, x, y, *, batch_size: int, device: torch.device, workers: int, mean, std,
                 crop_padding: int = 4, channels_last: bool = False, seed: int = 0):
        from torchvision import transforms

        transform = transforms.Compose([
            transforms.RandomCrop(32, padding=crop_padding), transforms.RandomHorizontalFlip(),
            transforms.ToTensor(), transforms.Normalize(mean, std)])
        self.device, self.batch_size, self.channels_last = device, batch_size, channels_last
        self.loader = torch.utils.data.DataLoader(
            ArrayDataset(x, y, transform), batch_size=batch_size, shuffle=True, drop_last=True,
            num_workers=workers, pin_memory=device.type == "cuda", persistent_workers=workers > 0,
            generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int) -> None:
        pass  # the DataLoader reshuffles on every pass by itself

    def __iter__(self):
        for images, labels in self.loader:
            images = images.to(self.device, non_blocking=True)
            if self.channels_last:
                images = images.to(memory_format=torch.channels_last)
            yield images, labels.to(self.device, non_blocking=True)
