"""Multi-process training on the CPU (gloo), launched the way users launch it: torchrun.

Every launch is 2 worker processes with OMP_NUM_THREADS=1 (2 cores), a tiny model and a few hundred
images. base_channels is 8, not 4: with 2-7 input channels, the 1x1 stride-2 shortcut convolution's
backward on channels_last input corrupts the heap in torch 2.14.1's CPU (oneDNN) build when run on
one thread (SIGSEGV / "double free"), which is how torchrun runs each worker by default.
"""
from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from fasttrain.checkpoint import load_checkpoint
from fasttrain.config import ConfigError, load_config
from fasttrain.console import RunConsole
from fasttrain.data.loader_torch import TorchLoader
from fasttrain.distributed import STOP_AGREEMENT_EVERY, DistInfo, StopAgreement, rank_seed
from fasttrain.evaluate import evaluate_checkpoint
from fasttrain.graph import DDP_WARMUP_ITERS
from fasttrain.signals import StopRequest
from fasttrain.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]
HELPER = REPO / "tests" / "dist_helper.py"
SMOKE = str(REPO / "configs" / "smoke.yaml")
# 512 training images = 8 steps of 32 per rank; 101 validation and 201 test images split 50/51 and
# 100/101 between the ranks (uneven shards, and with eval batches of 50 an uneven number of batches)
TINY = ["--data.train_subset", "512", "--data.val_size", "101", "--data.test_subset", "201",
        "--model.blocks", "[1,1,1]", "--model.base_channels", "8", "--model.se_reduction", "4",
        "--train.batch_size", "32", "--train.eval_batch_size", "50", "--optim.lookahead_k", "3",
        "--train.epochs", "2", "--output.progress", "false"]


def tiny(**changes: str) -> list[str]:
    """TINY with some values changed: tiny(**{"train.batch_size": "64"})."""
    args = list(TINY)
    for key, value in changes.items():
        args[args.index(f"--{key}") + 1] = value
    return args


RUN_FILES = {"config.yaml", "metrics.jsonl", "summary.json", "last.pt", "prev.pt"}

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def launcher_temp_dir(tmp_path, monkeypatch):
    """torchrun leaves a torchelastic_* folder of logs in the temp dir at every launch: the children
    inherit this test's tmp_path as TMPDIR (worker_env copies the environment), which pytest prunes."""
    monkeypatch.setenv("TMPDIR", str(tmp_path))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_env(cifar_dir, **extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", FASTTRAIN_DATA=str(cifar_dir), PYTHONPATH=str(REPO))
    env.update(extra)
    return env


def torchrun(args: list[str], cifar_dir, *, cwd, rdzv: bool = False, check: bool = True, timeout: float = 300,
             **extra_env) -> subprocess.CompletedProcess:
    """`python -m torch.distributed.run --nproc_per_node=2 ...` (single-node form, or the multi-node
    rendezvous form with rdzv=True)."""
    port = free_port()
    launch = (["--nnodes", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}"] if rdzv
              else ["--master_port", str(port)])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", *launch, *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=worker_env(cifar_dir, **extra_env),
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-6000:]}")
    return proc


def helper(cifar_dir, tmp_path, dump: Path, *extra: str, ranks: int = 2, config: list[str] = TINY) -> list[dict]:
    args = [str(HELPER), "--dump", str(dump), "--config", SMOKE, *config, *extra]
    if ranks == 2:
        torchrun(args, cifar_dir, cwd=tmp_path)
    else:
        proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=tmp_path,
                              env=worker_env(cifar_dir), timeout=300)
        assert proc.returncode == 0, proc.stderr[-6000:]
    return [torch.load(dump / f"rank{r}.pt", weights_only=True) for r in range(ranks)]


def assert_same_state(a: dict, b: dict, exact: bool = True) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if exact:
            assert torch.equal(a[k], b[k]), k
        else:
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)


def test_graphed_step_under_ddp_replays_in_lockstep_and_trains_like_eager(cifar_dir, tmp_path):
    """train.cuda_graph under torchrun, with the graph API faked on the CPU (gloo): every rank warms DDP
    up for its 11 iterations, captures once, replays every real step, and ends where the eager run
    does. The plumbing, not CUDA: the NCCL capture itself needs the GPU machine."""
    config = tiny(**{"train.epochs": "2"}) + ["--optim.impl", "fused"]
    eager = helper(cifar_dir, tmp_path, tmp_path / "eager", config=config)
    graphed = helper(cifar_dir, tmp_path, tmp_path / "graphed", "--fake-graph", config=config)
    steps = 2 * graphed[0]["train_batches"]
    for e, g in zip(eager, graphed):
        assert (g["captures"], g["replays"]) == (1, steps) and (e["captures"], e["replays"]) == (0, 0)
        # PyTorch's rules for a captured DDP backward: 11 eager iterations first, thread-local capture
        assert g["warmups"] == [DDP_WARMUP_ITERS] and g["capture_modes"] == ["thread_local"]
        assert_same_state(e["state"], g["state"], exact=False)
    assert_same_state(graphed[0]["state"], graphed[1]["state"])  # the ranks stayed identical


class OneRankGroup(DistInfo):
    """A process group of one rank that the trainer treats as distributed: DDP, the collectives, the
    ranks' StopAgreement, every rank's RNG gathered into checkpoints. What one device can run of the
    torchrun path: torchrun with one process is a plain run (WORLD_SIZE=1: no group, no DDP, as timm
    does), so it tests none of that."""

    @property
    def enabled(self) -> bool:
        return True


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_one_rank_ddp_trains_like_a_plain_run_and_its_graph_like_its_eager_step(cifar_dir, tmp_path, device,
                                                                               monkeypatch):
    """The trainer's torchrun path on one device, in process: gloo on the CPU, NCCL on a GPU, where the
    DDP step is also captured as a CUDA graph (NCCL under capture) and must end where the eager DDP step
    does. fp32, deterministic; 2 epochs of 20 steps, in each of which StopAgreement launches its async
    all-reduce after step 16 (on the GPU: between graph replays) and drains it at the epoch's end."""
    import torch.distributed as tdist
    from torch.nn.parallel import DistributedDataParallel

    from test_train import quiet, tiny_config

    if device == "cuda":
        assert torch.cuda.is_available(), "a gpu-marked test: run it where CUDA is (-m gpu)"
        torch.cuda.set_device(0)
    launches = []
    launch = StopAgreement._launch
    monkeypatch.setattr(StopAgreement, "_launch", lambda self: launches.append(self.info) or launch(self))
    settings = dict(optim__impl="fused", train__precision="fp32", train__deterministic="true", train__batch_size="32")
    runs = {"plain": (DistInfo(), "false"), "ddp": (OneRankGroup(), "false")}
    if device == "cuda":
        runs["ddp_graph"] = (OneRankGroup(), "true")
    states = {}
    tdist.init_process_group("nccl" if device == "cuda" else "gloo", store=tdist.HashStore(), rank=0, world_size=1)
    try:
        for name, (info, graph) in runs.items():
            cfg = tiny_config(cifar_dir, tmp_path / name, train__cuda_graph=graph, **settings)
            trainer = Trainer(cfg, device=device, console=quiet(), dist_info=info)
            assert isinstance(trainer.net, DistributedDataParallel) is info.enabled
            launches.clear()
            summary = trainer.fit()
            assert summary["world_size"] == 1 and summary["epochs"] == 2 and trainer.steps_per_epoch == 20
            assert len(launches) == (2 if info.enabled else 0)  # one agreement in flight per epoch
            assert (trainer._graph is not None) is (graph == "true")
            saved = load_checkpoint(tmp_path / name / "last.pt")
            assert (saved["rng_per_rank"] is not None) is info.enabled  # gathered over the group
            states[name] = saved["model"]
    finally:
        tdist.destroy_process_group()
    assert_same_state(states["plain"], states["ddp"], exact=False)
    if device == "cuda":
        assert_same_state(states["ddp"], states["ddp_graph"], exact=False)


