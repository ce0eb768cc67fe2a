"""train.cuda_graph (fasttrain/graph.py): what can be checked without a GPU, and, gpu-marked, that a replayed
graph trains exactly like the eager step (run on the GPU machine: pytest -m gpu)."""
import contextlib
import copy
import re

import pytest
import torch

from fasttrain.config import ConfigError
from fasttrain.graph import (DDP_WARMUP_ITERS, WARMUP_ITERS, GraphedStep, graph_problems, restore, side_stream,
                             step_state)
from fasttrain.model import build_model
from fasttrain.optim import build_optimizer
from fasttrain.trainer import Trainer
from fake_cuda_graphs import FakeCudaGraphs
from test_train import quiet, tiny_config

GRAPHABLE = {"optim.impl": "fused", "train.cuda_graph": "true"}


def problems(cifar_dir, tmp_path, world_size=1, precision="fp32", **changes):
    cfg = tiny_config(cifar_dir, tmp_path, **{**GRAPHABLE, **changes})
    return graph_problems(cfg, world_size, precision)


def test_a_graphable_config_has_no_problems(cifar_dir, tmp_path):
    assert problems(cifar_dir, tmp_path) == []
    assert problems(cifar_dir, tmp_path, precision="bf16", **{"train.compile": "true"}) == []
    # a graph-building compile mode only matters when compile is on
    assert problems(cifar_dir, tmp_path, **{"train.compile_mode": "reduce-overhead"}) == []


@pytest.mark.parametrize("kwargs, changes, expected", [
    ({"world_size": 2}, {"train.sync_bn": "true"}, "--train.sync_bn false"),
    ({}, {"optim.impl": "torch"}, "--optim.impl fused"),
    ({"precision": "fp16"}, {}, "--train.precision bf16"),
    ({}, {"train.compile": "true", "train.compile_mode": "reduce-overhead"}, "--train.compile_mode default"),
    ({}, {"train.compile": "true", "train.compile_mode": "max-autotune"}, "--train.compile_mode default"),
])
def test_each_problem_names_its_fix(cifar_dir, tmp_path, kwargs, changes, expected):
    found = problems(cifar_dir, tmp_path, **kwargs, **changes)
    assert len(found) == 1 and expected in found[0], found


def test_the_fused_step_fix_passes_validation_for_adamw_too(cifar_dir, tmp_path):
    """The fix a problem names must be a config that loads: for AdamW, --optim.impl fused alone is refused
    by the config ("the fused step implements SGD only"), whose own fix (optim.impl torch) is the problem."""
    found = problems(cifar_dir, tmp_path, **{"optim.name": "adamw", "optim.impl": "torch"})
    assert len(found) == 1, found
    flags = re.search(r"pass ((?:--\S+ \S+ ?)+)", found[0]).group(1).split()
    changes = {"optim.name": "adamw", **{flag[2:]: value for flag, value in zip(flags[::2], flags[1::2])}}
    assert problems(cifar_dir, tmp_path, **changes) == []


def test_problems_are_all_listed_at_once(cifar_dir, tmp_path):
    found = problems(cifar_dir, tmp_path, world_size=4, precision="fp16", **{"optim.impl": "torch",
                                                                            "train.sync_bn": "true"})
    assert len(found) == 3


def test_torchrun_alone_is_no_problem(cifar_dir, tmp_path):
    """Under DDP the step is captured too (PyTorch's rules: tests/test_distributed.py checks the plumbing)."""
    assert problems(cifar_dir, tmp_path, world_size=8) == []
    assert problems(cifar_dir, tmp_path, world_size=1, **{"train.sync_bn": "true"}) == []  # sync_bn needs DDP


