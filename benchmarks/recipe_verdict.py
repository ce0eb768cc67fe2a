"""The verdict of a recipe ablation (recipe_ablation.py): which variant reaches each target soonest,
and the candidate for configs/best.yaml with the flags that make it.

    python benchmarks/recipe_verdict.py ABLATION_JSON

prints the candidate's flags (its "next" entry's best_args; the line gpu_session.sh's best stage takes
with BEST_FROM, so a search and the final run chain on one machine without copying flags by hand), or
says on stderr why there is none and exits 1.

Plain data in, plain data out (the ablation's aggregates, per variant: mean final validation accuracy
without TTA and per TTA mode, median training clock, epochs), with no torch import, so that
gpu_summary.py's tests and a reader can check it on its own.
"""
from __future__ import annotations

import json
import math
import sys

TTA_KINDS = ("plain", "flip", "flip_shift")  # how a final accuracy was measured: no TTA, then each TTA mode

# An epoch's time under each optimizer (optim.name) relative to SGD's, on the same network and batch with the
# whole step as a CUDA graph: what compute alone misses when ranking runs that shared the GPU. Measured on an
# H200 for best.yaml's network ([3,3,2]) at batch 512: Muon (5 Newton-Schulz iterations, banks batched by
# shape) 0.843 s an epoch (5 seeds, 30.36 s / 36 epochs: results/2026-11-28-h200-muon/best) against 0.716 s
# for the fused Lookahead-SGD step (4 seeds, 57.29 s / 80: results/2026-11-26-h200-search/best). Muon's
# cheaper settings (3 iterations, padded banks) have not run in a timed training run: they get Muon's factor,
# no credit for what they may save; another network gets it too (its orthogonalizations scale with its banks,
# not exactly with its FLOPs); and SGD is SGD's figure whatever its optim.impl (the fused step's, measured).
EPOCH_COST = {"sgd": 1.0, "muon": 0.843 / 0.716}


def kind_accuracy(agg: dict, kind: str) -> float | None:
    """A variant's mean final validation accuracy measured as `kind` (see TTA_KINDS)."""
    if kind == "plain":
        return agg["final_val_acc_mean"]
    return (agg.get("final_val_acc_by_tta_mean") or {}).get(kind)


def fastest_reaching(aggregates: dict[str, dict], targets: dict[str, float], jobs: int = 1) -> dict[str, dict]:
    """Per target and per TTA kind (none: "plain", "flip", "flip_shift"), the quickest variant whose mean
    final validation accuracy, measured that way, reaches it: the candidates for the next
    configs/best.yaml, chosen on validation alone; their 5-seed test run (time_to_accuracy.py) only reports.
    Each is {"variant", "val_acc" (the mean it reached with), "margin" (that minus the target),
    "train_seconds", "epochs"}, or None when no variant reaches the target that way. A variant with a seed
    missing (failed, or cut by a time limit: "all_seeds" false) is not judged.

    Quickest: the shortest median training clock when the runs ran one at a time. With `jobs` > 1 the
    clocks are shared-device times that depend on how many runs happened to share the GPU with each
    (a run queued late has fewer neighbours and a shorter clock), so the least training cost ranks
    first instead (training_cost: compute, weighted by the optimizer's measured epoch time), the higher
    accuracy breaking ties. It is a fair measure between variants of one batch size; it ignores how
    well a batch size uses the GPU."""
    judged = {name: agg for name, agg in aggregates.items() if agg.get("all_seeds", True)}  # none missing
    out = {}
    for key, target in targets.items():  # the JSON's key of a target ("92.52") and its value
        out[key] = {}
        for kind in TTA_KINDS:
            reaching = [(cost_key(agg, jobs) + (-kind_accuracy(agg, kind),), name) for name, agg in judged.items()
                        if kind_accuracy(agg, kind) is not None and kind_accuracy(agg, kind) >= target]
            if not reaching:
                out[key][kind] = None
                continue
            _, name = min(reaching)
            acc = kind_accuracy(aggregates[name], kind)
            out[key][kind] = {"variant": name, "val_acc": acc, "margin": acc - target,
                              "train_seconds": aggregates[name]["train_seconds_median"],
                              "epochs": aggregates[name]["epochs"]}
    return out


def training_cost(agg: dict) -> float:
    """A variant's training cost in SGD-epoch-GFLOPs: epoch-GFLOPs (epochs x the network's forward GFLOPs per
    image; plain epochs where the aggregate has no FLOP count) x its optimizer's EPOCH_COST (1 where the
    aggregate names none or an unmeasured one). At equal epochs and network, Muon costs 1.18x SGD."""
    return agg.get("epoch_gflops", agg["epochs"]) * EPOCH_COST.get(agg.get("optimizer"), 1.0)


def cost_key(agg: dict, jobs: int) -> tuple:
    """What ranks a variant's cost: its median training clock when the runs ran one at a time, its
    training_cost when they shared the GPU (see fastest_reaching)."""
    return (agg["train_seconds_median"],) if jobs == 1 else (training_cost(agg),)


# command-line overrides of the ablation that are plumbing, not recipe: the best stage sets its own
PLUMBING = ("train.checkpoint_every", "output.", "data.dir")