# ------------------------------------------------------------------------------------------------
# The CLI under torchrun
# ------------------------------------------------------------------------------------------------
def test_torchrun_cli_trains_and_only_rank0_writes(cifar_dir, tmp_path):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    run = tmp_path / "run"
    # with the fused Lookahead-SGD (the workers inherit TRITON_INTERPRET from conftest: the interpreted kernel;
    # on a GPU machine, its PyTorch path on CPU tensors): it steps after DDP's all-reduce in backward(); in bf16
    # autocast, the GPU's default precision (DDP reduces the fp32 gradients of the fp32 weights)
    proc = torchrun(["-m", "fasttrain", "--config", SMOKE, *TINY, "--optim.impl", "fused", "--output.dir", str(run),
                     "--device", "cpu", "--train.precision", "bf16"], cifar_dir, cwd=cwd)
    # rank 0 wrote the run folder, and nobody wrote anything anywhere else (no stray runs/ folder)
    assert {p.name for p in run.iterdir()} == RUN_FILES
    assert list(cwd.iterdir()) == []
    # one process printed: one start line, one line per epoch, one summary
    assert proc.stdout.count("fasttrain: smoke") == 1
    assert "x 2 rank(s)" in proc.stdout
    assert "train.batch_size 32 is per rank: global batch 64" in proc.stdout
    assert proc.stdout.count("epoch   1/2") == 1 and proc.stdout.count("fasttrain run summary") == 1
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["precision"] == "bf16"
    # 2 ranks x 8 steps x 32 images per epoch; the test accuracy counts all 201 images once: the
    # checkpoint (rank 0's weights) evaluated in one process gives exactly the same number
    assert rows[0]["train_steps"] == 8
    alone = evaluate_checkpoint(run / "last.pt", device="cpu", data_dir=str(cifar_dir))
    assert alone["test_acc"] == summary["final_test_acc"] == rows[-1]["test_acc"]
    assert round(summary["final_test_acc"] * 201 / 100, 6).is_integer()