def test_cpu_run_warns_and_trains_eagerly(cifar_dir, tmp_path):
    warnings = []
    console = quiet()
    console.warn = warnings.append
    trainer = Trainer(tiny_config(cifar_dir, tmp_path, **GRAPHABLE, **{"train.epochs": "1"}), device="cpu",
                      console=console)
    assert trainer.use_graph is False and trainer._graph is None
    assert any("train.cuda_graph is off" in w for w in warnings)
    summary = trainer.fit()
    assert summary["epochs"] == 1 and trainer._graph is None


def test_step_state_is_what_a_step_changes(cifar_dir, tmp_path):
    cfg = tiny_config(cifar_dir, tmp_path, **GRAPHABLE)
    model = build_model(cfg.model)
    optimizer = build_optimizer(model.parameters(), cfg.optim)
    state = step_state(model, optimizer)
    ids = {id(t) for t in state}
    assert len(ids) == len(state)  # each tensor once (the shared step counter too)
    for t in list(model.parameters()) + list(model.buffers()):
        assert id(t) in ids
    per_param = next(iter(optimizer.state.values()))
    for key in ("momentum_buffer", "slow_param", "step"):
        assert id(per_param[key]) in ids

    # restoring these tensors in place undoes a real step completely (what the capture warmup relies on)
    before_model = copy.deepcopy(model.state_dict())
    before_optim = copy.deepcopy(optimizer.state_dict())
    snapshot = [t.clone() for t in state]
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    torch.nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()
    assert not torch.equal(next(model.parameters()), before_model[next(iter(before_model))])
    restore(state, snapshot)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before_model[key]), key
    after_optim = optimizer.state_dict()
    for index, per_param in before_optim["state"].items():
        for key, value in per_param.items():
            assert torch.equal(torch.as_tensor(after_optim["state"][index][key]), torch.as_tensor(value)), key


def test_graphed_step_refuses_cpu_tensors():
    with pytest.raises(ValueError, match="CUDA tensors"):
        GraphedStep(lambda x, y: (x, y), params=[], state=[], before_replay=lambda: None,
                    images=torch.zeros(2, 3, 4, 4), labels=torch.zeros(2, dtype=torch.long))


# ------------------------------------------------------------------------------------- the plumbing, faked
def test_graphed_step_leaves_the_rng_as_it_found_it_and_replays_fixed_shapes(monkeypatch):
    """Its warmup steps draw random numbers (dropout) and are undone: the RNG too, so the first real step
    draws what an eager run's would. The host settings (before_replay: the learning rate) are pushed
    before the capture and before every replay; a batch of another shape is refused."""
    FakeCudaGraphs(monkeypatch.setattr)
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def body(images, labels):
        logits = model(torch.nn.functional.dropout(images, 0.5))
        loss = torch.nn.functional.cross_entropy(logits, labels)
        loss.backward()
        opt.step()
        return loss, logits

    pushes = []
    images, labels = torch.randn(8, 4), torch.arange(8) % 3
    rng = torch.get_rng_state()
    weights = model.weight.detach().clone()
    step = GraphedStep(body, params=list(model.parameters()), state=step_state(model, opt),
                       before_replay=lambda: pushes.append(1), images=images, labels=labels)
    assert torch.equal(torch.get_rng_state(), rng) and torch.equal(model.weight, weights)
    for _ in range(3):
        step(images, labels)
    assert len(pushes) == 1 + 3
    with pytest.raises(ValueError, match="fixed shapes"):
        step(images, labels[:1])
    with pytest.raises(ValueError, match="fixed shapes"):  # copy_ would broadcast one image over the batch
        step(images[:1], labels)


