"""Is a trained network's squeeze-and-excitation alive? Per SE block of a checkpoint or weights file.

An SE block gates its input's channels by sigmoid(fc2(relu(fc1(mean over the map)))): a gate that depends on
the image. If every squeeze unit's ReLU is off on every image (fc1's pre-activation < 0), the gate is
sigmoid(fc2.bias), one constant scale per channel, and the block does nothing a BatchNorm could not. Muon's
steps on the SE's small fc1 / fc2 matrices did that to best.yaml's stem SE (README, "Muon"; optim.muon_se).

For each SE block, over the test images (the weights' own normalization, no augmentation), it prints the
squeeze units alive (pre-activation > 0 on at least one image), their pre-activation's maximum, and how much
the gate varies: its standard deviation over images (the mean over channels) and its range.

    python benchmarks/se_gate_check.py WEIGHTS [WEIGHTS ...] [--images 2000] [--out FILE]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/: the shared helpers in common.py
from common import print_table, run_main, run_metadata, write_json  # noqa: E402

from fasttrain.data import build_data  # noqa: E402
from fasttrain.evaluate import load_model, use_local_data  # noqa: E402
from fasttrain.model import SqueezeExcite  # noqa: E402

SCRIPT = "benchmarks/se_gate_check.py"  # in the result's command line, as typed from the repository root


@torch.no_grad()
def se_activity(model: torch.nn.Module, images: torch.Tensor) -> dict[str, dict]:
    """Per SE block (by module name): its squeeze units' largest pre-activation over `images`, the units alive
    (largest > 0), and the gate's spread over the images."""
    inputs: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_pre_hook(lambda mod, args, name=name: inputs.__setitem__(name, args[0]))
             for name, m in model.named_modules() if isinstance(m, SqueezeExcite)]
    try:
        model.eval()(images)
    finally:
        for h in hooks:
            h.remove()
    blocks = {}
    for name, x in inputs.items():
        se = model.get_submodule(name)
        pre = se.fc1(x.float().mean((2, 3), keepdim=True)).flatten(1)      # [images, hidden]
        gate = torch.sigmoid(se.fc2(torch.relu(pre)[:, :, None, None])).flatten(1)  # [images, channels]
        top = pre.max(0).values
        blocks[name] = {"hidden": pre.size(1), "alive": int((top > 0).sum()), "pre_max": top.tolist(),
                        "gate_std": float(gate.std(0).mean()), "gate_min": float(gate.min()),
                        "gate_max": float(gate.max())}
    return blocks


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("weights", nargs="+", help="checkpoints or exported weights files")
    parser.add_argument("--images", type=int, default=2000, help="test images to look at (default 2000)")
    parser.add_argument("--out", type=Path, help="JSON result file (default: printed only)")
    args = parser.parse_args(argv)
    if args.images < 2:
        parser.error("--images: at least 2 (the gate's spread is over images)")
    results, rows = {}, []
    for path in args.weights:
        model, cfg = load_model(path)
        use_local_data(cfg)  # $FASTTRAIN_DATA before the path the run was trained with
        data = build_data(cfg.data, batch_size=args.images, eval_batch_size=args.images, device="cpu",
                          dtype=torch.float32, channels_last=False, seed=0, test_only=True)
        images, _ = next(iter(data.test))
        blocks = se_activity(model, images)
        if not blocks:
            print(f"{path}: no SE block (model.se false)")
        results[path] = {"images": len(images), "blocks": blocks}
        rows += [[path, name, f"{b['alive']} of {b['hidden']}", f"{max(b['pre_max']):+.3f}", f"{b['gate_std']:.4f}",
                  f"{b['gate_min']:.3f}..{b['gate_max']:.3f}"] for name, b in blocks.items()]
    print_table(f"SE blocks over {args.images} test images: squeeze units alive (pre-activation > 0 on some image)",
                ["weights", "SE block", "alive", "max pre-act", "gate std over images", "gate range"], rows)
    if args.out:
        meta = run_metadata(torch.device("cpu"), argv=[SCRIPT, *argv])
        print(f"wrote {write_json(args.out, {**meta, 'results': results})}")


if __name__ == "__main__":
    run_main(main)
