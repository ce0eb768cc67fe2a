"""One short plain-text table of what a GPU session measured, read from its output folder.

    python benchmarks/gpu_summary.py DIR

`benchmarks/gpu_session.sh` calls it last, so the device tool's reply (which keeps only the end of the
output) carries the numbers even when the full logs do not come back. Every line is read from a file
the session wrote; a stage that wrote nothing, or stopped at its time limit, says so instead of a
number. Reads:

  stages.tsv                     stage, exit code, seconds (written by gpu_session.sh)
  gpu-tests.log                  pytest's final counts line
  best.json | best-runs/*/       time_to_accuracy.py's result, else the runs' metrics.jsonl (partial)
  throughput.json                throughput.py's rows (rewritten after each row, so partial is fine)
  bench_se_*.json, bench_optim_*.json, tune_se_*.json, loader*.json, ablation.json (recipe_ablation.py)
  profile.json                   profile_step.py's rows: host- or GPU-bound
  seed/, graphseed/, torchrun1/, plain/, apaper-*/ metrics.jsonl (graphseed also sizes apaper)
"""
from __future__ import annotations

import json
import re
import statistics
import sys
from pathlib import Path

from recipe_verdict import fastest_lines, one_argument, yes_no  # beside this script, standard library only


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _metrics(run_dir: Path) -> list[dict]:
    try:
        lines = (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    except OSError:
        return []
    rows = []
    for line in lines:
        try:
            rows.append(json.loads(line))
        except ValueError:
            break  # a line cut by the time limit: keep what came before it
    return rows


def _pct(x) -> str:
    return "-" if x is None else f"{x:.2f}%"


def _n(x, spec=",.0f") -> str:
    return "-" if x is None else format(x, spec)


def _stage_rows(d: Path) -> list[tuple[str, str, str, str]] | None:
    """stages.tsv as (name, exit code, seconds, limit in seconds) rows, the limit "" where an older session
    wrote none; None when the file is missing."""
    try:
        lines = (d / "stages.tsv").read_text(encoding="utf-8").splitlines()
    except OSError:
        return None
    return [tuple((line.split("\t") + ["", "", ""])[:4]) for line in lines]


def _killed(seconds: str, limit: str) -> str:
    """timeout's 137: its SIGKILL after the limit, or another's (the kernel's OOM killer) before it."""
    if not (seconds.isdigit() and limit.isdigit()) or int(seconds) + 2 >= int(limit):
        return "TIME LIMIT (killed)"
    return "KILLED (not its limit)"


def stages(d: Path) -> list[str]:
    rows = _stage_rows(d)
    if rows is None:
        return ["stages: no stages.tsv"]
    out = []
    for name, code, seconds, limit in rows:
        verdict = {"0": "ok", "124": "TIME LIMIT", "137": _killed(seconds, limit),
                   "skip": "skipped (no time left)", "cut": "CUT (session deadline)",
                   "no-candidate": "skipped (BEST_FROM: no candidate)",
                   "no-file": "skipped (BEST_FROM: no such file)"}.get(code, f"exit {code}")
        out.append(f"{name:<11} {verdict:<22} {seconds}s")
    return out


def _gpu_tests_log(d: Path) -> str | None:
    try:
        return (d / "gpu-tests.log").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None


def _failed_tests(log: str) -> list[str]:
    """The node ids pytest's -rfE summary lists as FAILED or ERROR."""
    return re.findall(r"^(?:FAILED|ERROR) (\S+)", log, re.M)


def tests(d: Path) -> list[str]:
    text = _gpu_tests_log(d)
    if text is None:
        return []
    # "100 failed, 276 deselected in 9.98s" (-q), or the same between "=" rules
    counts = re.findall(r"^=*\s*(\d+ (?:passed|failed|errors?|skipped|deselected|xfailed|xpassed)\b.* in [\d.]+s"
                        r"(?: \([\d:]+\))?)\s*=*$", text, re.M)
    failed = _failed_tests(text)
    lines = [f"gpu tests   {counts[-1] if counts else 'no final counts (stopped?)'}"]
    lines += [f"  failed: {name}" for name in failed[:8]]
    return lines


def _epoch_line(rows: list[dict]) -> str:
    clock = sum(r["epoch_seconds"] for r in rows)
    rates = [r["images_per_second"] for r in rows if r.get("images_per_second")]
    ips = statistics.median(rates) if rates else float("nan")
    evaluated = [r for r in rows if r.get("test_acc") is not None]  # eval_every > 1 leaves gaps
    acc = evaluated[-1]["test_acc"] if evaluated else None
    at = f" (epoch {evaluated[-1]['epoch']})" if evaluated and evaluated[-1] is not rows[-1] else ""
    return (f"{len(rows)} epochs, last test {_pct(acc)}{at}, train clock {clock:.1f} s, "
            f"median {ips:,.0f} img/s, median epoch {statistics.median(r['epoch_seconds'] for r in rows):.2f} s")


def best(d: Path) -> list[str]:
    result = _read_json(d / "best.json")
    if result:
        agg, lines = result["aggregate"], []
        for run in result["runs"]:
            reach = ", ".join(f"{t}%: {_n(s, '.1f')} s" for t, s in run["time_to_target"].items())
            lines.append(f"best.yaml   seed {run['seed']}: final {_pct(run['final_test_acc'])} "
                         f"(TTA {_pct(run['final_test_acc_tta'])}), train {run['train_seconds']:.1f} s, "
                         f"compile {run['compile_seconds']:.0f} s; to {reach}")
        verdict = ", ".join(f"{t}%: {yes_no(_reaches(agg, t, 'mean_final_reaches', 'final_test_acc_mean'))}/"
                            f"{yes_no(_reaches(agg, t, 'mean_final_tta_reaches', 'final_test_acc_tta_mean'))}"
                            for t in agg["targets"])
        lines.append(f"best.yaml   mean final {_pct(agg['final_test_acc_mean'])} (TTA {_pct(agg['final_test_acc_tta_mean'])})"
                     f" over {agg['seeds']} seed(s){'' if result.get('complete', True) else ' (PARTIAL)'}; "
                     f"mean reaches (plain/TTA) {verdict}")
        for t, target in agg["targets"].items():  # the recipe's time where its mean final reaches a target
            times = {m: s for m, s in (target.get("time_by_mean_final") or {}).items() if s is not None}
            if times:
                lines.append(f"best.yaml   time to {t}% by the mean final: "
                             + ", ".join(f"{m} {s:.1f} s" for m, s in times.items()))
        if result.get("complete", True):
            return lines
        finished = {f"seed-{run['seed']}" for run in result["runs"]}
    else:
        lines, finished = [], set()
    for run_dir in sorted((d / "best-runs").glob("*/")):
        rows = _metrics(run_dir)
        if rows and run_dir.name not in finished:
            lines.append(f"best.yaml   {run_dir.name} (partial, not in the result file): {_epoch_line(rows)}")
    return lines


def _reaches(agg: dict, target: str, key: str, mean_key: str) -> bool | None:
    """Whether a mean reaches a target: the aggregate's own answer, or (files from before it) the mean's."""
    if key in agg["targets"][target]:
        return agg["targets"][target][key]
    return None if agg.get(mean_key) is None else agg[mean_key] >= float(target)


def throughput(d: Path) -> list[str]:
    result = _read_json(d / "throughput.json")
    if not result:
        return []
    measured = result.get("measured_bf16_matmul_tflops")
    lines = [f"throughput  {result['model']['name']}, {'complete' if result.get('complete') else 'PARTIAL'}"
             f" (bf16 peak {result['bf16_peak_tflops']} TFLOP/s datasheet, "
             f"{'-' if measured is None else f'{measured:.0f}'} measured)"]
    for r in result["rows"]:
        if r["status"] != "ok":
            lines.append(f"  {r['step']:<6} {r['name'][:44]:<44} {r['status']}: {(r['reason'] or '')[:60]}")
            continue
        peak = r.get("bf16_peak_fraction")
        lines.append(f"  {r['step']:<6} {r['name'][:44]:<44} {r['images_per_second']:>10,.0f} img/s "
                     f"{(_n(r['speedup'], '.2f') + 'x'):>7} {'' if peak is None else f'{100 * peak:5.1f}% peak'}")
    return lines


def profile(d: Path) -> list[str]:
    result = _read_json(d / "profile.json")
    if not result:
        return []
    lines = [f"profile     host- or GPU-bound per step{'' if result.get('complete') else ' (PARTIAL)'}: "
             "wall / host / GPU-busy ms, kernels, syncs per step"]
    for r in result["rows"]:
        if r["status"] != "ok":
            lines.append(f"  {r['row']:<6} {r['status']}: {(r['reason'] or '')[:70]}")
            continue
        lines.append(f"  {r['row']:<6} b{r['batch_size']:<5} {_n(r['wall_ms_per_step'], '.2f')} / "
                     f"{_n(r['host_ms_per_step'], '.2f')} / {_n(r['gpu_busy_ms_per_step'], '.2f')} ms, "
                     f"{_n(r['kernels_per_step'], '.0f')} kernels, {_n(r['syncs_per_step'], '.1f')} syncs: "
                     f"{r['verdict']}")
        by_class = r.get("gpu_ms_by_class") or {}  # older files have none
        if by_class:
            lines.append("         GPU ms by class: " + ", ".join(f"{label} {ms:.2f}" for label, ms in
                                                               list(by_class.items())[:4]))
        floor = r.get("floor")  # older files have none
        if floor:
            lines.append(f"         floor {floor['step_ms']:.2f} ms ({floor['compute_ms']:.2f} compute + "
                         f"{floor['norm_traffic_ms']:.2f} norm traffic) = {floor['images_per_second']:,.0f} img/s; "
                         f"the step runs at {100 * floor['step_ms'] / r['wall_ms_per_step']:.0f}% of it")
    return lines


def kernels(d: Path) -> list[str]:
    lines = []
    for path in sorted(d.glob("bench_se_*.json")):
        result = _read_json(path) or {"rows": []}
        cases: dict[tuple, dict] = {}
        for r in result["rows"]:
            cases.setdefault((r["placement"], tuple(r["shape"])), {})[r["impl"]] = r["forward_backward_ms"]
        for (placement, shape), ms in cases.items():
            ref = ms.get("eager-ref")  # the PyTorch reference beside the kernel: issue 4's 1.5x is against it
            parts = [f"{impl} {t:.3f}" + (f" ({ref / t:.2f}x)" if ref and impl != "eager-ref" else "")
                     for impl, t in ms.items()]
            note = " (partial)" if ".partial" in path.name else ""
            lines.append(f"bench_se    {placement} {'x'.join(map(str, shape))} fwd+bwd ms{note}: {', '.join(parts)}")
    for path in sorted(d.glob("tune_se_*.json")):
        result = _read_json(path) or {}
        ranked = result.get("ranked") or []
        note = " (partial)" if ".partial" in path.name else ""
        best = ", ".join(f"gate {p['gate_tile']} reduce {p['reduce_tile']}: stem {p['stem_ms']:.3f} / all "
                         f"{p['total_ms']:.3f} ms{' (default)' if p['default'] else ''}" for p in ranked[:3])
        lines.append(f"tune_se     best first{note}: {best or 'no ranking (stopped early?)'}")
    for path in sorted(d.glob("bench_optim_*.json")):
        rows = {r["impl"]: r for r in (_read_json(path) or {"rows": []})["rows"]}
        fused = rows.get("fused", {}).get("step_ms")
        parts = [f"{impl} {1e3 * r['step_ms']:.0f} us"
                 + (f" ({r['step_ms'] / fused:.2f}x fused)" if fused and impl != "fused" else "")
                 + (f" [GPU alone {1e3 * r['gpu_step_ms']:.0f}]" if "gpu_step_ms" in r else "")
                 for impl, r in rows.items()]
        lines.append(f"bench_optim {', '.join(parts)}")
    return lines


def ablation(d: Path) -> list[str]:
    result = _read_json(d / "ablation.json")
    if not result:
        return []
    lines = [f"ablation    {result['config_name']} on {result['val_size']} validation images"
             f"{'' if result.get('complete') else ' (PARTIAL)'}: val % (vs base), with flip / flip_shift TTA, epochs, train s"
             f"{f' ({jobs} runs at a time: shared-device)' if (jobs := result.get('jobs', 1)) > 1 else ''}"]
    for name, agg in result["aggregate"].items():
        delta = agg.get("delta_val_acc_vs_base")
        # files from before the by-mode figures hold only the recipe's own TTA mode
        by_tta = agg.get("final_val_acc_by_tta_mean") or {result["config"]["train"]["tta"]: agg.get("final_val_acc_tta_mean")}
        lines.append(f"  {name:<20} {_pct(agg['final_val_acc_mean'])} ({'-' if delta is None else f'{delta:+.2f}'}),"
                     f" {_pct(by_tta.get('flip'))} / {_pct(by_tta.get('flip_shift'))}, {agg.get('epochs', '-')} ep, "
                     f"{agg['train_seconds_median']:.1f} s, {agg['seeds']} seed(s)")
    for failure in result.get("failed") or []:
        lines.append(f"  {failure['variant']:<20} FAILED (seed {failure['seed']}): {failure['error'][:120]}")
    return lines + ablation_verdict(result)


SEARCH_KEEP = "/tmp/fasttrain-search.json"  # where gpu_session.sh keeps the last ablation's result (its default)


def ablation_verdict(result: dict) -> list[str]:
    """recipe_ablation.py's verdict (recipe_verdict.py: "fastest", per target and TTA kind the quickest
    variant whose mean final validation accuracy reaches it; "next", the cheapest at the first target
    with its flags) and the best stage that tests it on the test set over 5 seeds."""
    if "fastest" not in result:  # a file from before the verdict
        return []
    fastest = result["fastest"]
    lines = [f"  {line}" for line in fastest_lines(result)]
    # a search cut by its time limit, or with failed runs, judged only some variants: say which were not
    aggregates = result.get("aggregate") or {}
    unjudged = [name for name in result.get("variants", {})
                if name not in aggregates or not aggregates[name].get("all_seeds", True)]
    partial = (f" (PARTIAL: {', '.join(unjudged)} not judged)" if unjudged
               else "" if result.get("complete") else " (PARTIAL)")
    if not any(agg.get("all_seeds", True) for agg in aggregates.values()):
        return lines + [f"next        no variant was judged{partial}: see the failures and the logs"]
    pick = result.get("next")
    if pick is None:
        return lines + [f"next        no variant reached {next(iter(fastest))}% on validation{partial}: longer or "
                        "more regularized variants"]
    how = "without TTA" if pick["kind"] == "plain" else f"with {pick['kind']} TTA"
    return lines + ["next        best on nvidia-h100-x1 with SEEDS=5"
                    + (f" BEST_ARGS='{pick['best_args']}'" if pick["best_args"] else "")
                    + f" (or, on this warm machine, BEST_FROM={SEARCH_KEEP}): {pick['variant']} reached "
                    f"{pick['target']}% {how} on validation{partial}; its 5-seed test mean is reported, not tuned on"]


def loader(d: Path) -> list[str]:
    """One line per loader.json, loader-2.json, ...: the runs of one `loader` stage (LOADER_ARGS's sets)."""
    lines = []
    for path in sorted(d.glob("loader*.json"), key=lambda p: (len(p.name), p.name)):
        result = _read_json(path)
        if not result:
            continue
        parts = [f"{r['loader']}/{r['mode']} {_n(r.get('images_per_s'))}" for r in result["results"]]
        flags = re.sub(r"\s*--out\s+\S+", "", str(result.get("command", "")).partition("bench_loader.py")[2]).strip()
        lines.append(f"loader      img/s: {', '.join(parts)}" + (f" ({flags})" if path.name != "loader.json" else ""))
    return lines


def runs(d: Path) -> list[str]:
    lines = []
    apaper = sorted(p.name for p in d.glob("apaper-*") if p.is_dir())
    for name in ("seed", "graphseed", "plain", "torchrun1", *apaper):
        rows = _metrics(d / name)
        if rows:
            lines.append(f"{name:<11} {_epoch_line(rows)}")
    return lines


APAPER_TRAIN_S = 450  # training seconds in one apaper call: BUDGET_S 530 less pip, unstaging, compile


def _graphseed_epoch(d: Path) -> float | None:
    """graphseed's median epoch seconds without the first epoch (it may carry warmup effects)."""
    rows = _metrics(d / "graphseed")
    if len(rows) < 2:
        return None
    return statistics.median(r["epoch_seconds"] for r in rows[1:])


def apaper_sizing(d: Path) -> list[str]:
    """How the apaper stage (200 epochs a seed) fits the calls: one seed alone, or two side by side (an
    upper bound of twice the time: they share a GPU-bound step). Decided within the 30 s a warm machine
    waits; the second session measured 275 s of training a seed at graphseed's 1.41 s."""
    epoch = _graphseed_epoch(d)
    if epoch is None:
        return []
    one, two = 200 * epoch, 2 * 200 * epoch
    fits = "two seeds side by side" if two <= APAPER_TRAIN_S else ("one seed" if one <= APAPER_TRAIN_S else "no seed")
    return [f"apaper      graphseed epoch {epoch:.2f} s: 200 epochs ~{one:.0f} s a seed, two side by side up to "
            f"{two:.0f} s; one call holds ~{APAPER_TRAIN_S} s of training: {fits} a call"]


def next_call(d: Path) -> list[str]:
    """After a session's quick or preflight: what the next call should run, decided here because a warm
    machine waits only 30 s. A_paper is recorded (benchmarks/results/2026-11-26-h200-apaper), so it is
    the ablation stage on best.yaml (its default variants: one ingredient taken away at a time, for issue
    6's write-up; the search is the `search` stage), which runs the whole-step CUDA graph. The graph stays on when graphseed trained and the gpu tests ran to the end
    (pytest's exit code 0, or 1: some failed) with none of the graph's tests (every test named *graph*)
    among the failures; otherwise the ablation turns it off."""
    codes = {name: code for name, code, *_ in _stage_rows(d) or []}
    if "graphseed" not in codes:
        return []
    graph_failed = [name for name in _failed_tests(_gpu_tests_log(d) or "") if "graph" in name.lower()]
    if codes["graphseed"] != "0":
        why = "graphseed failed"
    elif codes.get("gpu-tests") not in ("0", "1"):
        why = "the gpu tests did not run to the end"
    elif graph_failed:
        why = f"{len(graph_failed)} of its gpu tests failed"
    else:
        return ["next call   ablation with BUDGET_S from what is left: the graph is proven (graphseed and "
                "its gpu tests passed)"]
    return ['next call   ablation with ABLATION_ARGS="--train.cuda_graph false" and BUDGET_S from what is left: '
            f"the graph is not proven ({why})"]


def summarize(d: Path) -> str:
    docs = [_read_json(p) for p in sorted(d.glob("*.json"))]
    meta = next((doc["meta"] for doc in docs if isinstance(doc, dict) and isinstance(doc.get("meta"), dict)), None)
    head = "GPU session summary"
    if meta:
        versions = meta.get("versions") or meta
        head += (f": {meta.get('device')}, torch {versions.get('torch')}, triton {versions.get('triton')}, "
                 f"DALI {versions.get('dali')}, git {meta.get('git_sha')}")
    body = []
    for section in (stages, tests, profile, throughput, best, kernels, loader, ablation, runs, apaper_sizing,
                    next_call):
        try:  # one odd file must not cost the rest of the summary
            body += section(d)
        except Exception as e:  # noqa: BLE001
            body.append(f"{section.__name__}: unreadable ({type(e).__name__}: {e})")
    return "\n".join([head, *body])


def main(argv: list[str]) -> int:
    usage = "usage: python benchmarks/gpu_summary.py DIR  (a gpu_session.sh output folder)"
    code = one_argument(argv, usage, __doc__)
    if code is not None:
        return code
    if not Path(argv[0]).is_dir():
        print(f"error: {argv[0]} is not a folder; {usage[len('usage: '):]}", file=sys.stderr)
        return 2
    print(summarize(Path(argv[0])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