def test_graphed_step_warms_up_on_the_batch_and_captures_as_asked(monkeypatch):
    """The warmup steps run on the batch given (a garbage label would be a device-side assert), as many as
    asked: PyTorch's rules want some before any capture and 11 before a DDP backward's. The capture takes
    the error mode asked for (thread_local beside DALI's and NCCL's threads). The static input keeps the
    batch's layout (channels_last), so the captured kernels are those of the eager step."""
    assert WARMUP_ITERS >= 1 and DDP_WARMUP_ITERS >= 11
    fake = FakeCudaGraphs(monkeypatch.setattr)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(3))
    images = torch.randn(4, 3, 6, 6).to(memory_format=torch.channels_last)
    labels = torch.tensor([2, 0, 1, 2])
    model(images)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    seen = []

    def body(x, y):
        seen.append((x.clone(), y.clone()))
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return loss, x

    step = GraphedStep(body, params=list(model.parameters()), state=step_state(model, opt),
                       before_replay=lambda: None, images=images, labels=labels, warmup_iters=5,
                       capture_error_mode="thread_local")
    assert fake.warmups == [5] and fake.capture_modes == ["thread_local"]
    assert len(seen) == 5 + 1 and all(torch.equal(x, images) and torch.equal(y, labels) for x, y in seen)
    assert step.images.stride() == images.stride()


def test_a_recompile_under_capture_fails_clearly(monkeypatch):
    """A torch.compile'd function whose guard fails at the capture would recompile (and autotune) inside it:
    refused with dynamo's RecompileError instead."""
    FakeCudaGraphs(monkeypatch.setattr)
    torch._dynamo.reset()
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    calls = []

    @torch.compile(backend="eager")
    def scaled(x, flag):
        return x * flag

    def body(images, labels):
        calls.append(1)
        logits = model(scaled(images, len(calls) > WARMUP_ITERS))  # a Python value that changes at the capture
        loss = torch.nn.functional.cross_entropy(logits, labels)
        loss.backward()
        opt.step()
        return loss, logits

    try:
        with pytest.raises(torch._dynamo.exc.RecompileError):
            GraphedStep(body, params=list(model.parameters()), state=step_state(model, opt), before_replay=lambda: None,
                        images=torch.randn(8, 4), labels=torch.arange(8) % 3)
    finally:
        torch._dynamo.reset()


def test_side_stream_runs_the_block_after_and_before_the_current_streams_work(monkeypatch):
    """PyTorch's rule for building DDP before a capture: a fresh stream that waits for the current one
    first, and that the current one waits for afterwards. Disabled: the block alone, on the current stream."""
    events = []

    class Stream:
        def __init__(self, name):
            self.name = name

        def wait_stream(self, other):
            events.append(f"{self.name} waits for {other.name}")

    current = Stream("current")

    @contextlib.contextmanager
    def on(stream):
        events.append(f"on {stream.name}")
        yield
        events.append(f"off {stream.name}")

    monkeypatch.setattr(torch.cuda, "Stream", lambda device: Stream("side"))
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: current)
    monkeypatch.setattr(torch.cuda, "stream", on)
    with side_stream(torch.device("cuda", 0)):
        events.append("block")
    assert events == ["side waits for current", "on side", "block", "off side", "current waits for side"]
    events.clear()
    with side_stream(torch.device("cuda", 0), enabled=False):
        events.append("block")
    assert events == ["block"]


def _cpu_trainer(cifar_dir, out, graph: bool, resume=None, **changes):
    cfg = tiny_config(cifar_dir, out, **{"optim.impl": "fused", "optim.lookahead_k": "2",
                                         "optim.warmup_epochs": "0.5", **changes})
    trainer = Trainer(cfg, device="cpu", console=quiet(), resume=resume)
    trainer.use_graph = graph  # a CPU run switches it off: force the graph path onto the fakes
    return trainer


