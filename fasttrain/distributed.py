"""torch.distributed set-up for runs launched by torchrun (NCCL on GPUs, gloo on CPU).

A plain `python -m fasttrain` run has no WORLD_SIZE (or WORLD_SIZE=1) and stays single-process:
every helper here is then a no-op. docs/distributed.md describes the semantics (per-rank batch,
learning rate, what only rank 0 does, resume, failure behaviour).

Failure model: torchrun's elastic agent watches its workers (every 0.1 s by default); when one
exits non-zero it stops the others and the job exits non-zero naming the failed rank. Across
nodes, a rank whose peer vanished gets an error from its next collective, or at the latest when
the process-group timeout runs out (`FASTTRAIN_DIST_TIMEOUT`, seconds, default 300); torchrun
also sets TORCH_NCCL_ASYNC_ERROR_HANDLING=1 for its workers, so NCCL tears down the process on
such an error instead of hanging.
"""
from __future__ import annotations

import atexit
import datetime
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, NoReturn

import numpy as np
import torch
import torch.distributed as dist

from fasttrain.config import ConfigError
from fasttrain.ranks import place_in_the_job
from fasttrain.signals import HANDLED, noted

DEFAULT_TIMEOUT_S = 300.0
TIMEOUT_ENV = "FASTTRAIN_DIST_TIMEOUT"
# Test-only fault injection (tests/test_distributed.py): rank DIE_RANK exits with status 1 just
# before global training step DIE_STEP, as a crashed or killed worker would.
DIE_RANK_ENV, DIE_STEP_ENV = "FASTTRAIN_TEST_DIE_RANK", "FASTTRAIN_TEST_DIE_STEP"
# Under torchrun the ranks agree on a stop (SIGTERM/SIGINT) every STOP_AGREEMENT_EVERY training steps
# (StopAgreement), so a stop takes effect at most 2 x 16 = 32 steps after the signal: about 0.3 s at a
# 10 ms GPU step, far inside the 30 s torchrun's agent leaves its workers between its SIGTERM and its
# SIGKILL (a CPU step of up to ~0.5 s still fits, with the checkpoint write). Each agreement costs a
# 4-byte all-reduce and copy, microseconds per 16 steps of milliseconds. Fewer steps would leave
# less work queued behind the event the host waits on (the wait could idle the GPU); more would
# only add latency.
STOP_AGREEMENT_EVERY = 16
# How long a rank that leaves an every-rank error to local rank 0 waits for torchrun's agent to stop it before it
# prints the error itself (report_error). The 2 ranks of a CPU job reached a config error 19-148 ms apart (5
# launches); the agent polls its workers every 0.1 s (--monitor-interval), so the wait normally ends well inside
# a second of local rank 0's exit, and lasts this long only where local rank 0 does not exit (hung, or training
# on: it did not hit the error after all), which it then delays by as much.
QUIET_RANK_WAIT_S = 10.0
AGENT_ENV = "TORCHELASTIC_RUN_ID"  # set by torchrun's agent for its workers, which it stops when one fails
_joined_group = False  # this process joined a process group (init_distributed): exit_process ends it by os._exit


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launch_info() -> DistInfo:
    """This process's place in the job torchrun describes in the environment (DistInfo() for one process),
    without joining its process group."""
    rank, world_size, local_rank = place_in_the_job()
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank)


def _timeout_s() -> float:
    raw = os.environ.get(TIMEOUT_ENV)
    if raw is None:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ConfigError(f"{TIMEOUT_ENV}={raw!r}: give the collective timeout in seconds (> 0)")
    return value


def init_distributed(device_type: str) -> DistInfo:
    """Join the process group torchrun describes in the environment; a no-op for one process.

    The timeout ($FASTTRAIN_DIST_TIMEOUT, else 300 s) bounds how long a collective
    waits for a dead peer, so a rank that dies ends the job with an error instead of a silent hang.
    """
    global _joined_group
    info = launch_info()
    if not info.enabled:
        return info
    local_rank = info.local_rank
    timeout = datetime.timedelta(seconds=_timeout_s())
    if device_type == "cuda":
        visible = torch.cuda.device_count()
        if local_rank >= visible:  # only the ranks past the node's GPUs: local rank 0 has one
            raise ConfigError(
                f"LOCAL_RANK {local_rank} has no GPU: this node has {visible} visible GPU(s): pass torchrun "
                "--nproc_per_node at most the number of GPUs per node", every_rank=False)
        torch.cuda.set_device(local_rank)
    _joined_group = True  # from here on the group's native threads may exist, a half-made group's included
    if not dist.is_initialized():
        if device_type == "cuda":
            # device_id binds the group to this rank's GPU (eager NCCL init, barriers on the right GPU)
            dist.init_process_group(backend="nccl", timeout=timeout,
                                    device_id=torch.device("cuda", local_rank))
        else:
            dist.init_process_group(backend="gloo", timeout=timeout)
    return info