@pytest.mark.parametrize("nodes", [1, 2])
def test_killed_rank_ends_the_job_quickly(cifar_dir, tmp_path, nodes):
    """Rank 1 dies at step 3 (as a crashed or OOM-killed worker would): every launcher exits non-zero,
    naming the failure, well within the limit instead of hanging.

    nodes=1: one torchrun (rendezvous form), whose agent stops the surviving rank.
    nodes=2: two torchruns of one worker each, the multi-node launch on one machine: no agent sees
    both workers, so the survivor learns of the death from its next collective and exits with a
    one-line error.
    """
    run = tmp_path / "run"
    args = ["-m", "fasttrain", "--config", SMOKE, *TINY, "--output.dir", str(run), "--device", "cpu"]
    die = {"FASTTRAIN_TEST_DIE_RANK": "1", "FASTTRAIN_TEST_DIE_STEP": "3"}
    t0 = time.monotonic()
    if nodes == 1:
        proc = torchrun(args, cifar_dir, cwd=tmp_path, rdzv=True, check=False, timeout=180, **die)
        codes, stderr = [proc.returncode], proc.stderr
    else:
        launch = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                  "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "--rdzv-id", "test"]
        logs = [tmp_path / f"node{i}.log" for i in range(2)]
        procs = []
        for log in logs:
            with open(log, "w") as f:
                procs.append(subprocess.Popen(launch + args, stdout=f, stderr=subprocess.STDOUT, cwd=tmp_path,
                                              env=worker_env(cifar_dir, **die)))
        try:
            codes = [p.wait(timeout=180) for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
        stderr = "".join(log.read_text() for log in logs)
    elapsed = time.monotonic() - t0
    assert all(code != 0 for code in codes), (codes, stderr[-4000:])
    assert elapsed < 120, elapsed
    assert "FASTTRAIN_TEST_DIE_RANK: rank 1 exits with status 1 at training step 3" in stderr
    assert "exitcode  : 1" in stderr  # torchrun's failure report names the dead worker's exit status
    if nodes == 2:
        assert "error: rank 0 of 2: a collective operation failed" in stderr
    assert not (run / "summary.json").exists() and not (run / "last.pt").exists()


def test_an_error_every_rank_hits_is_printed_once_and_the_exit_codes_stay(cifar_dir, tmp_path):
    """A config error both ranks hit at the same moment (train.sync_bn on the CPU, refused right after the process
    group started; before, each rank printed it): one `error:` line, local rank 0's, as a plain run prints it. The
    other rank stays quiet until torchrun stops it. Exit codes as before: the failed worker's 2 in torchrun's
    report, torchrun's own 1."""
    proc = torchrun(["-m", "fasttrain", "--config", SMOKE, *TINY, "--output.dir", str(tmp_path / "run"), "--device",
                     "cpu", "--train.sync_bn", "true"], cifar_dir, cwd=tmp_path, check=False, timeout=120)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: train.sync_bn needs CUDA GPUs (PyTorch's SyncBatchNorm runs on GPUs only): pass "
                      "--train.sync_bn false for a CPU run"], proc.stderr[-4000:]
    assert proc.returncode == 1 and "exitcode  : 2 " in proc.stderr.split("Root Cause")[-1], proc.stderr[-4000:]


@contextlib.contextmanager
def agent_stops_the_waiting_rank():
    """torchrun's agent, which SIGTERMs every worker once one exits: the signal comes while the quiet rank waits
    (once its wait has set a handler; never before, which would end pytest). Yields a list that holds True once
    the signal was sent: a rank that exits without waiting sets no handler and is never signalled."""
    before, done, sent = signal.getsignal(signal.SIGTERM), threading.Event(), []

    def stop():
        while not done.wait(0.01):
            if signal.getsignal(signal.SIGTERM) is not before:
                sent.append(True)
                os.kill(os.getpid(), signal.SIGTERM)
                return

    thread = threading.Thread(target=stop, daemon=True)
    thread.start()
    try:
        yield sent
    finally:
        done.set()
        thread.join()


def test_a_quiet_rank_waits_for_torchrun_to_stop_it_and_else_prints_the_error(rank_of_a_torchrun_job, monkeypatch,
                                                                             capsys):
    """An error every rank hits (a config value out of range): local rank 0 prints it; rank 1 waits for the agent's
    SIGTERM (local rank 0 has printed and exited) and exits 2 without a line; where none comes within the wait,
    it prints the error itself, naming its rank, so no error goes unprinted."""
    from fasttrain import cli, distributed

    bad = ["--config", SMOKE, "--optim.lr", "-1"]
    line = "optim.lr = -1.0 is out of range: must be > 0 and at most 3.4e38 (float32's largest)\n"
    rank_of_a_torchrun_job(0)
    assert cli.main(bad) == 2 and capsys.readouterr().err == "error: " + line
    rank_of_a_torchrun_job(1)
    monkeypatch.setattr(distributed, "QUIET_RANK_WAIT_S", 60.0)
    t0 = time.monotonic()
    with agent_stops_the_waiting_rank() as sent:
        assert cli.main(bad) == 2
    assert sent == [True] and capsys.readouterr().err == "" and time.monotonic() - t0 < 30
    monkeypatch.setattr(distributed, "QUIET_RANK_WAIT_S", 0.2)
    assert cli.main(bad) == 2 and capsys.readouterr().err == "error: rank 1 of 2: " + line


def test_a_usage_error_is_printed_once_per_node_as_an_error_every_rank_hits(rank_of_a_torchrun_job, monkeypatch,
                                                                           capsys):
    """argparse's usage error (an option given twice) comes from the command line every rank has: local rank 0
    prints it as in one process (usage, then the error; exit 2); the other rank waits quietly for the agent to stop
    it, as report_error's quiet rank does (before, each rank printed both lines)."""
    from fasttrain import cli, distributed

    twice = ["--config", SMOKE, "--config", SMOKE]
    rank_of_a_torchrun_job(0)
    with pytest.raises(SystemExit) as exited:
        cli.main(twice)
    err = capsys.readouterr().err
    assert exited.value.code == cli.EXIT_USAGE and err.startswith("usage: python -m fasttrain ")
    assert err.endswith("\npython -m fasttrain: error: --config is given twice: keep one\n"), err
    rank_of_a_torchrun_job(1)
    monkeypatch.setattr(distributed, "QUIET_RANK_WAIT_S", 60.0)
    with agent_stops_the_waiting_rank() as sent, pytest.raises(SystemExit) as exited:
        cli.main(twice)
    # it waited (the agent's signal found it waiting): a rank exiting at once is never signalled, and passed
    assert sent == [True] and exited.value.code == cli.EXIT_USAGE and capsys.readouterr().err == ""
    monkeypatch.setattr(distributed, "QUIET_RANK_WAIT_S", 0.2)  # no signal within the wait: it prints it itself
    with pytest.raises(SystemExit) as exited:
        cli.main(twice)
    err = capsys.readouterr().err
    assert exited.value.code == cli.EXIT_USAGE and "error: rank 1 of 2: --config is given twice: keep one" in err, err


@pytest.mark.parametrize("failure", ["no_gpu_for_its_local_rank", "out_of_gpu_memory"])
def test_a_ranks_own_error_is_printed_by_it_at_once_naming_it(rank_of_a_torchrun_job, monkeypatch, capsys, failure):
    """A failure one rank can hit alone (its LOCAL_RANK past the node's GPUs; its GPU's memory taken): printed by
    that rank, at once (no wait for the agent), prefixed with its rank so that the ranks' lines can be told apart."""
    from fasttrain import cli, distributed, runtime

    if failure == "no_gpu_for_its_local_rank":
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
        expected = ("LOCAL_RANK 1 has no GPU: this node has 1 visible GPU(s): pass torchrun --nproc_per_node at most "
                    "the number of GPUs per node")
    else:
        def out_of_memory(*args):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        monkeypatch.setattr(runtime, "resolve_device", out_of_memory)
        expected = ("out of GPU memory in `train` (CUDA out of memory. Tried to allocate 2.00 GiB). Another process "
                    "may hold the GPU's memory (nvidia-smi lists them): free it, lower --train.batch_size or "
                    "--train.eval_batch_size, or train with --device cpu.")
    monkeypatch.setattr(distributed, "QUIET_RANK_WAIT_S", 60.0)
    rank_of_a_torchrun_job(1)
    t0 = time.monotonic()
    assert cli.main(["--config", SMOKE, "--device", "cuda"]) == (2 if failure == "no_gpu_for_its_local_rank" else 1)
    assert capsys.readouterr().err == f"error: rank 1 of 2: {expected}\n" and time.monotonic() - t0 < 30


# ------------------------------------------------------------------------------------------------
# The Trainer under torchrun (tests/dist_helper.py)
# ------------------------------------------------------------------------------------------------
def test_ranks_stay_identical_and_resume_is_exact(cifar_dir, tmp_path):
    """2 epochs straight == 1 epoch, stop, resume on 2 processes: same weights (bitwise), on both ranks.

    Dropout is on: its masks differ per rank (per-rank seeds) while the weights stay identical.
    """
    drop = ["--model.dropout", "0.2"]
    a0, a1 = helper(cifar_dir, tmp_path, tmp_path / "dump_a", "--output.dir", str(tmp_path / "a"), *drop)
    assert_same_state(a0["state"], a1["state"])  # parameters and BN statistics, bit for bit
    assert not torch.equal(a0["rng_probe"], a1["rng_probe"])  # per-rank randomness
    assert {p.name for p in (tmp_path / "a").iterdir()} == RUN_FILES
    assert a1["writes"] == []  # rank 0 alone writes the run folder
    assert a0["writes"] == ["metrics.jsonl", "last.pt"] * 2 + ["summary.json"]
    # uneven evaluation shards (100 and 101 images, 2 and 3 batches): exact counts, = one process
    assert (a0["test_shard"], a1["test_shard"]) == (100, 101)
    assert (a0["test_batches"], a1["test_batches"]) == (2, 3)
    assert a0["dist_acc"] == a1["dist_acc"] == a0["full_acc"] == a0["final_test_acc"]

    helper(cifar_dir, tmp_path, tmp_path / "dump_b1", "--output.dir", str(tmp_path / "b"), "--stop-after", "1",
           *drop)
    b0, b1 = helper(cifar_dir, tmp_path, tmp_path / "dump_b2", "--output.dir", str(tmp_path / "b"),
                    "--resume", str(tmp_path / "b" / "last.pt"), *drop)
    assert_same_state(a0["state"], b0["state"])
    assert_same_state(b0["state"], b1["state"])
    assert torch.equal(a1["rng_probe"], b1["rng_probe"])  # the per-rank stream resumes too
    rows = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["epoch"] for r in rows] == [1, 2]

# ------------------------------------------------------------------------------------------------
# SIGTERM/SIGINT under torchrun: the ranks agree on the stop every STOP_AGREEMENT_EVERY steps
# ------------------------------------------------------------------------------------------------
# one epoch of 48 steps per rank (1536 images, 2 ranks x 16), long enough for a stop inside it; dropout
# on, so an exact resume needs each rank's own RNG state
LONG = tiny(**{"data.train_subset": "1536", "train.batch_size": "16", "train.epochs": "1"}) + ["--model.dropout", "0.2"]
LONG_STEPS = 48


class WarningsSeen(RunConsole):
    def __init__(self):
        super().__init__(progress=False, enabled=False)
        self.seen: list[str] = []

    def warn(self, message: str) -> None:
        self.seen.append(message)


@pytest.fixture(scope="module")
def straight_long(cifar_dir, tmp_path_factory) -> Path:
    """The uninterrupted 2-rank run of LONG (run folder + rank dumps) that stopped runs must reproduce."""
    root = tmp_path_factory.mktemp("straight_long")
    helper(cifar_dir, root, root / "dump", "--output.dir", str(root / "run"), config=LONG)
    return root