def test_graph_plumbing_trains_like_eager_and_resumes(cifar_dir, tmp_path, monkeypatch):
    fake = FakeCudaGraphs(monkeypatch.setattr)
    eager, graphed = _cpu_trainer(cifar_dir, tmp_path / "e", False), _cpu_trainer(cifar_dir, tmp_path / "g", True)
    eager.fit()
    graphed.fit()
    assert fake.captures == 1 and fake.replays == 2 * graphed.steps_per_epoch  # every real step replayed
    assert fake.warmups == [WARMUP_ITERS] and fake.capture_modes == ["global"]  # one process, no DALI
    for (name, a), b in zip(eager.model.state_dict().items(), graphed.model.state_dict().values()):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5, msg=name)
    es, gs = eager.optimizer.state_dict()["state"], graphed.optimizer.state_dict()["state"]
    for index in es:
        for key in ("momentum_buffer", "slow_param", "step"):
            torch.testing.assert_close(gs[index][key], es[index][key], atol=1e-5, rtol=1e-5)

    first = _cpu_trainer(cifar_dir, tmp_path / "r", True)
    first.fit(stop_after_epochs=1)
    resumed = _cpu_trainer(cifar_dir, tmp_path / "r", True, resume=tmp_path / "r" / "last.pt")
    resumed.fit()
    for a, b in zip(graphed.model.state_dict().values(), resumed.model.state_dict().values()):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)

    graphed.optimizer.load_state_dict(graphed.optimizer.state_dict())  # re-creates its buffers
    with pytest.raises(RuntimeError, match="capture it again"):
        graphed._train_step(*next(iter(graphed.data.train)))


@pytest.mark.dali
def test_graph_plumbing_with_dali_captures_thread_local(cifar_dir, tmp_path, monkeypatch):
    """DALI prefetches on its own threads while the step is captured: the capture must be thread_local
    (a global one would fail on their CUDA calls), and the replayed step trains as the eager one."""
    fake = FakeCudaGraphs(monkeypatch.setattr)
    dali = {"data.loader": "dali"}
    eager = _cpu_trainer(cifar_dir, tmp_path / "e", False, **dali)
    graphed = _cpu_trainer(cifar_dir, tmp_path / "g", True, **dali)
    eager.fit()
    graphed.fit()
    assert fake.capture_modes == ["thread_local"] and fake.warmups == [WARMUP_ITERS]
    assert fake.captures == 1 and fake.replays == 2 * graphed.steps_per_epoch
    for (name, a), b in zip(eager.model.state_dict().items(), graphed.model.state_dict().values()):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5, msg=name)


# ------------------------------------------------------------------------------------- on a GPU
def _trainer(cifar_dir, tmp_path, graph: bool, **changes):
    settings = {"optim.impl": "fused", "train.deterministic": "true", "train.cuda_graph": str(graph).lower(),
                "optim.lookahead_k": "2", "optim.schedule": "cosine", "optim.warmup_epochs": "0.5", **changes}
    return Trainer(tiny_config(cifar_dir, tmp_path / ("graph" if graph else "eager"), **settings), device="cuda",
                   console=quiet())


def _batches(trainer, n):
    trainer.data.train.set_epoch(0)
    out = []
    for images, labels in trainer.data.train:
        out.append((images.clone(), labels.clone()))
        if len(out) == n:
            return out
    raise AssertionError("not enough batches")


@pytest.mark.gpu
@pytest.mark.parametrize("changes, tol", [
    ({"train.precision": "fp32"}, 1e-5),
    ({"train.precision": "bf16", "train.compile": "true", "model.se_impl": "triton"}, 2e-3),
])
def test_replayed_graph_trains_like_the_eager_step(cifar_dir, tmp_path, changes, tol):
    """Same init, same batches, 9 steps: weights, BN statistics and optimizer state agree. The lr
    changes every step (warmup then cosine) and Lookahead syncs every 2nd step, so a learning rate
    or step counter frozen into the graph would show."""
    eager = _trainer(cifar_dir, tmp_path, False, **changes)
    graphed = _trainer(cifar_dir, tmp_path, True, **changes)
    batches = _batches(eager, 9)
    graphed.capture_graph(*batches[0])
    assert graphed._graph is not None
    for a, b in zip(eager.model.state_dict().values(), graphed.model.state_dict().values()):
        assert torch.equal(a, b)  # capture and its warmup iterations left the state as it was
    lrs = []
    for images, labels in batches:
        lrs.append(graphed.schedule.lr)
        le, _ = eager._train_step(images, labels)
        lg, _ = graphed._train_step(images, labels)
        torch.testing.assert_close(lg, le, atol=tol, rtol=tol)
    assert len(set(lrs)) >= len(lrs) - 1  # only warmup's last lr and the cosine's first are equal (the peak)
    for (name, a), b in zip(eager.model.state_dict().items(), graphed.model.state_dict().values()):
        torch.testing.assert_close(b, a, atol=tol, rtol=tol, msg=name)
    es, gs = eager.optimizer.state_dict(), graphed.optimizer.state_dict()
    for k in es["state"]:
        for key in ("momentum_buffer", "slow_param", "step"):
            torch.testing.assert_close(gs["state"][k][key], es["state"][k][key], atol=tol, rtol=tol)
    assert int(gs["state"][0]["step"]) == 9


