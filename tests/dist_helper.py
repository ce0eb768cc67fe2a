"""Launched by tests/test_distributed.py, under torchrun (or alone, as the 1-process reference).

    python -m torch.distributed.run --nproc_per_node=2 tests/dist_helper.py --dump DIR \
        [--stop-after N] [--resume PATH] [--groupnorm] [--fake-graph] [--sigterm-after STEP --sigterm-rank R] \
        --config FILE --section.key VALUE ...

Trains with the real Trainer (DDP, sharded loaders, optimizer, schedule, checkpoints), then each
rank writes DIR/rank<r>.pt (outside the run folder) holding its model state, a draw of its global
RNG, the test accuracy evaluated across ranks and, on rank 0, the accuracy of the same model on
the whole test set evaluated alone, so the test can compare ranks, runs and evaluation modes, and
the run-folder writes it made (record_writes).

--groupnorm swaps every BatchNorm2d for a GroupNorm (per-sample statistics, same parameters), so
2 ranks x batch B match 1 process x batch 2B up to float rounding; with BatchNorm each rank's
batch statistics would differ from the big batch's.

--fake-graph trains through train.cuda_graph's capture/replay path with torch.cuda's graph API faked
(tests/fake_cuda_graphs.py): DDP's warmup, the capture on every rank and the replays, in lockstep.

--sigterm-after STEP --sigterm-rank R: rank R alone sends itself SIGTERM right after global training
step STEP (a deterministic signal point). The run stops with RunInterrupted; each rank then writes
what it stopped with ("stop": the steps it ran, the exception's exit code, message and announce flag)
and its model state, and exits 143.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

import torch
from torch import nn

import fasttrain.resuming as resuming_module
import fasttrain.trainer as trainer_module
from fasttrain.checkpoint import unwrap
from fasttrain.config import load_config
from fasttrain.console import RunConsole
from fasttrain.data import build_data
from fasttrain.distributed import exit_process, init_distributed, shutdown
from fasttrain.evaluate import evaluate
from fasttrain.signals import RunInterrupted
from fasttrain.trainer import Trainer

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/: the shared fakes
from fake_cuda_graphs import FakeCudaGraphs  # noqa: E402


def batchnorm_to_groupnorm(module: nn.Module) -> nn.Module:
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            setattr(module, name, nn.GroupNorm(1, child.num_features))
        else:
            batchnorm_to_groupnorm(child)
    return module


def count_steps(trainer: Trainer, sigterm_after: int | None) -> list[int]:
    """Count this rank's training steps (global step numbers); send SIGTERM to this process right
    after step `sigterm_after` (None: never). The handler only sets the flag, as a real signal would."""
    inner, done = trainer._train_step, []

    def step(images, labels):
        out = inner(images, labels)
        done.append(trainer.schedule.step_count)
        if trainer.schedule.step_count == sigterm_after:
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    trainer._train_step = step
    return done


def record_writes() -> list[str]:
    """The trainer's file writes in this process, by file name: checkpoints, metrics rows and
    whole-file writes (summary.json). Only rank 0 may write; both ranks writing one file atomically
    would leave the same files behind, so the run folder alone cannot show it."""
    writes = []

    def recording(fn, file_of):
        def write(*args, **kwargs):
            writes.append(Path(file_of(*args)).name)
            return fn(*args, **kwargs)
        return write

    for module, name, file_of in ((resuming_module, "write_checkpoint", lambda state, path, *rest: path),
                                  (trainer_module, "append_metrics", lambda run_dir, row: "metrics.jsonl"),
                                  (trainer_module, "write_text_atomic", lambda path, text: path)):
        setattr(module, name, recording(getattr(module, name), file_of))
    return writes


def dump_stop(out: Path, rank: int, trainer: Trainer, steps: list[int], stop: RunInterrupted) -> int:
    out.mkdir(parents=True, exist_ok=True)
    torch.save({"rank": rank, "state": {k: v.clone() for k, v in unwrap(trainer.model).state_dict().items()},
                "stop": {"steps": list(steps), "exit_code": stop.exit_code, "message": str(stop),
                         "announce": stop.announce}}, out / f"rank{rank}.pt")
    return stop.exit_code


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--dump", required=True)
    p.add_argument("--stop-after", type=int)
    p.add_argument("--resume")
    p.add_argument("--groupnorm", action="store_true")
    p.add_argument("--fake-graph", action="store_true")
    p.add_argument("--sigterm-after", type=int)
    p.add_argument("--sigterm-rank", type=int, default=0)
    p.add_argument("--config", required=True)
    args, overrides = p.parse_known_args(argv)
    cfg = load_config(args.config, overrides)

    if args.groupnorm:
        build = trainer_module.build_model
        trainer_module.build_model = lambda model_cfg, **kw: batchnorm_to_groupnorm(build(model_cfg, **kw))  # CPU only

    fake = FakeCudaGraphs(setattr) if args.fake_graph else None
    writes = record_writes()
    info = init_distributed("cpu")
    try:
        trainer = Trainer(cfg, device="cpu", resume=args.resume, dist_info=info,
                          console=RunConsole(progress=False, enabled=info.is_main))
        trainer.use_graph = fake is not None  # a CPU run switches it off: force the graph path onto the fakes
        initial = {k: v.clone() for k, v in unwrap(trainer.model).state_dict().items()}
        steps = count_steps(trainer, args.sigterm_after if info.rank == args.sigterm_rank else None)
        try:
            summary = trainer.fit(stop_after_epochs=args.stop_after)
        except RunInterrupted as e:
            return dump_stop(Path(args.dump), info.rank, trainer, steps, e)
        dist_acc = evaluate(trainer.eval_net, trainer.data.test, trainer.precision, trainer.device,
                            dist_info=info)
        full_acc = None
        if info.is_main:  # the same model on the whole test set, one process, no collective
            alone = build_data(cfg.data, batch_size=cfg.train.batch_size, eval_batch_size=cfg.train.eval_batch_size,
                               device="cpu", dtype=torch.float32, channels_last=cfg.train.channels_last,
                               seed=cfg.train.seed)
            full_acc = evaluate(trainer.eval_net, alone.test, trainer.precision, trainer.device)
        out = Path(args.dump)
        out.mkdir(parents=True, exist_ok=True)
        torch.save({
            "rank": info.rank, "world_size": info.world_size,
            "state": {k: v.clone() for k, v in unwrap(trainer.model).state_dict().items()},
            "initial": initial,
            "rng_probe": torch.rand(4),
            "dist_acc": dist_acc, "full_acc": full_acc,
            "test_shard": trainer.data.test.num_samples, "test_batches": len(trainer.data.test),
            "train_batches": len(trainer.data.train),
            "final_test_acc": summary["final_test_acc"],
            "captures": fake.captures if fake else 0, "replays": fake.replays if fake else 0,
            "warmups": fake.warmups if fake else [], "capture_modes": fake.capture_modes if fake else [],
            "writes": writes,
        }, out / f"rank{info.rank}.pt")
    finally:
        shutdown(info)
    return 0


if __name__ == "__main__":
    exit_process(main(sys.argv[1:]))  # as `python -m fasttrain` ends under torchrun