# --------------------------------------------------------------------------------------------
# Collectives (each a no-op for one process). Every rank must call them in the same order.
# --------------------------------------------------------------------------------------------
def all_reduce_sum(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum a tensor over ranks in place (exact for integer counts)."""
    if info.enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_min(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Element-wise minimum over ranks, in place."""
    if info.enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return tensor


def all_gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    """Every rank's value of a small picklable object, in rank order, on every rank."""
    if not info.enabled:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, info: DistInfo) -> Any:
    """Rank 0's value of a small picklable object, on every rank."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@torch.no_grad()
def sync_buffers(module: torch.nn.Module, info: DistInfo) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every rank.

    DDP broadcasts them before each training forward, but every rank then updates them with its
    own batch, so after an epoch they differ slightly between ranks. Syncing before evaluation and
    checkpointing makes every rank evaluate, and rank 0 save, the same model.
    """
    if not info.enabled:
        return
    buffers = [b for b in module.buffers()]
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for b in buffers:
        by_dtype.setdefault(b.dtype, []).append(b)
    for dtype in sorted(by_dtype, key=str):  # the same order on every rank
        group = by_dtype[dtype]
        flat = torch.cat([b.reshape(-1) for b in group])
        dist.broadcast(flat, src=0)
        offset = 0
        for b in group:
            b.copy_(flat[offset:offset + b.numel()].view_as(b))
            offset += b.numel()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def shutdown(info: DistInfo) -> None:
    """Leave the process group at the end of a run (destroy it). While an exception is on its way out
    (this is called from a `finally`), the group is left as is: a graceful destroy may wait on peers
    that are gone, and the process is exiting anyway. The process then ends by exit_process."""
    if not (info.enabled and dist.is_initialized()):
        return
    if sys.exc_info()[0] is not None:
        return
    dist.destroy_process_group()


def exit_process(code: int) -> NoReturn:
    """End the process with exit status `code`, as sys.exit(code) does; in a process that joined a
    process group, without Python's teardown of its objects: non-daemon threads are joined and the
    atexit callbacks run, as in any exit, then stdio is flushed and os._exit(code) ends it.

    Why: the group's native threads (gloo's worker threads; NCCL's watchdog likewise frees finished
    works) free each collective's work after the caller's wait has returned, and a work may hold the
    last C++ reference to a tensor made in Python (a barrier's work keeps the works that were in flight
    when it was issued). Freeing that reference takes the GIL (TensorImpl::decref_pyobject, in the torch
    2.11 and 2.14 builds this project runs). A thread still waiting for the GIL when Python begins to
    finalize (after the atexit callbacks) is ended by pthread_exit as it gets it, and the unwinding
    through a noexcept destructor calls std::terminate: "terminate called without an active exception",
    SIGABRT, after a run that had succeeded (tests/test_distributed.py makes the moment certain: the
    abort every time with sys.exit, none with this). The core dump of such a rank (a 2-rank gloo run on
    2 CPU cores) shows exactly that: ProcessGroupGloo::runLoop -> ~AsyncBarrierWork ->
    ~AsyncAllgatherWork -> decref_pyobject -> PyEval_AcquireThread -> PyThread_exit_thread ->
    std::terminate, while the main thread ran Py_FinalizeEx's garbage collection
    (pytorch/pytorch#117762; Python 3.14 parks such a thread instead of ending it). The threads cannot
    be joined first: destroy_process_group drops the group, but DistributedDataParallel's construction
    leaves references to it that outlive the model, so its worker threads live until the process ends.
    os._exit skips only the teardown of objects, whose memory the operating system takes back anyway;
    the run's files are closed by then.
    """
    if not _joined_group:
        sys.exit(code)
    # what Python's exit does first, in its order: threading's own exit callbacks, then the joins. The callbacks
    # wake idle ThreadPoolExecutor workers (concurrent.futures registers there; torch.compile's compile pool
    # leaves such threads): joined before them, a worker waits on its queue forever, and so does this exit
    # (seen: a 2-rank compiled CPU run that wrote its results and never ended)
    shutdown = getattr(threading, "_shutdown", None)
    if shutdown is not None and threading.current_thread() is threading.main_thread():
        shutdown()
    else:
        main = threading.main_thread()
        for thread in threading.enumerate():
            if thread is not main and not thread.daemon and thread is not threading.current_thread():
                thread.join()
    atexit._run_exitfuncs()  # torch's own callbacks among them; the GIL still passes between threads
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken pipe: nothing more can be said on it
            pass
    os._exit(code)