def test_sigterm_on_one_rank_stops_every_rank_at_the_same_step_and_resumes_exactly(cifar_dir, tmp_path,
                                                                                  straight_long):
    """Only rank 1 gets SIGTERM, right after step 5: the ranks agree at step 32 (the reduction launched
    after step 16 carries the request, and is read 16 steps later), rank 0 included; the exact
    position and each rank's RNG are saved, rank 0 alone announces it, and the resumed run ends
    bit for bit where the straight one does, per-rank random streams included."""
    k = STOP_AGREEMENT_EVERY
    signal_at = 5
    expected = (signal_at // k + 1) * k + k  # the next multiple of k carries it; read k steps later
    assert signal_at < expected <= signal_at + 2 * k and expected < LONG_STEPS
    run = tmp_path / "run"
    proc = torchrun([str(HELPER), "--dump", str(tmp_path / "stop"), "--config", SMOKE, *LONG, "--output.dir",
                     str(run), "--sigterm-after", str(signal_at), "--sigterm-rank", "1"], cifar_dir, cwd=tmp_path,
                    check=False)
    assert proc.returncode != 0 and "exitcode  : 143" in proc.stderr, proc.stderr[-4000:]  # torchrun: 1
    stops = [torch.load(tmp_path / "stop" / f"rank{r}.pt", weights_only=True)["stop"] for r in range(2)]
    assert [s["steps"] for s in stops] == [list(range(1, expected + 1))] * 2  # the same steps on both ranks
    assert [s["exit_code"] for s in stops] == [143, 143]
    assert [s["announce"] for s in stops] == [True, False]  # one resume message, from rank 0
    assert f"stopped by SIGTERM at epoch 1, step {expected}/{LONG_STEPS}" in stops[0]["message"]
    assert "torchrun --standalone --nproc_per_node=2 -m fasttrain" in stops[0]["message"]
    saved = load_checkpoint(run / "last.pt")
    assert (saved["epoch"], saved["step_in_epoch"], saved["world_size"]) == (0, expected, 2)
    assert len(saved["rng_per_rank"]) == 2
    # one process at batch 32 (the same 48 steps) may resume it, but is told it is not exact
    one = load_config(SMOKE, tiny(**{"data.train_subset": "1536", "train.batch_size": "32", "train.epochs": "1"})
                      + ["--model.dropout", "0.2", "--data.dir", str(cifar_dir), "--output.dir", str(tmp_path / "one")])
    console = WarningsSeen()
    alone = Trainer(one, device="cpu", resume=run / "last.pt", console=console)
    assert any("resumed on 1" in w and "not an exact continuation (resume on 2 rank(s)" in w for w in console.seen)
    # and its epoch's train_loss is still the mean batch loss of a step: the stopped run's steps had 2 batches each
    step, losses = alone._train_step, []

    def recorded(images, labels):
        loss, logits = step(images, labels)
        losses.append(float(loss))
        return loss, logits

    alone._train_step = recorded
    alone.fit()
    (row,) = [json.loads(r) for r in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == LONG_STEPS - expected
    mean = (saved["epoch_partial"]["loss_sum"] / 2 + sum(losses)) / LONG_STEPS
    assert row["train_loss"] == pytest.approx(mean, rel=1e-5), (row["train_loss"], mean)

    b0, b1 = helper(cifar_dir, tmp_path, tmp_path / "resumed", "--output.dir", str(run),
                    "--resume", str(run / "last.pt"), config=LONG)
    a0, a1 = (torch.load(straight_long / "dump" / f"rank{r}.pt", weights_only=True) for r in range(2))
    assert_same_state(a0["state"], b0["state"])
    assert_same_state(a1["state"], b1["state"])
    assert torch.equal(a0["rng_probe"], b0["rng_probe"]) and torch.equal(a1["rng_probe"], b1["rng_probe"])
    rows = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()]
    straight = [json.loads(r) for r in (straight_long / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["train_steps"]) for r in rows] == [(1, LONG_STEPS)]  # the whole epoch: the stopped
    # run's sums came with its checkpoint (summed over ranks in another order: equal to float rounding)
    for key in ("train_loss", "train_acc", "test_acc"):
        assert rows[0][key] == pytest.approx(straight[0][key], rel=1e-6), key


def wait_for_file(proc, path: Path, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.is_file():
        assert proc.poll() is None, f"torchrun ended (exit {proc.returncode}) before {path} appeared"
        assert time.monotonic() < deadline, f"{path} did not appear in {timeout} s"
        time.sleep(0.02)


def sigterm_torchrun_mid_epoch(cifar_dir, tmp_path, run: Path, every_process: bool) -> tuple[int, str]:
    """torchrun -m fasttrain (LONG, steps slowed by 100 ms), SIGTERM half a second (a few steps) into the
    epoch (it must come before step STOP_AGREEMENT_EVERY: 30 ms steps left ~0.2 s for the test's own delays, which
    a loaded 2-core machine can exceed; 100 ms steps leave ~1 s); every_process: to the agent and to both workers
    at once (a Slurm or systemd stop), else to the agent alone (Ctrl-C, a container stop), which forwards it. Returns torchrun's exit code and output."""
    log = tmp_path / "torchrun.log"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", str(free_port()),
           "-m", "fasttrain", "--config", SMOKE, *LONG, "--output.dir", str(run), "--device", "cpu"]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path,
                                env=worker_env(cifar_dir, FASTTRAIN_TEST_STEP_SLEEP="0.1"))
    try:
        wait_for_file(proc, run / "config.yaml")  # rank 0 writes it as training starts
        time.sleep(0.5)
        workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
        assert len(workers) == 2, workers
        for pid in [proc.pid] + ([int(w) for w in workers] if every_process else []):
            os.kill(pid, signal.SIGTERM)
        code = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    return code, log.read_text()


def test_sigterm_to_torchrun_mid_epoch_saves_the_position_and_rank0_prints_the_resume_command(
        cifar_dir, tmp_path, straight_long):
    """The reviewer's case with epochs longer than torchrun's 30 s grace: the stop must not wait for the
    epoch's end. torchrun forwards SIGTERM; the ranks stop within 2 x STOP_AGREEMENT_EVERY steps, save
    the mid-epoch position, rank 0 alone prints the command, whose resumed run matches the straight one.
    torchrun itself exits 1 (it re-raises the signal it got as SignalException, whatever the workers'
    status), its workers 143."""
    run = tmp_path / "run"
    code, out = sigterm_torchrun_mid_epoch(cifar_dir, tmp_path, run, every_process=False)
    assert code == 1 and "SignalException" in out, out[-4000:]
    assert out.count("stopped by SIGTERM at epoch 1, step ") == 1 and out.count("resume with:") == 1, out[-4000:]
    saved = load_checkpoint(run / "last.pt")
    assert saved["epoch"] == 0 and 0 < saved["step_in_epoch"] < LONG_STEPS, saved["step_in_epoch"]
    assert saved["step_in_epoch"] % STOP_AGREEMENT_EVERY == 0  # an agreement point

    line = next(s for s in out.splitlines() if "--resume" in s and "auto" not in s)
    command = shlex.split(line)
    assert command[:3] == ["torchrun", "--standalone", "--nproc_per_node=2"] and command[-1] == str(run / "last.pt")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", *command[1:], "--device", "cpu"],
                          capture_output=True, text=True, cwd=tmp_path, env=worker_env(cifar_dir), timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    straight = load_checkpoint(straight_long / "run" / "last.pt")
    assert_same_state(straight["model"], load_checkpoint(run / "last.pt")["model"])


def test_sigterm_to_every_process_of_a_torchrun_job_still_saves_mid_epoch(cifar_dir, tmp_path):
    """A scheduler that signals every process (Slurm, systemd) makes each worker get SIGTERM twice: its
    own and torchrun's forwarded copy a moment later. The copy is not a second signal ("quit now"):
    the workers still stop together, save and announce once."""
    run = tmp_path / "run"
    code, out = sigterm_torchrun_mid_epoch(cifar_dir, tmp_path, run, every_process=True)
    assert code == 1, out[-4000:]
    assert out.count("stopped by SIGTERM at epoch 1, step ") == 1, out[-4000:]
    saved = load_checkpoint(run / "last.pt")
    assert saved["epoch"] == 0 and 0 < saved["step_in_epoch"] < LONG_STEPS, saved["step_in_epoch"]


def test_the_launchers_copy_of_a_signal_is_not_a_second_signal():
    """StopRequest(repeat_window_s): a repeat within the window is ignored; a later one quits at once
    (here Python's SIGINT handler: KeyboardInterrupt), as a second signal always does."""
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        stop = StopRequest(repeat_window_s=0.5)
        with stop.installed():
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)  # torchrun's forwarded copy
            time.sleep(0.05)
            assert stop.requested and stop.signum == signal.SIGINT
            time.sleep(0.5)
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(1)  # the handler runs at the next bytecode; never reached
    finally:
        signal.signal(signal.SIGINT, inherited)