@pytest.mark.gpu
def test_capture_after_eager_steps_with_triton_se(cifar_dir, tmp_path):
    """Eager steps first (as fit()'s compile warmup and the benchmarks do), with the Triton SE, whose
    [C, Cr, 1, 1] weight gradients come back with other size-1 strides than their channels_last
    parameters: the capture must not rewrite the optimizer's tables (it would raise), and the replay
    must then train like the eager step."""
    changes = {"train.precision": "bf16", "model.se_impl": "triton", "train.channels_last": "true"}
    eager = _trainer(cifar_dir, tmp_path, False, **changes)
    graphed = _trainer(cifar_dir, tmp_path, True, **changes)
    batches = _batches(eager, 6)
    for images, labels in batches[:3]:
        eager._train_step(images, labels)
        graphed._train_step(images, labels)
    graphed.capture_graph(*batches[3])
    for images, labels in batches[3:]:
        le, _ = eager._train_step(images, labels)
        lg, _ = graphed._train_step(images, labels)
        torch.testing.assert_close(lg, le, atol=2e-3, rtol=2e-3)
    graphed.optimizer.load_state_dict(graphed.optimizer.state_dict())  # re-creates its buffers
    with pytest.raises(RuntimeError, match="capture it again"):
        graphed._train_step(*batches[0])


@pytest.mark.gpu
def test_graph_run_learns_resumes_and_reports_capture(cifar_dir, tmp_path):
    """A whole run with the graph: captured in the warmup (reported), learns, stops after epoch 1 and
    resumes to the same result as an uninterrupted graphed run: weights, BN statistics and their count,
    momentum, Lookahead's slow weights and step (train.deterministic: the same kernels replay the same
    arithmetic; a resume that let one throwaway batch into the BN statistics moved weights by ~1e-2)."""
    changes = {"train.precision": "bf16", "train.epochs": "2", "data.train_subset": "2000"}
    full = _trainer(cifar_dir, tmp_path / "full", True, **changes)
    summary = full.fit()
    assert full._graph is not None and summary["compile_seconds"] > 0
    assert summary["final_test_acc"] > 15.0, summary
    # captured in training mode after fit()'s warmup evaluation: BN counted every real step, no warmup one
    bn = next(m for m in full.model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert int(bn.num_batches_tracked) == 2 * full.steps_per_epoch

    first = _trainer(cifar_dir, tmp_path / "split", True, **changes)
    first.fit(stop_after_epochs=1)
    resumed = Trainer(first.cfg, device="cuda", console=quiet(), resume=first.run_dir / "last.pt")
    resumed.fit()
    for (name, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4, msg=name)  # num_batches_tracked: exactly
    want, got = full.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    assert want.keys() == got.keys() and want
    for index in want:
        for key in ("momentum_buffer", "slow_param", "step"):
            torch.testing.assert_close(got[index][key], want[index][key], atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
def test_graph_with_torch_sgd_is_refused_before_training(cifar_dir, tmp_path):
    with pytest.raises(ConfigError, match="--optim.impl fused"):
        _trainer(cifar_dir, tmp_path, True, **{"optim.impl": "torch"})
