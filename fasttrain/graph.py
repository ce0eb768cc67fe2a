"""`train.cuda_graph`: the whole training step (forward, loss, backward, clipping, optimizer) as one
CUDA graph, replayed with a single launch.

Why: on an H200 the seed network's step took 10-12.7 ms at batch 128 and ~10.8 ms at batch 512, whatever
the precision or compiler (benchmarks/results/2026-11-26-h200): per-step overhead, not arithmetic, most
likely the host issuing several hundred kernel launches from Python. A replayed graph costs the host a
few microseconds and leaves no gaps between kernels.

What it needs (`graph_problems` lists what a config lacks, before anything is built):
* a CUDA device (elsewhere the trainer warns and trains eagerly). Under torchrun, PyTorch's rules for
  capturing DDP's backward (NCCL >= 2.9.6): DDP is built in a side-stream context (`side_stream`), at
  least 11 eager DDP iterations run before capture (`DDP_WARMUP_ITERS`), every rank captures the same
  step and replays it in lockstep, and capture is thread-local (NCCL's watchdog thread polls events
  meanwhile). Not combined with train.sync_bn;
* `optim.impl: fused`: its learning rate, step counter and Lookahead condition live in device memory (so do
  `optim.name: muon`'s learning rates; it has no Lookahead).
  torch.optim.SGD passes the learning rate to its kernels as a Python float, which a graph would
  freeze at its capture value, and fasttrain's Python Lookahead decides on the host;
* bf16 or fp32: fp16's GradScaler reads its found-inf flag on the host every step;
* a compile mode without CUDA graphs of its own (`default` or `max-autotune-no-cudagraphs`);
* static shapes: the loaders drop the last partial training batch;
* every trainable parameter used by the forward pass: the graph hands each one a gradient (zeros for
  an unused one, which would then take weight decay and momentum where the eager step skips it).

How (PyTorch's whole-network capture recipe, adapted):
* gradients are allocated once and zeroed inside the graph, so their addresses, which the fused
  optimizer keeps in a device table, never change; this object holds them so they are never freed;
* each batch is copied into the graph's static input tensors before its replay;
* the learning-rate schedule and the weight EMA stay in Python, outside the graph: the schedule's
  float reaches the optimizer's device table by an ordinary `fill_` before each replay;
* loss and logits are the graph's static outputs: valid until the next replay;
* before capture, a few eager iterations run on a side stream (lazy initialisation, cuDNN and
  compile autotuning, the optimizer's address table); the state they changed (weights, BN buffers,
  optimizer state, RNG) is restored in place, so the run starts exactly where it was.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch

# torch.compile modes that build CUDA graphs themselves (cudagraph trees): one capture inside another
# is not supported
COMPILE_MODES_WITH_GRAPHS = ("reduce-overhead", "max-autotune")


def graph_problems(cfg, world_size: int, precision: str) -> list[str]:
    """What stops `train.cuda_graph` for a run on a CUDA device, each with its fix (empty: it can be
    used). Not on a CUDA device at all, the trainer switches the graph off with a warning instead, so
    that a config written for GPUs still runs there. `precision` is the resolved one (bf16 | fp16 | fp32)."""
    problems = []
    if world_size > 1 and cfg.train.sync_bn:
        problems.append("it is not combined with train.sync_bn (SyncBatchNorm's collectives inside forward "
                        "and backward are untried under capture): pass --train.sync_bn false")
    if cfg.optim.impl != "fused" and cfg.optim.name != "muon":  # the fused step is SGD's only (config.validate)
        fix = ("--optim.impl fused" if cfg.optim.name == "sgd" else
               f"the fused SGD step (or optim.name muon), and optim.name {cfg.optim.name} has none: pass "
               "--optim.name sgd --optim.impl fused")
        problems.append(f"it needs {fix} (torch.optim takes the learning rate as a Python float, which a captured "
                        "graph would freeze)")
    if precision == "fp16":
        problems.append("it does not work with fp16 (the GradScaler reads a flag on the host every step): "
                        "use --train.precision bf16")
    if cfg.train.compile and cfg.train.compile_mode in COMPILE_MODES_WITH_GRAPHS:
        problems.append(f"train.compile_mode {cfg.train.compile_mode} builds CUDA graphs itself: use "
                        "--train.compile_mode default (or max-autotune-no-cudagraphs)")
    return problems


# PyTorch's CUDA-graph notes: DDP needs at least 11 eager iterations (its bucket rebuild, its
# buffers) before its backward can be captured; a single process needs a few for lazy initialisation
DDP_WARMUP_ITERS = 11
WARMUP_ITERS = 3


@contextlib.contextmanager
def side_stream(device: torch.device, enabled: bool = True) -> Iterator[None]:
    """Run the block on a fresh side stream, ordered after and before the current one (PyTorch's rule
    for constructing DDP when its backward will be captured). `enabled` False: the current stream."""
    if not enabled:
        yield
        return
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        yield
    torch.cuda.current_stream(device).wait_stream(stream)


def _unique(tensors) -> list[torch.Tensor]:
    seen, out = set(), []
    for t in tensors:
        if isinstance(t, torch.Tensor) and id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out


def step_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The tensors a training step changes: parameters, buffers (BN statistics) and optimizer state."""
    opt_state = [v for per_param in optimizer.state.values() for v in per_param.values()]
    return _unique(list(model.parameters()) + list(model.buffers()) + opt_state)