@pytest.mark.gpu
def test_stop_agreement_on_a_gpu_reads_k_steps_later_without_draining_the_queue():
    """The CUDA path of StopAgreement (pinned copy + event) on a 1-rank NCCL group (DistInfo says 2
    ranks, so the torchrun path runs): the request made after step 6 is carried by the reduction after
    step 8 and read after step 12; the host's wait leaves the last k steps of GPU work queued."""
    import torch.distributed as tdist

    assert torch.cuda.is_available(), "a gpu-marked test: run it where CUDA is (-m gpu)"
    dev = torch.device("cuda", 0)
    torch.cuda.set_device(dev)
    torch.cuda._sleep(1_000_000)  # calibrate a "step" of ~10 ms of GPU time
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    torch.cuda._sleep(10_000_000)
    torch.cuda.synchronize()
    step_cycles = int(10_000_000 * 0.010 / (time.perf_counter() - t0))
    tdist.init_process_group("nccl", store=tdist.HashStore(), rank=0, world_size=1)
    try:
        stop, k = StopRequest(), 4
        agreement = StopAgreement(stop, DistInfo(rank=0, world_size=2), dev, every=k)
        stopped_after = None
        for step in range(1, 41):
            torch.cuda._sleep(step_cycles)
            if step == 6:
                stop.request(signal.SIGTERM)
            if agreement.after_step(step):
                stopped_after = step
                break
        # ~k x 10 ms still queued when the host decided: no drain. Asked of the stream, not timed: the
        # calibration's "10 ms" shrinks when other processes share the GPU (the search stage's runs)
        queued = not torch.cuda.current_stream().query()
        torch.cuda.synchronize()
    finally:
        tdist.destroy_process_group()
    assert stopped_after == 12
    assert queued


def test_torchrun_with_compile_and_the_fused_step(cifar_dir, tmp_path):
    """DDP with torch.compile (dynamo splits the graph at DDP's buckets) and the fused Lookahead-SGD
    stepping after the all-reduce: the run compiles off the clock, trains and writes its results.
    (About a minute on 2 cores: Inductor's C++ build for the CPU.)"""
    run = tmp_path / "run"
    proc = torchrun(["-m", "fasttrain", "--config", SMOKE, *TINY, "--optim.impl", "fused", "--train.compile", "true",
                     "--output.dir", str(run), "--device", "cpu"], cifar_dir, cwd=tmp_path, timeout=600)
    assert proc.stdout.count("compile + autotune warmup") == 1  # rank 0 reports the warmup
    assert proc.stdout.count("warming up (compile + autotune) on throwaway steps") == 1  # and announces it
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and all(r["train_steps"] == 8 for r in rows)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["compile_seconds"] > 0
    # the saved weights are the ones trained and evaluated (eager here, compiled there: a near-tie may flip)
    alone = evaluate_checkpoint(run / "last.pt", device="cpu", data_dir=str(cifar_dir))
    assert abs(alone["test_acc"] - summary["final_test_acc"]) <= 1.0



