"""The trainer on a CUDA GPU with its fast paths (run on the GPU machine: pytest -m gpu).

The CPU suite covers the loop's logic; these check what only a GPU exercises: bf16 autocast with
channels_last, torch.compile with the Triton SE op and the fused Lookahead-SGD step inside the real
loop, the DALI loader feeding it, and resuming a GPU run (optimizer state and CUDA RNG).
"""
import json

import pytest
import torch

from fasttrain.checkpoint import load_checkpoint
from fasttrain.trainer import Trainer
from test_train import quiet, tiny_config

pytestmark = pytest.mark.gpu

FAST = {"train.precision": "bf16", "train.channels_last": "true", "train.compile": "true",
        "model.se_impl": "triton", "optim.impl": "fused"}


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("loader", ["torch", "dali"])
def test_every_fast_path_together_learns(cifar_dir, tmp_path, loader):
    """The smoke recipe (4,000 images) with everything on: it learns as the CPU run does (> 25%)."""
    cfg = tiny_config(cifar_dir, tmp_path, **FAST, **{
        "data.loader": loader, "data.train_subset": "4000", "data.test_subset": "1000", "train.epochs": "4",
        "model.base_channels": "16"})
    trainer = Trainer(cfg, device="cuda", console=quiet())
    assert trainer.device.type == "cuda"
    summary = trainer.fit()
    rows = metrics(tmp_path)
    assert summary["final_test_acc"] > 25.0, summary
    assert summary["compile_seconds"] > 0 and summary["precision"] == "bf16"
    assert all(r["images_per_second"] > 0 and r["epoch_seconds"] > 0 for r in rows)
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert next(trainer.model.parameters()).is_cuda


@pytest.mark.parametrize("optim", [{"optim.impl": "fused"}, {"optim.name": "adamw", "optim.lr": "0.003",
                                                              "optim.impl": "torch"}])
def test_gpu_resume_continues(cifar_dir, tmp_path, optim):
    """1 epoch, stop, resume on the GPU: the checkpoint loads (onto the CPU, then into the GPU run),
    optimizer step counters stay off the GPU for torch's AdamW, and the run completes epoch 2."""
    changes = {"train.precision": "bf16", "model.se_impl": "triton", "train.epochs": "2", **optim}
    first = Trainer(tiny_config(cifar_dir, tmp_path, **changes), device="cuda", console=quiet())
    first.fit(stop_after_epochs=1)
    saved = load_checkpoint(tmp_path / "last.pt")
    assert saved["epoch"] == 1
    cuda_rng = saved["rng"]["cuda"]
    assert isinstance(cuda_rng, torch.Tensor)  # this run's device only, not every visible GPU
    resumed = Trainer(tiny_config(cifar_dir, tmp_path, **changes), device="cuda", console=quiet(),
                      resume=tmp_path / "last.pt")
    assert resumed.start_epoch == 1
    assert torch.equal(torch.cuda.get_rng_state(resumed.device), cuda_rng)
    if optim["optim.impl"] == "torch":
        inner = getattr(resumed.optimizer, "optimizer", resumed.optimizer)  # inside the Lookahead wrapper
        steps = [s["step"] for s in inner.state.values() if "step" in s]
        assert steps and all(not t.is_cuda for t in steps)  # a CUDA step would be .item()'d every step
    summary = resumed.fit()
    assert [r["epoch"] for r in metrics(tmp_path)] == [1, 2] and summary["final_test_acc"] > 10.0


def test_an_eager_gpu_run_autotunes_off_the_clock(cifar_dir, tmp_path):
    """No compile, no CUDA graph: cuDNN's autotuning (cudnn.benchmark) still runs in the warmup before
    the clock, reported as compile_seconds, not in epoch 1's time."""
    cfg = tiny_config(cifar_dir, tmp_path, **{"train.compile": "false", "train.cuda_graph": "false",
                                              "train.epochs": "1"})
    trainer = Trainer(cfg, device="cuda", console=quiet())
    assert torch.backends.cudnn.benchmark
    events = []
    warmup, train_epoch, step = trainer.warmup, trainer.train_epoch, trainer._train_step
    trainer.warmup = lambda *a, **k: events.append("warmup start") or warmup(*a, **k)
    trainer.train_epoch = lambda *a, **k: events.append("epoch") or train_epoch(*a, **k)
    trainer._train_step = lambda *a, **k: events.append("step") or step(*a, **k)
    summary = trainer.fit()
    assert summary["compile_seconds"] > 0 and summary["final_test_acc"] is not None
    # the warmup's throwaway steps (where cuDNN autotunes each convolution) ran before the clocked epoch
    first_epoch = events.index("epoch")
    assert events[0] == "warmup start" and "step" in events[:first_epoch], events[:12]
    assert events.count("epoch") == 1


@pytest.mark.parametrize("engine", [
    {"optim.impl": "torch", "train.cuda_graph": "false"},  # torch SGD + the Python Lookahead, eager
    {"optim.impl": "fused", "train.cuda_graph": "false", "model.se_impl": "triton"},
    {"optim.impl": "fused", "train.cuda_graph": "true"},  # the replayed graph
    # best.yaml's optimizer: its device-resident rates (fill_), foreach ops and Newton-Schulz, eager and graphed
    {"optim.name": "muon", "optim.lookahead_k": "0", "train.cuda_graph": "false"},
    {"optim.name": "muon", "optim.lookahead_k": "0", "train.cuda_graph": "true"},  # as best.yaml runs
], ids=["torch-eager", "fused-triton-eager", "fused-graph", "muon-eager", "muon-graph"])
def test_the_training_loop_never_syncs_the_host_per_step(cifar_dir, tmp_path, engine):
    """The rule the trainer's docstring states, checked by CUDA itself: torch.cuda.set_sync_debug_mode
    warns at every synchronizing call (an .item(), a blocking copy, a stream or event synchronize).
    One epoch of 40 steps after the warmup: what syncs at all must not scale with the steps (the
    epoch's own set-up may; the per-epoch read of the sums is after train_epoch)."""
    import warnings

    cfg = tiny_config(cifar_dir, tmp_path, **{"train.precision": "bf16", "train.batch_size": "32",
                                              "data.train_subset": "1280", "train.epochs": "1", **engine})
    trainer = Trainer(cfg, device="cuda", console=quiet())
    trainer.warmup()  # off the clock, as fit() runs it: compile, autotune, the graph's capture
    assert (trainer._graph is not None) is (engine["train.cuda_graph"] == "true")
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            sums = trainer.train_epoch(0)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message)]
    assert sums["steps"] == trainer.steps_per_epoch == 40
    assert len(syncs) < 5, f"{len(syncs)} synchronizing calls in {sums['steps']} steps: {syncs[:3]}"
