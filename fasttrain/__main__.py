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
    except KeyboardInterrupt:  # Ctrl-C while torch is imported (seconds): one line, as cli.main's (STARTING)
        print("interrupted while starting: nothing was read or written", file=sys.stderr)
        sys.exit(130)
    code = main()
    # The command is done and its files are written. A Ctrl-C while Python exits (torch's atexit callbacks) ends
    # the process by the signal at once, as SIGTERM does, not with a KeyboardInterrupt traceback out of a callback;
    # what it printed is flushed first (Python flushes a piped stdout after the atexit callbacks).
    sys.stdout.flush()
    sys.stderr.flush()
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    sys.exit(code)