# --------------------------------------------------------------------------------------------
# Stopping together
# --------------------------------------------------------------------------------------------
class StopAgreement:
    """Whether every rank stops now, on a stop request (fasttrain.signals.StopRequest) that reaches
    the ranks at different moments, or only some of them. The ranks must stop after the same step:
    a rank that trains one step more waits forever in DDP's all-reduce.

    One process: the request itself (a Python bool set by the signal handler), after every step.
    Under torchrun, every `every` steps, with no host sync on the step just queued:
    * at step m (a multiple of `every`) this rank's request (its signal number, 0: none) goes into a
      tiny asynchronous MAX all-reduce; on a GPU the result is copied into pinned host memory
      non_blocking and a CUDA event is recorded behind the copy;
    * at step m + every the host waits for that event (gloo on the CPU: for the work) and reads the
      agreed value. `every` steps of work are queued behind the event by then, so the GPU stays busy
      while the host waits, and every rank reads the same reduction after the same step.
    A stop thus takes effect at most 2 x `every` steps after the signal, on all ranks after the same
    step. Call it between steps: under train.cuda_graph, between replays, never inside a capture.
    """

    def __init__(self, stop, info: DistInfo, device: torch.device, every: int = STOP_AGREEMENT_EVERY):
        self.stop, self.info, self.device, self.every = stop, info, device, every
        self._cuda = device.type == "cuda"
        # one pinned slot is enough: the previous result is read before the next copy is queued
        self._host = torch.zeros(1, dtype=torch.int32, pin_memory=True) if info.enabled and self._cuda else None
        self._pending: tuple[Any, torch.Tensor] | None = None  # (CUDA event or gloo work, result)

    def now(self) -> bool:
        """Agree at once, waiting for the result (at epoch starts, off the training clock)."""
        if not self.info.enabled:
            return self.stop.requested
        flag = self._flag()
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return self._adopt(int(flag.item()))

    def after_step(self, steps_done: int) -> bool:
        """Whether to stop after `steps_done` steps of this loop (the same count on every rank)."""
        if not self.info.enabled:
            return self.stop.requested
        if steps_done % self.every:
            return False
        agreed = self._read() if self._pending is not None else 0
        if agreed:  # no new reduction: every rank stops here, none left in flight
            return self._adopt(agreed)
        self._launch()
        return False

    def drain(self) -> None:
        """End of a loop: wait for the reduction still in flight (every rank has one) and drop it; a
        stop it carries is still requested, and agreed again at the next epoch start."""
        if self._pending is not None:
            self._read()

    def _flag(self) -> torch.Tensor:
        signum = int(self.stop.signum or signal.SIGTERM) if self.stop.requested else 0
        # torch.full is a fill kernel on a GPU: no host-to-device copy, which would wait for the queue
        return torch.full((1,), signum, dtype=torch.int32, device=self.device)

    def _launch(self) -> None:
        flag = self._flag()
        work = dist.all_reduce(flag, op=dist.ReduceOp.MAX, async_op=True)
        if not self._cuda:
            self._pending = (work, flag)
            return
        work.wait()  # NCCL: the current stream waits for the all-reduce, the host does not
        self._host.copy_(flag, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._pending = (event, self._host)

    def _read(self) -> int:
        waitable, result = self._pending
        self._pending = None
        if self._cuda:
            waitable.synchronize()  # the event: the queue behind it keeps running
        else:
            waitable.wait()
        return int(result[0])

    def _adopt(self, signum: int) -> bool:
        """A stop agreed by the ranks is this rank's stop too, with the signal that caused it."""
        if signum and not self.stop.requested:
            self.stop.request(signum)
        return bool(signum)


# --------------------------------------------------------------------------------------------
# Randomness per rank
# --------------------------------------------------------------------------------------------
def rank_seed(seed: int, epoch: int, rank: int) -> int:
    """The seed of rank `rank`'s own randomness (dropout) in `epoch`.

    Initial weights and the data stream come from `seed` alone (the same on every rank); only
    the randomness that should differ between ranks is drawn from this stream. Being a pure
    function of (seed, epoch, rank), it resumes exactly from an epoch-boundary checkpoint; a
    mid-epoch checkpoint holds every rank's generator state instead (Trainer.save_checkpoint).
    """
    # the tag keeps this stream apart from the data loader's SeedSequence([seed, epoch])
    return int(np.random.SeedSequence([seed, epoch, rank, 0xD15]).generate_state(1, np.uint64)[0] >> 1)


# --------------------------------------------------------------------------------------------
# Failure handling
# --------------------------------------------------------------------------------------------
def is_peer_failure(err: BaseException) -> bool:
    """A collective failed because another rank died, hung or closed its connection."""
    if isinstance(err, dist.DistError):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and any(s in text for s in (
        "Connection closed by peer", "Connection reset by peer", "ProcessGroupNCCL", "ProcessGroupGloo",
        "NCCL error", "Timed out", "timed out", "Broken pipe"))


def rank_prefix(info: DistInfo) -> str:
    """What starts a rank's own error message, telling the ranks' lines apart."""
    return f"rank {info.rank} of {info.world_size}: "


def peer_failure_message(err: BaseException, info: DistInfo) -> str:
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return (f"{rank_prefix(info)}a collective operation failed, most likely because "
            f"another rank died or stopped responding (look for the first failure torchrun reports). "
            f"{type(err).__name__}: {first[:300]}")


def report_error(message: str, every_rank: bool) -> None:
    """Print a failed run's one `error: MESSAGE` line to stderr. One process: as it is. Under torchrun, an error
    that every rank hits identically (`every_rank`: the same inputs or agreed state) is printed by each node's
    local rank 0 alone, as it is; one that can be a rank's own by every rank that hits it, prefixed with its rank.

    A quiet rank must not exit first: torchrun's agent stops every worker of the node as soon as one exits
    non-zero, and local rank 0 was seen killed that way before it printed (2 CPU ranks, a config error: the
    other rank was up to 150 ms ahead). So it waits for the agent to stop it, which it does once
    local rank 0 has printed and exited, and exits silently then, with its own exit code. If that does not come
    within QUIET_RANK_WAIT_S (local rank 0 slower still, hung, or training on: it did not hit the error after
    all), or no agent watches the ranks (no TORCHELASTIC_RUN_ID), it prints the error itself, prefixed. (Local
    rank 0 exiting on another failure first also ends the wait: the job's failure is then that one, printed.)"""
    prefix = error_prefix(every_rank)
    if prefix is None:
        return
    # a peer failure's message names its rank already
    print(f"error: {message if message.startswith(prefix) else prefix + message}", file=sys.stderr, flush=True)


def error_prefix(every_rank: bool) -> str | None:
    """How this process prints an error (report_error's rule, also for a usage error): as it is (''), prefixed with
    its rank, or not at all (None: a quiet rank that torchrun's agent stopped, local rank 0 having printed it)."""
    info = launch_info()
    if not info.enabled or (every_rank and info.local_rank == 0):
        return ""
    if every_rank and _stopped_by_the_agent(QUIET_RANK_WAIT_S):
        return None  # local rank 0 printed it and exited, and the agent stopped this rank
    return rank_prefix(info)


def _stopped_by_the_agent(seconds: float) -> bool:
    """Whether torchrun's agent stops this process (SIGTERM; SIGINT and SIGHUP too) within `seconds`; the
    signal ends the wait instead of the process, which then exits with its own exit code. False at once without
    an agent or off the main thread (where no signal handler can be set)."""
    if AGENT_ENV not in os.environ or threading.current_thread() is not threading.main_thread():
        return False
    with noted(*HANDLED) as stopped:
        deadline = time.monotonic() + seconds
        while not stopped and time.monotonic() < deadline:
            time.sleep(0.05)
    return bool(stopped)


def fault_injection_step(info: DistInfo) -> int | None:
    """The global step at which this rank must die (test-only fault injection), or None."""
    rank, step = os.environ.get(DIE_RANK_ENV), os.environ.get(DIE_STEP_ENV)
    if rank is None or step is None or int(rank) != info.rank:
        return None
    return int(step)


def die_now(info: DistInfo, step: int) -> None:
    print(f"{DIE_RANK_ENV}: rank {info.rank} exits with status 1 at training step {step} (fault injection)",
          file=sys.stderr, flush=True)
    os._exit(1)
