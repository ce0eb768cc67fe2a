"""Each filter bank's Frobenius norm: best.yaml at initialization (seed 0), the shipped Muon weights (sixth
session) and the SGD recipe's (fourth session). Run from the repository root:
    python benchmarks/results/2026-11-28-cpu-muon-se-ns/checks/filter_norms.py
"""
import torch

from fasttrain.config import load_config
from fasttrain.evaluate import load_model
from fasttrain.model import build_model
from fasttrain.runtime import git_sha

torch.manual_seed(0)
init = build_model(load_config("configs/best.yaml", []).model)
muon, _ = load_model("benchmarks/results/2026-11-28-h200-muon/best/weights-best-bf16.pt")
sgd, _ = load_model("benchmarks/results/2026-11-27-h100/best/weights-best-bf16.pt")
print(f"git {git_sha()}, torch {torch.__version__}")
print(f"{'filter bank':30s} {'init':>8s} {'Muon':>8s} {'SGD':>8s} {'Muon/init':>10s}")
with torch.no_grad():
    for (name, p0), p1, p2 in zip(init.named_parameters(), muon.parameters(), sgd.parameters()):
        if p0.ndim == 4:
            print(f"{name:30s} {float(p0.norm()):8.2f} {float(p1.norm()):8.2f} {float(p2.norm()):8.2f} "
                  f"{float(p1.norm() / p0.norm()):10.1f}")
    for label, net in (("init", init), ("Muon", muon), ("SGD", sgd)):
        rows = net.stem_se.fc1.weight.flatten(1).norm(dim=1)
        filters = net.stem[0].weight.flatten(1).norm(dim=1)
        print(f"{label}: stem SE fc1 row norms {', '.join(f'{float(r):.2f}' for r in rows)}; "
              f"stem filters' mean norm {float(filters.mean()):.2f}")