@pytest.mark.parametrize("optimizer", [[], ["--optim.name", "muon"]], ids=["sgd", "muon"])
def test_two_ranks_match_one_process_with_the_same_global_batch(cifar_dir, tmp_path, optimizer):
    """2 ranks x 32 == 1 process x 64 (GroupNorm: no per-rank batch statistics), up to float rounding:
    the ranks' shards of a step are together the one-process batch, and DDP averages the gradients (with
    Muon too, whose orthogonalized step each rank computes from the averaged gradients).

    Rounding differences (different reduction order) grow during training at lr 0.2, so the check is
    relative to how far the weights moved: measured ~4e-4 after these 8 steps, where a real mismatch
    (other samples, summed instead of averaged gradients, a skipped step) gives 0.1 or more.
    """
    one_epoch = {"train.epochs": "1", **({"optim.lookahead_k": "0"} if optimizer else {})}
    (one,) = helper(cifar_dir, tmp_path, tmp_path / "dump_1", "--output.dir", str(tmp_path / "one"),
                    "--groupnorm", *optimizer, ranks=1, config=tiny(**one_epoch, **{"train.batch_size": "64"}))
    two0, two1 = helper(cifar_dir, tmp_path, tmp_path / "dump_2", "--output.dir", str(tmp_path / "two"),
                        "--groupnorm", *optimizer, config=tiny(**one_epoch))
    assert one["train_batches"] == two0["train_batches"] == 8
    for run in ("one", "two"):
        assert load_config(tmp_path / run / "config.yaml", []).optim.name == ("muon" if optimizer else "sgd")
    assert_same_state(two0["state"], two1["state"])
    assert_same_state(one["initial"], two0["initial"])
    keys = [k for k, v in one["state"].items() if v.is_floating_point()]

    def flat(state):
        return torch.cat([state[k].flatten() for k in keys])

    moved = (flat(one["state"]) - flat(one["initial"])).norm()
    apart = (flat(one["state"]) - flat(two0["state"])).norm()
    # Muon's Newton-Schulz amplifies rounding (each iteration multiplies a bank's weak directions by up to 3.4):
    # one process on 1 thread against 2 threads (another summation order, nothing else) ended 3.8e-2 apart after
    # these 8 steps, and one with the alternating flip (other samples) 0.63 (SGD: 1.9e-3 and 0.17; measured
    # 2026-11-28 with tests/dist_helper.py, one process, this config)
    tolerance = 0.1 if optimizer else 1e-2
    assert moved > 0.1 and apart / moved < tolerance, (float(apart), float(moved))
    # the logged epoch means are over all ranks' images: the loss per batch and the accuracy alike
    (row_one,), (row_two,) = ([json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
                              for name in ("one", "two"))
    # measured apart: loss 3e-7 (SGD) and 3e-6 (Muon) relative, accuracy 0 and 0.2 points (one image of 512);
    # rank 0's own sums times the world size (no all-reduce) are 3e-4 and 3e-3 apart in loss
    assert row_two["train_loss"] == pytest.approx(row_one["train_loss"], rel=1e-4)
    assert row_two["train_acc"] == pytest.approx(row_one["train_acc"], abs=0.45)  # 512 images: two may flip


# ------------------------------------------------------------------------------------------------
# In-process checks (no launch)
# ------------------------------------------------------------------------------------------------
def id_images(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Images whose pixels spell their own index (R = i // 256, G = i % 256)."""
    x = np.zeros((n, 32, 32, 3), dtype=np.uint8)
    idx = np.arange(n)
    x[..., 0] = (idx // 256)[:, None, None]
    x[..., 1] = (idx % 256)[:, None, None]
    return x, idx.astype(np.int64)


def loader_ids(loader, epoch: int) -> list[int]:
    loader.set_epoch(epoch)
    ids = []
    for images, labels in loader:
        pixel = (images[:, :2, 0, 0].float() * 255).round().long()  # mean 0, std 1: x = pixel / 255
        from_pixels = (pixel[:, 0] * 256 + pixel[:, 1]).tolist()
        assert from_pixels == labels.tolist()
        ids += from_pixels
    return ids


def make_loaders(cls, n: int, world: int, train: bool, batch: int, **kw):
    x, y = id_images(n)
    return [cls(x, y, batch_size=batch, train=train, device="cpu", dtype=torch.float32, mean=[0, 0, 0],
                std=[1, 1, 1], channels_last=True, crop_padding=0, flip=False, seed=3, rank=r, world_size=world, **kw)
            for r in range(world)]


def check_shards(cls, **kw) -> None:
    n = 1001
    (single,) = make_loaders(cls, n, 1, True, 32, **kw)
    r0, r1 = make_loaders(cls, n, 2, True, 16, **kw)
    for epoch in (0, 1):
        alone, a, b = loader_ids(single, epoch), loader_ids(r0, epoch), loader_ids(r1, epoch)
        assert len(a) == len(b) == 496  # 500 per rank, whole batches of 16: both ranks step together
        assert not set(a) & set(b)  # disjoint
        # slices of one shared permutation: step k of the two ranks is step k of one process at 2x batch
        assert a == alone[0:992:2] and b == alone[1:992:2]
    assert loader_ids(r0, 0) != loader_ids(r0, 1)  # a fresh shuffle per epoch
    e0, e1 = make_loaders(cls, n, 2, False, 64, **kw)
    ids0, ids1 = loader_ids(e0, 0), loader_ids(e1, 0)
    assert ids0 == list(range(500)) and ids1 == list(range(500, 1001))  # contiguous, in order, once


def test_torch_loader_shards_are_disjoint_slices_of_one_permutation():
    check_shards(TorchLoader)


@pytest.mark.dali
def test_dali_loader_shards_are_disjoint_slices_of_one_permutation():
    from fasttrain.data.dali import DaliLoader, dali_available

    # the README's test command installs the dali extra: without it this fails (tests/test_dali.py's rule)
    assert dali_available(), "nvidia-dali is missing: pip install 'fasttrain-resnet[dali]'"
    check_shards(DaliLoader, num_threads=1)


def test_rank_seeds_differ_per_rank_and_epoch():
    seeds = {rank_seed(0, epoch, rank) for epoch in range(3) for rank in range(4)}
    assert len(seeds) == 12 and all(0 <= s < 2**63 for s in seeds)
    # the same in another process (as on every rank, and after a restart): no per-process salt such as hash()
    other = subprocess.run([sys.executable, "-c", "from fasttrain.distributed import rank_seed; print(rank_seed(5, 1, 2))"],
                           capture_output=True, text=True, check=True, env=dict(os.environ, PYTHONHASHSEED="random"))
    assert int(other.stdout) == rank_seed(5, 1, 2)


def test_sync_bn_on_cpu_is_a_clear_error(cifar_dir, tmp_path):
    cfg = load_config(SMOKE, TINY + ["--train.sync_bn", "true", "--data.dir", str(cifar_dir),
                                     "--output.dir", str(tmp_path)])
    with pytest.raises(ConfigError, match="sync_bn needs CUDA"):
        Trainer(cfg, device="cpu", dist_info=DistInfo(rank=0, world_size=2), console=RunConsole(False, False))


@pytest.mark.parametrize("raw, expected", [(None, 300.0), ("42.5", 42.5), ("0", None), ("-1", None),
                                           ("soon", None)])
def test_the_collective_timeout_comes_from_the_environment_and_must_be_positive(monkeypatch, raw, expected):
    from fasttrain import distributed

    if raw is None:
        monkeypatch.delenv(distributed.TIMEOUT_ENV, raising=False)
    else:
        monkeypatch.setenv(distributed.TIMEOUT_ENV, raw)
    if expected is None:  # 0 would make every collective time out at once
        with pytest.raises(ConfigError, match=r"FASTTRAIN_DIST_TIMEOUT=.*in seconds \(> 0\)"):
            distributed._timeout_s()
    else:
        assert distributed._timeout_s() == expected


def test_reductions_use_their_operation_and_a_failing_run_leaves_the_group_alone(monkeypatch):
    """all_reduce_min finds the first bad step over the ranks (MAX would hide one rank's divergence);
    shutdown on the way out of an exception does not wait on peers that may be gone; on success it leaves
    the group."""
    from fasttrain import distributed

    ops, destroyed = [], []
    monkeypatch.setattr(distributed.dist, "all_reduce", lambda tensor, op: ops.append(op))
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(distributed.dist, "destroy_process_group", lambda: destroyed.append(1))
    two = DistInfo(rank=0, world_size=2)
    distributed.all_reduce_min(torch.zeros(2), two)
    distributed.all_reduce_sum(torch.zeros(2), two)
    assert ops == [torch.distributed.ReduceOp.MIN, torch.distributed.ReduceOp.SUM]
    try:
        raise RuntimeError("a peer died")
    except RuntimeError:
        distributed.shutdown(two)
    assert destroyed == []
    distributed.shutdown(two)  # a run that ended normally
    assert destroyed == [1]
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    distributed.shutdown(two)  # no group to leave (it was never joined, or already left)
    assert destroyed == [1]


# exit_process in a process that joined a group (sys.argv[1] "joined") or not: a non-daemon thread still at work,
# an idle ThreadPoolExecutor worker (as torch.compile's compile pool leaves one), an atexit callback, stdout a pipe
# with a line not yet flushed, and an object whose teardown prints
EXIT_PROCESS = """
import atexit, sys, threading, time
from concurrent.futures import ThreadPoolExecutor
from fasttrain import distributed

pool = ThreadPoolExecutor(1)
pool.submit(print, "pool ran", flush=True).result()  # its worker now waits on the pool's queue

class Teardown:
    def __del__(self):
        print("teardown", flush=True)

kept = Teardown()
threading.Thread(target=lambda: (time.sleep(0.3), print("thread done", flush=True))).start()
atexit.register(lambda: print("atexit", flush=True))
print("unflushed", end="")
distributed._joined_group = sys.argv[1] == "joined"
distributed.exit_process(3)
"""


@pytest.mark.parametrize("joined", [True, False])
def test_exit_process_skips_only_the_teardown_of_objects_in_a_process_that_joined_a_group(tmp_path, joined):
    """A rank that joined a group ends by os._exit: its non-daemon threads finish and its atexit callbacks run
    first (an idle ThreadPoolExecutor's worker is woken, as Python's exit wakes it, not waited for forever), what it
    printed reaches the pipe, its exit status is the code; only the teardown of its objects (where a group's native
    thread still waiting for the GIL aborts the process) never comes. A process that joined none exits as Python
    does, teardown included."""
    proc = subprocess.run([sys.executable, "-c", EXIT_PROCESS, "joined" if joined else "alone"], capture_output=True,
                          text=True, cwd=tmp_path, env=worker_env(tmp_path), timeout=60)
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout == "pool ran\nunflushedthread done\natexit\n" + ("" if joined else "teardown\n"), proc.stdout


# The teardown abort on demand (sys.argv[1]: how rank 0 ends, "exit_process" or "sys.exit"). Rank 0 leaves an
# all-reduce of a tensor made in Python to gloo's worker thread and exits; its last atexit callback holds the GIL
# (a switch interval of 1000 s: a waiting thread never asks for it) while rank 1 joins the all-reduce, so the worker
# thread, freeing the finished work, waits for the GIL (TensorImpl::decref_pyobject) until Python is finalizing.
# The CI's flake, where the thread came a moment late by chance, made certain.
LATE_WORK = """
import atexit, sys, time
from pathlib import Path
import torch, torch.distributed as dist
from fasttrain import distributed

info = distributed.init_distributed("cpu")
kept = torch.ones(4)
exiting = Path("rank0-exits")
if info.rank == 1:
    while not exiting.exists():
        time.sleep(0.01)
    dist.all_reduce(kept)
    time.sleep(1.0)
    distributed.exit_process(0)


class SlowTeardown:
    def __del__(self):  # Python's teardown of __main__: the GIL passes to a waiting thread in the sleep
        time.sleep(1.0)


def hold_the_gil():
    exiting.touch()
    sys.setswitchinterval(1000.0)
    end = time.perf_counter() + 2.0
    while time.perf_counter() < end:
        pass


slow = SlowTeardown()
atexit.register(hold_the_gil)
dist.all_reduce(kept, async_op=True)  # the handle dropped: the worker thread frees the work
distributed.exit_process(0) if sys.argv[1] == "exit_process" else sys.exit(0)
"""


@pytest.mark.parametrize("ending", ["exit_process", "sys.exit"])
def test_a_rank_whose_gloo_thread_frees_a_work_during_the_exit_ends_cleanly_by_exit_process(tmp_path, ending):
    """The 2-rank teardown abort (CI, rank 1 SIGABRT "terminate called without an active exception" after a run
    had succeeded), made certain: gloo's worker thread waits for the GIL to free a finished work's tensor until
    Python finalizes, and Python 3.11-3.13 end it by pthread_exit, which aborts the process. exit_process never
    finalizes: rank 0 exits 0. The same rank ending by sys.exit aborts, which shows the case is the CI's (Python
    3.14 parks such a thread instead: there it exits 0 as well)."""
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, "-c", LATE_WORK, ending], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                              env=worker_env(tmp_path, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                                             MASTER_ADDR="127.0.0.1", MASTER_PORT=port))  # reads no data
             for rank in (0, 1)]
    try:
        (_, err0), (_, err1) = (proc.communicate(timeout=120) for proc in procs)
    finally:
        for proc in procs:
            proc.kill()
    assert procs[1].returncode == 0, err1
    if ending == "exit_process" or sys.version_info >= (3, 14):
        assert procs[0].returncode == 0, err0
    else:
        assert procs[0].returncode == -signal.SIGABRT, (procs[0].returncode, err0)
        assert "terminate called without an active exception" in err0, err0


def test_the_first_bad_step_of_an_epoch_is_the_earliest_any_rank_had(monkeypatch):
    """_reduce_epoch_stats on a stand-in rank 0 of 2, its peer's side of each reduction faked: loss and
    correct sums add up, and the first non-finite step is the earliest over the ranks that had one. A rank
    without one (-1) must not win the minimum (the run would go on, and checkpoint, after another rank's
    divergence); -1 comes back only when no rank had one. A rank without one sends inf (this code, there)."""
    from fasttrain import trainer as trainer_module
    from fasttrain.trainer import Trainer

    stand_in = Trainer.__new__(Trainer)
    stand_in.dist = DistInfo(rank=0, world_size=2)
    monkeypatch.setattr(trainer_module, "all_reduce_sum", lambda t, info: t + torch.tensor([1.5, 2.0], dtype=t.dtype))
    for mine, peers, first in ((-1.0, 4.0, 4.0), (3.0, float("inf"), 3.0), (6.0, 2.0, 2.0), (-1.0, float("inf"), -1.0)):
        monkeypatch.setattr(trainer_module, "all_reduce_min",
                            lambda t, info, peer=peers: torch.minimum(t, torch.full_like(t, peer)))
        reduced = stand_in._reduce_epoch_stats(torch.tensor([10.0, 20.0, mine], dtype=torch.float64))
        assert reduced.tolist() == [11.5, 22.0, first], (mine, peers)


def test_only_a_torchrun_rank_reports_a_failed_collective_as_a_peer_failure():
    """One process has no peers: a RuntimeError whose text happens to look like a collective's ("Broken
    pipe", "timed out") is its own error, not "another rank died". Under torchrun it becomes that one-line
    TrainingError, and a TrainingError (its own message, already one line) is kept as it is."""
    from fasttrain.trainer import Trainer, TrainingError

    stand_in = Trainer.__new__(Trainer)
    stand_in.dist = DistInfo()
    with pytest.raises(RuntimeError) as raised, stand_in._peer_failure_guard():
        raise RuntimeError("Broken pipe")
    assert type(raised.value) is RuntimeError
    stand_in.dist = DistInfo(rank=1, world_size=2)
    with pytest.raises(TrainingError, match="^rank 1 of 2: a collective operation failed.*Broken pipe$"):
        with stand_in._peer_failure_guard():
            raise RuntimeError("Broken pipe")
    with pytest.raises(TrainingError, match="^the checkpoint write timed out$"), stand_in._peer_failure_guard():
        raise TrainingError("the checkpoint write timed out")


# ------------------------------------------------------------------------------------------------
# In-process checks of fasttrain/distributed.py's helpers (torch.distributed faked where a group is needed)
# ------------------------------------------------------------------------------------------------
class FakePeers:
    """dist.all_reduce over this rank's tensor and other ranks' values (`peers`), with the op's own
    arithmetic; async_op returns a work whose wait() is recorded. Records (op, this rank's value)."""

    def __init__(self, peers=()):
        self.peers, self.sent, self.waited = list(peers), [], 0

    def __call__(self, tensor, op, async_op=False):
        import torch.distributed as tdist

        self.sent.append((op, int(tensor[0])))
        combine = {tdist.ReduceOp.MAX: max, tdist.ReduceOp.MIN: min, tdist.ReduceOp.SUM: sum}
        combined = next(fn for key, fn in combine.items() if key == op)([int(tensor[0]), *self.peers])
        tensor.fill_(combined)
        if async_op:
            fake = self

            class Work:
                def wait(self):
                    fake.waited += 1
                    return True

            return Work()
        return None


def stop_step(agreement, stop, request_at=None, signum=signal.SIGTERM, steps=40):
    """The step after which the ranks agree to stop (None: never), this rank asking after `request_at`."""
    for step in range(1, steps + 1):
        if step == request_at:
            stop.request(signum)
        if agreement.after_step(step):
            return step
    return None


def test_stop_agreement_on_the_cpu_reads_each_reduction_k_steps_later(monkeypatch):
    """The gloo path of StopAgreement with 3 ranks (the others faked): this rank's request after step 6 rides
    the MAX reduction after step 8, read after step 12, with its own signal; another rank's request is
    adopted with that rank's signal (two ranks' SIGTERMs are SIGTERM, not their sum); now() agrees at once;
    drain() waits for the reduction in flight. One process: the request itself, after any step."""
    from fasttrain import distributed

    three, cpu, k = DistInfo(rank=0, world_size=3), torch.device("cpu"), 4
    peers = FakePeers([0, 0])
    monkeypatch.setattr(distributed.dist, "all_reduce", peers)
    stop = StopRequest()
    assert stop_step(StopAgreement(stop, three, cpu, every=k), stop, request_at=6, signum=signal.SIGINT) == 12
    assert stop.signum == signal.SIGINT and (distributed.dist.ReduceOp.MAX, signal.SIGINT) in peers.sent
    assert {op for op, _ in peers.sent} == {distributed.dist.ReduceOp.MAX} and peers.waited == 2

    peers.peers = [int(signal.SIGINT), int(signal.SIGINT)]  # the others got Ctrl-C before step 4
    stop = StopRequest()
    assert stop_step(StopAgreement(stop, three, cpu, every=k), stop) == 8
    assert stop.requested and stop.signum == signal.SIGINT

    stop = StopRequest()
    assert StopAgreement(stop, three, cpu, every=k).now() and stop.signum == signal.SIGINT
    peers.peers = [0, 0]
    assert not StopAgreement(StopRequest(), three, cpu, every=k).now()

    agreement = StopAgreement(StopRequest(), three, cpu, every=k)
    waited = peers.waited
    assert not agreement.after_step(4)  # launched
    agreement.drain()
    assert peers.waited == waited + 1

    sent = len(peers.sent)
    alone = StopAgreement(StopRequest(), DistInfo(), cpu, every=k)
    assert stop_step(alone, alone.stop, request_at=3) == 3 and len(peers.sent) == sent  # no collective


def test_objects_are_gathered_in_rank_order_and_broadcast_from_rank_0(monkeypatch):
    """Checkpoints hold every rank's RNG state in rank order (a resume gives each rank its own back); the run
    folder and resume path are rank 0's on every rank. One process: no collective."""
    from fasttrain import distributed

    calls, rank = [], 1

    def gather(out, obj):  # the other ranks' values around the one this rank hands in (which must be sent)
        calls.append("gather")
        out[:] = [obj if r == rank else f"rank {r}'s" for r in range(len(out))]

    def broadcast(box, src):  # the source rank's box is sent as it is; every other rank's is filled
        calls.append(("broadcast", src))
        if rank != src:
            box[0] = f"rank {src}'s"

    monkeypatch.setattr(distributed.dist, "all_gather_object", gather)
    monkeypatch.setattr(distributed.dist, "broadcast_object_list", broadcast)
    three = DistInfo(rank=1, world_size=3)
    assert distributed.all_gather_objects("mine", three) == ["rank 0's", "mine", "rank 2's"]
    assert distributed.broadcast_object("mine", three) == "rank 0's"
    rank = 0  # rank 0 sends its own value and keeps it
    assert distributed.broadcast_object("rank 0's own", DistInfo(rank=0, world_size=3)) == "rank 0's own"
    assert calls == ["gather", ("broadcast", 0), ("broadcast", 0)]
    assert distributed.all_gather_objects("mine", DistInfo()) == ["mine"]
    assert distributed.broadcast_object("mine", DistInfo()) == "mine" and len(calls) == 3


def test_init_distributed_joins_the_group_torchrun_describes(monkeypatch):
    """No WORLD_SIZE, or 1: a plain run, no group. Under torchrun: rank, world size and local rank from the
    environment, gloo on the CPU and NCCL bound to the local GPU on CUDA, both with the collective timeout;
    a LOCAL_RANK past the node's GPUs is a ConfigError naming the fix."""
    import datetime

    from fasttrain import distributed

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    joined = []
    monkeypatch.setattr(distributed, "_joined_group", False)  # the joins below are fakes: pytest's process joins none
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda **kwargs: joined.append(kwargs))
    assert distributed.init_distributed("cpu") == DistInfo()
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert distributed.init_distributed("cpu") == DistInfo() and joined == [] and not distributed._joined_group

    monkeypatch.setenv(distributed.TIMEOUT_ENV, "42")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    timeout = datetime.timedelta(seconds=42)
    assert distributed.init_distributed("cpu") == DistInfo(rank=3, world_size=4, local_rank=1)
    assert joined == [{"backend": "gloo", "timeout": timeout}] and distributed._joined_group  # exit_process: os._exit

    joined.clear()
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: joined.append(("set_device", index)))
    assert distributed.init_distributed("cuda") == DistInfo(rank=3, world_size=4, local_rank=1)
    assert joined == [("set_device", 1), {"backend": "nccl", "timeout": timeout, "device_id": torch.device("cuda", 1)}]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ConfigError, match=r"LOCAL_RANK 1 has no GPU: this node has 1 visible GPU\(s\): pass "
                                          r"torchrun --nproc_per_node at most the number of GPUs per node") as refused:
        distributed.init_distributed("cuda")
    assert not refused.value.every_rank  # this rank's own: printed by it (report_error), named by the CLI


