"""`python -m fasttrain export CHECKPOINT OUT`: the weights of a run, small enough to ship.

A training checkpoint (last.pt) carries the optimizer's momentum, the Lookahead slow weights, the EMA
and the RNG: 2-4x the model (Muon alone: 2x; SGD with Lookahead: 3x; with an EMA: 4x). The exported
file keeps one set of weights (the EMA's when the run had one, or as chosen) with the config, the data they were trained on and the run's own accuracy
figures, sealed with the same checksum as a checkpoint, so `python -m fasttrain eval OUT`
measures it like any checkpoint. It cannot be resumed from (the trainer says so). `--dtype bf16`
halves the file again; evaluation casts the weights back to the model's fp32.
"""
from __future__ import annotations

import datetime
from pathlib import Path

import torch

from fasttrain.checkpoint import (FORMAT, check_architecture, load_checkpoint, run_summary, saved_config,
                                  select_weights, write_checkpoint)
from fasttrain.model import build_model, count_params
from fasttrain.runtime import git_sha

KIND = "weights"  # the "kind" entry that marks an exported file (a training checkpoint has none)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _run_summary(checkpoint: Path, ckpt: dict, used: str) -> dict:
    """The run's accuracy figures (its summary.json, beside the checkpoint) when they are these
    weights': the final epoch's checkpoint (checkpoint.run_summary), and the weights the run evaluated
    (EMA or model)."""
    summary = run_summary(checkpoint.parent, int(ckpt["epoch"]), ckpt.get("train_seconds"))
    if summary is None or summary.get("eval_weights", "model") != used:
        return {}
    keys = ("final_test_acc", "final_test_acc_tta", "tta_mode", "final_val_acc", "best_test_acc",
            "train_seconds", "device", "git_sha")
    return {k: summary.get(k) for k in keys if k in summary}


def export_weights(checkpoint: str | Path, out: str | Path, *, weights: str = "auto",
                   dtype: str = "fp32", note: str | None = None) -> dict:
    """Write the weights file; return what it says about itself (also printed by the CLI)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    checkpoint, out = Path(checkpoint), Path(out)
    ckpt = load_checkpoint(checkpoint)
    used, state = select_weights(ckpt, weights, str(checkpoint))
    model = build_model(saved_config(ckpt, checkpoint).model, check=False)
    check_architecture(model, state, str(checkpoint))  # weights that do not fit the config are refused
    cast = DTYPES[dtype]
    state = {k: (v.to(cast) if v.is_floating_point() else v).contiguous() for k, v in state.items()}
    # an exported file exported again (fp32 to bf16) keeps its label and its run's figures, unless given anew:
    # there is no summary.json beside it, and the label names the data the weights were trained on
    earlier = ckpt.get("export") if isinstance(ckpt.get("export"), dict) else {}
    info = {
        "weights": used, "dtype": dtype, "epoch": int(ckpt["epoch"]), "params": count_params(model),
        "trained_on": ckpt.get("data_source"),
        "run": _run_summary(checkpoint, ckpt, used) if not earlier else earlier.get("run") or {},
        "note": note if note is not None else earlier.get("note"),
        "exported_from": str(checkpoint), "exported_at": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "exported_by_git_sha": git_sha(), "torch": str(torch.__version__),
    }
    write_checkpoint({"format": FORMAT, "kind": KIND, "model": state, "ema": None, "config": ckpt["config"],
                      "epoch": info["epoch"], "data_source": info["trained_on"], "export": info},
                     out, previous=None)
    return {"path": str(out), "bytes": out.stat().st_size, **info}
