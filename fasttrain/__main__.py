"""`python -m fasttrain ...`: see fasttrain.cli."""
import importlib
import signal
import sys

if __name__ == "__main__":
    try:
        from fasttrain.signals import held_back, unignore_stop_signals  # light (the standard library)

        unignore_stop_signals()
        with held_back(signal.SIGINT):  # a Ctrl-C inside torch's C++ import could be lost or abort: it comes after
            importlib.import_module("torch")
        from fasttrain.cli import main
    except KeyboardInterrupt:  # Ctrl-C while torch is imported (seconds): one line, as cli.main's
        from fasttrain.ranks import say_once  # os and sys only; imported here, not ahead of the try (unprotected)
        from fasttrain.signals import STARTING, exit_code

        say_once(STARTING, per_node=True)  # under torchrun: once
        sys.exit(exit_code(signal.SIGINT))
    try:
        code = main()
        # The command is done and its files are written. What it printed is flushed before a Ctrl-C may end the
        # process (Python flushes a piped stdout after the atexit callbacks).
        sys.stdout.flush()
        sys.stderr.flush()
    except KeyboardInterrupt:  # at main's first instruction (before its own try), as it returned, or a second
        # Ctrl-C while it printed what ended the command: one line (under torchrun once per node) and 130
        from fasttrain.ranks import say_once
        from fasttrain.signals import exit_code

        say_once("interrupted", per_node=True)
        code = exit_code(signal.SIGINT)
    # A Ctrl-C while Python exits (torch's atexit callbacks) ends the process by the signal at once, as SIGTERM
    # does, not with a KeyboardInterrupt traceback out of a callback.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    # A process that joined a torchrun job's process group ends without Python's object teardown, which its native
    # threads can abort (fasttrain.distributed.exit_process). cli.main imports fasttrain.distributed before any
    # command runs; where main never ran (it is absent), no group was joined.
    distributed = sys.modules.get("fasttrain.distributed")
    if distributed is not None:
        distributed.exit_process(code)
    sys.exit(code)