@pytest.mark.parametrize("env, message", [
    ({"WORLD_SIZE": "2"}, "WORLD_SIZE=2 is set but RANK is not"),  # a launcher that sets some of them
    ({"WORLD_SIZE": "abc"}, "WORLD_SIZE='abc' is not a whole number"),
    ({"WORLD_SIZE": "2", "RANK": "2"}, "RANK=2 is not below WORLD_SIZE=2"),
    ({"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "-1"}, "LOCAL_RANK=-1 is negative"),
])
def test_an_environment_torchrun_would_not_give_is_one_error_line(tmp_path, env, message):
    """WORLD_SIZE left in a shell, or set without RANK: one line naming the variable and the fix, before
    anything is read (it was a KeyError or ValueError traceback, even from --dry-run)."""
    clean = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = subprocess.run([sys.executable, "-m", "fasttrain", "--config", "configs/smoke.yaml", "--dry-run"],
                          cwd=REPO, env={**clean, **env}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr == f"error: {message}: launch with torchrun (it sets WORLD_SIZE, RANK and LOCAL_RANK), or " \
                          "unset WORLD_SIZE for one process\n", proc.stderr


def test_sync_buffers_gives_every_rank_rank_0s_buffers(monkeypatch):
    """Rank 1's side of the broadcast: rank 0's BN statistics (float) and batch counts (int64), one flat
    tensor per dtype, come back into the right buffers."""
    from fasttrain import distributed

    torch.manual_seed(0)
    rank0, rank1 = (torch.nn.Sequential(torch.nn.BatchNorm2d(3), torch.nn.BatchNorm2d(5)) for _ in range(2))
    for i, bn in enumerate(rank0):
        bn.running_mean.normal_()
        bn.running_var.uniform_(1, 2)
        bn.num_batches_tracked.fill_(7 + i)
    sent = []
    monkeypatch.setattr(distributed.dist, "broadcast", lambda tensor, src: sent.append((src, tensor.clone())))
    distributed.sync_buffers(rank0, DistInfo(rank=0, world_size=2))
    assert [(src, t.dtype) for src, t in sent] == [(0, torch.float32), (0, torch.int64)]
    received = iter(sent)
    monkeypatch.setattr(distributed.dist, "broadcast", lambda tensor, src: tensor.copy_(next(received)[1]))
    distributed.sync_buffers(rank1, DistInfo(rank=1, world_size=2))
    for (name, a), b in zip(rank0.state_dict().items(), rank1.state_dict().values()):
        assert torch.equal(a, b), name


def test_a_peer_failure_is_recognised_and_reported_in_one_line():
    from fasttrain.distributed import is_peer_failure, peer_failure_message

    assert is_peer_failure(torch.distributed.DistError("the store went away"))
    for text in ("[gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:4242",
                 "Connection reset by peer", "ProcessGroupNCCL's watchdog caught collective operation timeout",
                 "ProcessGroupGloo::allreduce failed", "NCCL error in: ../nccl.cpp:1", "Timed out waiting 300000ms",
                 "wait timed out", "Broken pipe"):
        assert is_peer_failure(RuntimeError(text)), text
    assert not is_peer_failure(RuntimeError("CUDA out of memory"))
    assert not is_peer_failure(ValueError("Connection closed by peer"))  # not an error a collective raises
    info = DistInfo(rank=1, world_size=4)
    message = peer_failure_message(RuntimeError("Connection closed by peer\n" + "a long C++ trace\n" * 50), info)
    assert message.startswith("rank 1 of 4: a collective operation failed, most likely because another rank died")
    assert message.endswith("RuntimeError: Connection closed by peer") and "\n" not in message
    assert peer_failure_message(RuntimeError("x" * 5000), info).endswith("RuntimeError: " + "x" * 300)
    assert peer_failure_message(RuntimeError(""), info).endswith("RuntimeError: RuntimeError")


def test_fault_injection_kills_only_the_rank_named(monkeypatch):
    from fasttrain.distributed import DIE_RANK_ENV, DIE_STEP_ENV, fault_injection_step

    monkeypatch.setenv(DIE_RANK_ENV, "1")
    monkeypatch.setenv(DIE_STEP_ENV, "3")
    assert [fault_injection_step(DistInfo(rank=r, world_size=2)) for r in (0, 1)] == [None, 3]
    monkeypatch.delenv(DIE_STEP_ENV)
    assert fault_injection_step(DistInfo(rank=1, world_size=2)) is None