def _require_cuda(t: torch.Tensor) -> None:
    if t.device.type != "cuda":
        raise ValueError(f"CUDA graphs need CUDA tensors, got images on {t.device}")


@torch.no_grad()
def restore(state: list[torch.Tensor], snapshot: list[torch.Tensor]) -> None:
    """Copy a snapshot (clones of `state`) back in place: every address a graph captured stays valid."""
    torch._foreach_copy_(state, snapshot)


class GraphedStep:
    """One captured training step. Call it like the eager step: ``loss, logits = graphed(images, labels)``.

    `body(images, labels) -> (loss, logits)` is the step without zeroing gradients: forward under
    autocast (cache off), loss, backward, clipping, optimizer step. `params` are the trainable
    parameters, `state` the tensors a step changes (restored after the warmup iterations),
    `before_replay()` pushes host-side settings (the learning rate) to the device, outside the graph.
    """

    def __init__(self, body: Callable, *, params: list[torch.Tensor], state: list[torch.Tensor],
                 before_replay: Callable[[], None], images: torch.Tensor, labels: torch.Tensor,
                 warmup_iters: int = WARMUP_ITERS, version: Callable[[], object] = lambda: None,
                 capture_error_mode: str = "global"):
        """`version()`: a token that changes when the tensors the graph addresses are replaced (the
        fused optimizer's build count: load_state_dict re-creates its buffers); a replay after a
        change is refused. `capture_error_mode`: "thread_local" when other threads (DALI's) may
        use CUDA during the capture."""
        _require_cuda(images)
        self.body, self.before_replay, self.version = body, before_replay, version
        device = images.device
        # static inputs with the batch's own layout (channels_last stays channels_last)
        self.images = torch.empty_like(images)
        self.labels = torch.empty_like(labels)
        self.images.copy_(images)
        self.labels.copy_(labels)
        with torch.no_grad():
            for p in params:  # fresh, with p's strides (what the fused optimizer's table expects),
                p.grad = torch.zeros_like(p)  # whatever layout autograd gave an eager step's gradient
        self.grads = [p.grad for p in params]  # held: the graph writes here even if p.grad is reset

        snapshot = [t.detach().clone() for t in state]
        rng = torch.cuda.get_rng_state(device)
        with side_stream(device):  # PyTorch's capture recipe: warm up off the current stream
            for _ in range(warmup_iters):
                self._zeroed_body()
        self._restore(state, snapshot, rng, device)

        self.before_replay()  # the capture must see nothing left to write from the host
        self.graph = torch.cuda.CUDAGraph()
        # a torch.compile'd model recompiling under capture would autotune there: fail clearly instead
        with torch._dynamo.config.patch(error_on_recompile=True), \
                torch.cuda.graph(self.graph, capture_error_mode=capture_error_mode):
            self.loss, self.logits = self._zeroed_body()
        self._restore(state, snapshot, rng, device)  # capture runs nothing; this keeps it exact anyway
        self.captured_version = version()

    def _zeroed_body(self) -> tuple[torch.Tensor, torch.Tensor]:
        torch._foreach_zero_(self.grads)
        loss, logits = self.body(self.images, self.labels)
        return loss.detach(), logits.detach()

    @staticmethod
    def _restore(state, snapshot, rng, device) -> None:
        restore(state, snapshot)
        torch.cuda.set_rng_state(rng, device)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if images.shape != self.images.shape or labels.shape != self.labels.shape:
            raise ValueError(f"a CUDA graph replays fixed shapes: captured images {list(self.images.shape)}, "
                             f"got {list(images.shape)} (the training loader must drop its last partial batch)")
        if self.version() != self.captured_version:
            raise RuntimeError("the optimizer's buffers were re-created (load_state_dict or a new param "
                               "group) after the CUDA graph was captured: capture it again")
        self.before_replay()
        self.images.copy_(images)
        self.labels.copy_(labels)
        self.graph.replay()
        return self.loss, self.logits