def next_candidate(result: dict) -> dict | None:
    """The candidate for configs/best.yaml at the first target: the cheapest entry of its "fastest" over
    the TTA kinds (cheapest first, whatever the TTA; a tie goes to less TTA), with the overrides that
    make the config it was judged with as `best_args`: the ablation's own command-line overrides (but
    plumbing), then the variant's, then train.tta set to the kind that reached where it differs. None
    when nothing reached the first target."""
    if not result["fastest"]:
        return None
    key, kinds = next(iter(result["fastest"].items()))
    entries = [(cost_key(result["aggregate"][f["variant"]], result["jobs"]), TTA_KINDS.index(kind), kind, f)
               for kind, f in kinds.items() if f is not None]
    if not entries:
        return None
    *_, kind, pick = min(entries, key=lambda e: e[:2])
    changes = {key: value for key, value in (result.get("overrides") or {}).items() if not key.startswith(PLUMBING)}
    changes.update(result["variants"][pick["variant"]])
    tta = changes.get("train.tta", result["config"]["train"]["tta"])
    if kind != "plain" and kind != tta:
        changes["train.tta"] = kind
    return {"target": key, "kind": kind, "variant": pick["variant"], "val_acc": pick["val_acc"],
            "margin": pick["margin"], "epochs": pick["epochs"], "best_args": override_flags(changes)}


def _yaml_value(value) -> str:
    """A value as the config parser reads it back, without spaces (gpu_session.sh splits BEST_ARGS on
    them): compact JSON, except that a float always has a dot (plain YAML 1.1 reads 5e-05 as a string;
    the config parser reads YAML 1.2 floats, but a dot reads the same to both)."""
    if isinstance(value, float) and math.isfinite(value):
        text = repr(value)
        mantissa, e, exponent = text.partition("e")
        return text if "." in mantissa or not e else f"{mantissa}.0e{exponent}"
    if isinstance(value, list):
        return "[" + ",".join(_yaml_value(v) for v in value) + "]"
    return json.dumps(value, separators=(",", ":"))


def override_flags(changes: dict) -> str:
    """Dotted overrides as command-line flags, --key=VALUE each."""
    return " ".join(f"--{key}={_yaml_value(value)}" for key, value in changes.items())


def fastest_lines(result: dict) -> list[str]:
    """The verdict in words, a line per target (printed above the table, which stays last)."""
    shared = (" (shared-device times; ranked by compute, a Muon epoch as "
              f"{EPOCH_COST['muon']:.2f} SGD epochs)") if result.get("jobs", 1) > 1 else ""
    lines = []
    for key, kinds in result.get("fastest", {}).items():
        parts = []
        for kind, f in kinds.items():
            label = "without TTA" if kind == "plain" else f"with {kind} TTA"
            parts.append(f"{label}: none" if f is None else
                         f"{label}: {f['variant']} ({f['val_acc']:.2f}%, {f['margin']:+.2f}; {f['epochs']} epochs, "
                         f"{f['train_seconds']:.1f} s{shared})")
        lines.append(f"fastest to {key}% val: " + "; ".join(parts))
    return lines


def yes_no(flag: bool | None) -> str:
    """A reaches-the-target answer in a table: yes, no, or - where it was not measured."""
    return "-" if flag is None else ("yes" if flag else "no")


def one_argument(argv: list[str], usage: str, doc: str) -> int | None:
    """The command line of a script taking one argument: None when it is one, else the exit code
    after printing help (-h, --help: 0) or the usage (2)."""
    if argv in (["-h"], ["--help"]):
        print(f"{usage}\n\n{doc.strip()}")
        return 0
    if len(argv) != 1:
        print(usage, file=sys.stderr)
        return 2
    return None


def main(argv: list[str]) -> int:
    usage = "usage: python benchmarks/recipe_verdict.py ABLATION_JSON  (a recipe_ablation.py result)"
    code = one_argument(argv, usage, __doc__)
    if code is not None:
        return code
    try:
        with open(argv[0], encoding="utf-8") as f:
            result = json.load(f)
    except (OSError, ValueError) as e:
        print(f"recipe_verdict: cannot read {argv[0]}: {e}; pass the JSON a recipe_ablation.py run wrote "
              "(gpu_session.sh keeps the last one at /tmp/fasttrain-search.json)", file=sys.stderr)
        return 1
    if result.get("benchmark") != "recipe_ablation":
        print(f"recipe_verdict: {argv[0]} is not a recipe_ablation.py result (its \"benchmark\" is "
              f"{result.get('benchmark')!r})", file=sys.stderr)
        return 1
    pick = result.get("next")
    if pick is None:
        targets = list(result.get("fastest") or {})
        print(f"recipe_verdict: no candidate in {argv[0]}: no judged variant reached "
              f"{targets[0] + '%' if targets else 'the first target'} on validation "
              f"({'complete' if result.get('complete') else 'a partial search'}); see its table", file=sys.stderr)
        return 1
    partial = "" if result.get("complete") else " (a PARTIAL search: not every variant was judged)"
    print(f"recipe_verdict: {pick['variant']} reached {pick['target']}% ({pick['kind']}) on validation; "
          f"{pick['epochs']} epochs{partial}", file=sys.stderr)
    print(pick["best_args"])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
