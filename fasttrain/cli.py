"""Command line: `python -m fasttrain [train] --config FILE [--section.key VALUE ...]`,
`python -m fasttrain eval CHECKPOINT [--tta [flip|flip_shift|all]]`, `python -m fasttrain plot RUN_DIR`,
`python -m fasttrain export CHECKPOINT OUT [--weights auto|ema|model] [--dtype fp32|bf16]`.

Every config key is a dotted flag (`--optim.lr 0.2 --train.epochs 5`). Known problems (bad config,
missing data, a bad checkpoint, a diverged run) end with one clear `error:` line and a non-zero exit
code, never a traceback (under torchrun: one per node for an error every rank hits alike, else one from each
rank that hits it, naming the rank). SIGINT/SIGTERM/SIGHUP during training finish the step, save a checkpoint and
exit 130/143/129 (128 + signal) with the command that resumes the run (under torchrun: every rank exits so,
rank 0 prints the command); in export and plot they leave OUT whole or untouched and no temp file. Under
torchrun a warning or note every rank computes alike is rank 0's alone, a Ctrl-C outside training is said once
per node, and eval, export, plot and --dry-run run on rank 0 alone.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import sys
from pathlib import Path

from fasttrain.checkpoint import WEIGHT_CHOICES, CheckpointError, checkpoint_path_problem
from fasttrain.config import (Config, ConfigError, config_changes, config_to_dict, config_with_overrides, dump_yaml,
                              load_config, parse_overrides)
from fasttrain.files import file_error_message
from fasttrain.ranks import LaunchEnvironmentError, place_in_the_job, prints_here, say_once
from fasttrain.signals import LAUNCHER_REPEAT_S, STARTING, Interrupted, exit_code, interrupting

EXIT_ERROR = 1        # the run failed (data, checkpoint, divergence, out of memory)
EXIT_USAGE = 2        # the command line or config is wrong
EXIT_INTERRUPTED = 130  # Ctrl-C; a checkpointed stop on a signal: 128 + signal (130 SIGINT, 143 SIGTERM, 129 SIGHUP)


class _Parser(argparse.ArgumentParser):
    """argparse's parser, whose usage error (`PROG: error: ...`, exit 2) every rank of a torchrun job makes alike, from
    the same command line: printed as report_error prints such an error, once per node (it printed once per rank)."""

    def error(self, message: str):
        from fasttrain.distributed import error_prefix

        prefix = error_prefix(every_rank=True)
        if prefix is None:  # local rank 0 printed it
            self.exit(EXIT_USAGE)
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {prefix}{message}\n")


class _Once(argparse.Action):
    """An option given twice is an error (argparse would keep the last one silently), as a config key
    given twice is: a second --config would train another recipe than the first one names. (--device
    stays last-wins: appended to a printed resume command it overrides, as expected.)"""

    def __call__(self, parser, namespace, values, option_string=None):
        given = namespace.__dict__.setdefault("_given_once", set())
        if self.dest in given:
            parser.error(f"{option_string} is given twice: keep one")
        given.add(self.dest)
        setattr(namespace, self.dest, values)


def _train_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python -m fasttrain",
        description="Train an Efficient-ResNet on CIFAR-10. Any config key is a flag: --optim.lr 0.2 (every "
                    "key with its value: --dry-run; what each means, with units: fasttrain/config.py)",
        epilog="other commands: python -m fasttrain eval|plot|export --help (a checkpoint's test accuracy, a run's "
               "curves, its weights to ship)",
        allow_abbrev=False,
    )
    p.add_argument("--config", action=_Once,
                   help="YAML config (configs/best.yaml, seed.yaml, resnet18.yaml, smoke.yaml); none: the paper's "
                        "recipe (seed.yaml's values), or with --resume PATH the checkpoint's own")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    p.add_argument("--resume", metavar="PATH|auto", action=_Once,
                   help="continue from a checkpoint; 'auto' picks the newest valid one in the run folder")
    p.add_argument("--overwrite", action="store_true", help="replace a run already in the output folder")
    p.add_argument("--dry-run", action="store_true",
                   help="build config, model and data lookup, print them and exit without training")
    p.add_argument("--json", action="store_true", help="with --dry-run: print one JSON object")
    return p


def _eval_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m fasttrain eval", allow_abbrev=False,
                description="Test accuracy of a checkpoint")
    p.add_argument("checkpoint", nargs="?", help="a training checkpoint (RUN_DIR/last.pt) or an exported weights "
                                                 "file, as export takes it")
    p.add_argument("--checkpoint", dest="checkpoint_flag", metavar="CHECKPOINT", help="the same, as a flag")
    p.add_argument("--tta", nargs="?", const="flip", default="none", choices=["none", "flip", "flip_shift", "all"],
                   help="test-time augmentation: flip (the default without a value) averages with the mirror "
                        "image; flip_shift also with 1-pixel translated views (fasttrain/evaluate.py); all: "
                        "each of none, flip and flip_shift")
    p.add_argument("--weights", default="auto", choices=WEIGHT_CHOICES,
                   help="auto (default): the EMA weights when the checkpoint has them (train.ema_decay > 0)")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    p.add_argument("--data.dir", dest="data_dir",
                   help="where CIFAR-10 is (default: $FASTTRAIN_DATA, else the run's data.dir, else ./data)")
    p.add_argument("--data.test_subset", dest="test_subset", type=int, metavar="N",
                   help="score the first N test images, 0: all (default: the images the run scored, its "
                        "data.test_subset)")
    p.add_argument("--json", action="store_true")
    return p


def _plot_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m fasttrain plot", allow_abbrev=False,
                description="Draw a run's curves (loss, accuracy, lr, images/s) to a PNG")
    p.add_argument("run_dir")
    p.add_argument("--out", help="PNG path (default: RUN_DIR/curves.png)")
    return p


def _export_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m fasttrain export", allow_abbrev=False,
                description="Write a run's weights (no optimizer state) to a small file that "
                            "`python -m fasttrain eval` reads")
    p.add_argument("checkpoint", help="a training checkpoint, e.g. RUN_DIR/last.pt")
    p.add_argument("out", help="the weights file to write")
    p.add_argument("--weights", default="auto", choices=WEIGHT_CHOICES,
                   help="auto (default): the EMA weights when the checkpoint has them")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="bf16 halves the file")
    p.add_argument("--note", help="free text stored in the file (e.g. what the weights are for)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("--json", action="store_true")
    return p


def resolve_resume(resume: str | None, cfg) -> tuple[str | None, dict | None]:
    """(the checkpoint to resume from, its content when this call read it). 'auto' means the newest valid
    checkpoint in the run folder (output.dir); any other value is the path itself, not read here.

    Damaged checkpoints are named in a warning and skipped (last.pt -> prev.pt). A folder with no
    checkpoint at all gives None: the run starts from the beginning there (a job killed before its
    first checkpoint, restarted by a scheduler with the same command), unless the folder's
    config.yaml belongs to another run. A folder whose checkpoints are all damaged is an error.
    """
    if resume != "auto":
        return resume, None
    if not cfg.output.dir:
        raise ConfigError("--resume auto needs the run folder: pass --output.dir RUN_DIR")
    from fasttrain.checkpoint import load_resume_checkpoint

    run_dir = Path(cfg.output.dir)
    # every rank looks, but rank 0's choice is the one the run takes (Trainer broadcasts it): its warnings alone
    found = load_resume_checkpoint(run_dir, warn=say_once)
    if found is None and (run_dir / "config.yaml").is_file():
        try:  # where its files go may be spelled another way (a default folder saves output.dir null)
            same_run = not config_changes(load_config(run_dir / "config.yaml"), cfg)
        except ConfigError:
            same_run = False
        if not same_run:
            raise ConfigError(f"--resume auto: {str(run_dir)!r} holds no checkpoint and the config.yaml of "
                              "another run: pass another --output.dir, or start a new run there with --overwrite "
                              "instead of --resume auto")
    return (str(found[0]), found[1]) if found else (None, None)


def _checkpoint_config(resume: str, rest: list[str]) -> tuple[Config, dict]:
    """`--resume RUN/last.pt` without --config: the config the checkpoint was trained with (the defaults
    would be another architecture), with the command line's overrides, continued in the checkpoint's
    folder (where it lies now) unless --output.dir says otherwise; and the checkpoint, read once, for
    the trainer."""
    from fasttrain.checkpoint import load_checkpoint, saved_config

    ckpt = load_checkpoint(resume)
    saved = ckpt.get("config")
    if not isinstance(saved, dict):
        raise CheckpointError(f"{resume} holds no config: pass the --config it was trained with")
    saved_config(ckpt, resume)  # one this version reads: else the overrides' error would blame the command line
    # overrides are applied into a copy: the trainer compares the checkpoint's own config with the run's
    cfg = config_with_overrides(copy.deepcopy(saved), rest)
    if not _gives_output_dir(rest):
        cfg.output.dir = str(Path(resume).parent)
    say_once(f"note: no --config given: using the config saved in {resume}")
    return cfg, ckpt


def _gives_output_dir(rest: list[str]) -> bool:
    # parsed, not looked for: --output '{dir: X}' names it too (a section mapping sets the keys it names)
    return "output.dir" in parse_overrides(rest)


def _follow_a_moved_run(cfg, args, rest: list[str]) -> None:
    """`--config RUN/config.yaml --resume RUN/last.pt` continues RUN, also after the folder was moved or
    renamed: the saved config names the folder the run started in (output.dir), which the move made
    stale. Only for a config and checkpoint of one folder, and unless --output.dir is given."""
    if args.resume in (None, "auto") or not args.config or _gives_output_dir(rest):
        return
    folder = Path(args.resume).resolve().parent
    if (cfg.output.dir and Path(args.config).resolve().parent == folder
            and Path(cfg.output.dir).resolve() != folder):  # a checkpoint file: cmd_train refused anything else
        say_once(f"note: {args.config} names the run folder {cfg.output.dir!r}; continuing in {str(folder)!r}, "
                 "where it lies now (pass --output.dir to choose another)")
        cfg.output.dir = str(Path(args.resume).parent)


def dry_run(cfg, as_json: bool) -> int:
    from fasttrain.data.cifar import find_cifar10, read_cifar10, resolve_data_dir
    from fasttrain.model import build_model, count_params, forward_flops

    model = build_model(cfg.model)
    params = count_params(model)
    root = resolve_data_dir(cfg.data.dir)
    found = find_cifar10(root)
    if found:
        read_cifar10(found)  # the checks training makes at once (every file there, its size, its labels)
    data = (f"{found.path} ({found.layout.kind} version)" if found else
            f"no CIFAR-10 under {root}" + (" (training would download it)" if cfg.data.download else ""))
    report = {"params": params, "forward_flops": forward_flops(model), "max_params": cfg.model.max_params,
              "data": data, "config": config_to_dict(cfg)}
    if as_json:
        print(json.dumps(report))
    else:
        print(dump_yaml(report["config"]).rstrip())
        print(f"# trainable parameters: {params:,} (budget {cfg.model.max_params:,})")
        print(f"# forward FLOPs per image: {report['forward_flops']:,}")
        print(f"# data: {report['data']}")
    return 0


def cmd_train(argv: list[str]) -> int:
    args, rest = _train_parser().parse_known_args(argv)
    if args.json and not args.dry_run:
        raise ConfigError("--json prints the --dry-run report: pass --dry-run --json (a training run logs to "
                          "its run folder's metrics.jsonl and summary.json)")
    problem = args.resume not in (None, "auto") and checkpoint_path_problem(args.resume)
    if problem:  # a typo or a run folder: refused before anything is read or set up
        raise ConfigError(f"--resume: {problem} (--resume auto --output.dir RUN_DIR takes the newest good "
                          "checkpoint in a run folder)")
    read = None  # the checkpoint's content, once read here: the trainer takes it instead of reading it again
    if args.config is None and args.resume not in (None, "auto"):
        cfg, read = _checkpoint_config(args.resume, rest)
    else:
        cfg = load_config(args.config, rest)
    _follow_a_moved_run(cfg, args, rest)
    from fasttrain.runtime import resolve_device

    if args.dry_run:  # what training would refuse before reading a checkpoint, refused here too
        resolve_device(args.device)
        return dry_run(cfg, args.json) if prints_here() else 0  # under torchrun, rank 0's report alone
    from fasttrain.distributed import init_distributed, shutdown
    from fasttrain.trainer import Trainer

    dist_info = init_distributed(resolve_device(args.device).type)
    try:
        resume, found = resolve_resume(args.resume, cfg)
        # --resume auto with nothing to resume starts over in a folder that holds no checkpoint
        # (resolve_resume already refused one that holds another run)
        overwrite = args.overwrite or (args.resume == "auto" and resume is None)
        trainer = Trainer(cfg, device=args.device, resume=resume, overwrite=overwrite, dist_info=dist_info,
                          resume_checkpoint=read or found)
        read = found = None  # the trainer has taken what it needs: not held for the whole run
        trainer.fit()
    finally:
        shutdown(dist_info)
    return 0


def cmd_eval(argv: list[str]) -> int:
    parser = _eval_parser()
    args = parser.parse_args(argv)
    named = {name for name in (args.checkpoint, args.checkpoint_flag) if name is not None}
    if len(named) != 1:
        parser.error("name one checkpoint: python -m fasttrain eval RUN_DIR/last.pt (or --checkpoint RUN_DIR/last.pt)"
                     if not named else f"two checkpoints named ({', '.join(sorted(named))}): name one")
    checkpoint = named.pop()
    problem = checkpoint_path_problem(checkpoint)
    if problem:  # a typo or a folder is a bad command line (exit 2), as for --resume
        raise ConfigError(problem)
    from fasttrain.evaluate import evaluate_checkpoint

    result = evaluate_checkpoint(checkpoint, tta=args.tta, device=args.device, data_dir=args.data_dir,
                                 weights=args.weights, test_subset=args.test_subset)
    if args.json:
        print(json.dumps(result))
    else:
        if args.tta == "all":
            accuracy = ", ".join(f"{acc:.2f}% ({'no' if mode == 'none' else mode} TTA)"
                                 for mode, acc in result["test_acc_by_tta"].items())
        else:
            accuracy = f"{result['test_acc']:.2f}%" + (f" ({args.tta} TTA)" if args.tta != "none" else "")
        print(f"test accuracy: {accuracy} on {result['test_images']:,} test images, {result['weights']} weights  "
              f"[{result['checkpoint']}, epoch {result['epoch']}, {result['params']:,} params, "
              f"trained on {result['trained_on']}]")
        if result["note"]:  # shipped weights say here what they are (the data, the run): see export --note
            print(f"note: {result['note']}")
    return 0


def cmd_export(argv: list[str]) -> int:
    args = _export_parser().parse_args(argv)
    problem = checkpoint_path_problem(args.checkpoint)
    if problem:  # a typo or a folder is a bad command line (exit 2), as for --resume
        raise ConfigError(problem)
    from fasttrain.export import export_weights

    out = Path(args.out)
    if not args.out or args.out.endswith(("/", "\\")):
        raise ConfigError(f"OUT {args.out!r}: name the weights file to write, e.g. weights.pt")
    if out.exists():
        if out.resolve() == Path(args.checkpoint).resolve():
            raise ConfigError(f"{args.out} is the checkpoint being exported: write the weights to another file "
                              "(replacing it would lose the run's optimizer state and its resumability)")
        if not out.is_file():
            raise ConfigError(f"{args.out} exists and is not a regular file: name a file to write, e.g. weights.pt")
        if not args.overwrite:
            raise ConfigError(f"{args.out} exists: pass --overwrite to replace it, or another OUT")
    _will_write(out)
    info = export_weights(args.checkpoint, args.out, weights=args.weights, dtype=args.dtype, note=args.note)
    if args.json:
        print(json.dumps(info))
    else:
        acc = info["run"].get("final_test_acc")
        print(f"wrote {info['path']} ({info['bytes'] / 1e6:.1f} MB): {info['weights']} weights in {info['dtype']}, "
              f"epoch {info['epoch']}, {info['params']:,} params, trained on {info['trained_on']}"
              + (f", run's final test accuracy {acc:.2f}%" if acc is not None else ""))
    return 0


def cmd_plot(argv: list[str]) -> int:
    args = _plot_parser().parse_args(argv)
    from fasttrain.plot import plot_run
    from fasttrain.run_folder import CURVES

    out = Path(args.out) if args.out else Path(args.run_dir) / CURVES
    _will_write(out)
    print(f"wrote {plot_run(Path(args.run_dir), out)}")
    return 0


def _file_identity(path: Path) -> tuple | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_mtime_ns


# (OUT, what was there before) of the file the running command writes by renaming a whole temp file over it (export,
# plot), None before it names one: a Ctrl-C's line says whether it came before the rename or after it
# (main's _interrupted_line)
_writing: tuple[Path, tuple | None] | None = None


def _will_write(out: Path) -> None:
    global _writing
    _writing = (out, _file_identity(out))


def _interrupted_line(command: str) -> str:
    """What a Ctrl-C outside training left. After export's or plot's rename (the directory's fsync, the returns, the
    line it prints) "OUT was not written" was false: OUT is then the new file, complete."""
    if _writing is not None and _file_identity(_writing[0]) != _writing[1]:
        return f"interrupted after {_writing[0]} was written: the file is complete"
    return INTERRUPTED.get(command, "interrupted")


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "plot": cmd_plot, "export": cmd_export}
# Commands of one process: under torchrun rank 0 runs them and the other ranks exit 0 at once; each rank printed the
# same result, and export's ranks raced to write OUT (the one that came second found it there: an error, exit 2).
ONE_PROCESS = {"eval", "plot", "export"}
# Commands that write one file through a temp file: a SIGTERM or SIGHUP is an interrupt there, as a Ctrl-C is, so the
# temp file goes (training has its own handlers: a checkpoint at the step's end)
WRITE_ONE_FILE = {"plot", "export"}
# what a Ctrl-C outside the training loop left behind (checkpoints and exports are written atomically; an
# epoch's metrics row is written before its checkpoint, and a resume drops the rows after its checkpoint)
INTERRUPTED = {"train": "interrupted: --resume auto goes on from the run's last checkpoint, if it has one (metrics "
                        "rows written after it are dropped then)",
               "export": "interrupted: OUT was not written", "plot": "interrupted: the image was not written"}


def main(argv: list[str] | None = None) -> int:
    global _writing
    argv = list(sys.argv[1:] if argv is None else argv)
    _writing = None  # a previous call's (tests, notebooks)
    command = argv.pop(0) if argv and argv[0] in COMMANDS else "train"
    try:  # before anything reads it: a traceback (KeyError 'RANK') from deep inside otherwise
        place_in_the_job()
    except LaunchEnvironmentError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    if command in ONE_PROCESS and not prints_here():
        return 0
    try:  # seconds of imports (the trainer's modules), before any file is read or written
        import torch

        from fasttrain.data.cifar import DataError
        from fasttrain.distributed import report_error
        from fasttrain.signals import RunInterrupted
        from fasttrain.trainer import TrainingError, oom_detail
    except KeyboardInterrupt:
        say_once(STARTING, per_node=True)
        return EXIT_INTERRUPTED

    try:
        # under torchrun (rank 0 alone runs them) the agent's copy of a signal is not a second one, as in training
        with (interrupting(LAUNCHER_REPEAT_S if place_in_the_job()[1] > 1 else 0.0) if command in WRITE_ONE_FILE
              else contextlib.nullcontext()):
            return COMMANDS[command](argv)
    except RunInterrupted as e:  # SIGINT/SIGTERM during training: checkpointed; say how to resume
        if e.announce:  # under torchrun rank 0 alone: one resume command, not one per rank
            print(str(e), file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt as stop:  # Ctrl-C outside the training loop, a second one during a save, a signal in
        # export or plot (Interrupted)
        # under torchrun every rank has it (torchrun's agent forwards the signal to each worker; a terminal's Ctrl-C
        # reaches all of them): printed once per node, as an error every rank hits, but with no wait (report_error's):
        # the agent that forwarded it waits for every worker to exit, so none is stopped before it prints
        say_once(_interrupted_line(command), per_node=True)
        return exit_code(stop.signum) if isinstance(stop, Interrupted) else EXIT_INTERRUPTED
    # Under torchrun, an error every rank hits identically (e.every_rank) is printed once per node, any other by
    # each rank that hits it, naming the rank (report_error). The safe side, every rank that hits it, for what
    # can differ between ranks: a GPU's memory, a package a rank imports alone (tensorboard: rank 0), a file
    # system's answer (only rank 0 writes).
    except ConfigError as e:
        report_error(str(e), e.every_rank)
        return EXIT_USAGE
    except (DataError, CheckpointError, TrainingError) as e:
        report_error(str(e), e.every_rank)
        return EXIT_ERROR
    except torch.OutOfMemoryError as e:  # outside training (fit has its own message): a run's setup, eval
        fix = ("lower --train.batch_size or --train.eval_batch_size, or train with --device cpu" if command == "train"
               else "or evaluate with --device cpu")
        report_error(f"out of GPU memory in `{command}` ({oom_detail(e)}). Another process may hold the GPU's "
                     f"memory (nvidia-smi lists them): free it, {fix}.", every_rank=False)
        return EXIT_ERROR
    except ImportError as e:  # an optional extra (dali, plot, tensorboard) that is not installed
        report_error(str(e), every_rank=False)
        return EXIT_ERROR
    except OSError as e:
        message = file_error_message(e)
        if message is None:
            raise
        report_error(message, every_rank=False)
        return EXIT_ERROR
