"""This process's place in a torchrun job, read from the environment torchrun gives its workers, and which of the
job's processes prints a line that every one of them computes alike.

`os` and `sys` only (loaded with the interpreter): `python -m fasttrain` imports it to say that a Ctrl-C came
while torch was imported, and fasttrain.distributed builds on it.
"""
import os
import sys


class LaunchEnvironmentError(ValueError):
    """WORLD_SIZE, RANK or LOCAL_RANK set, but not as torchrun sets them (a variable left in the shell, a
    launcher that sets some of them): the message names the variable and the fix."""


_FIX = "launch with torchrun (it sets WORLD_SIZE, RANK and LOCAL_RANK), or unset WORLD_SIZE for one process"


def _whole_number(name: str, default: str | None = None) -> int:
    text = os.environ.get(name, default)
    if text is None:
        raise LaunchEnvironmentError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} is set but {name} is not: {_FIX}")
    try:
        value = int(text)
    except ValueError:
        raise LaunchEnvironmentError(f"{name}={text!r} is not a whole number: {_FIX}") from None
    if value < 0:
        raise LaunchEnvironmentError(f"{name}={text} is negative: {_FIX}")
    return value


def place_in_the_job() -> tuple[int, int, int]:
    """(rank, world size, local rank) of this process in the job torchrun describes in the environment, without
    joining its process group: (0, 1, 0) for one process (no WORLD_SIZE, or WORLD_SIZE=1). A LaunchEnvironmentError
    for an environment torchrun would not give."""
    world_size = _whole_number("WORLD_SIZE", "1")
    if world_size <= 1:
        return 0, 1, 0
    rank = _whole_number("RANK")
    if rank >= world_size:
        raise LaunchEnvironmentError(f"RANK={rank} is not below WORLD_SIZE={world_size}: {_FIX}")
    return rank, world_size, _whole_number("LOCAL_RANK", "0")


def prints_here(per_node: bool = False) -> bool:
    """Whether this process prints a line that every process of the job computes alike: one process, yes; under
    torchrun rank 0 alone, as the run's console (per_node: each node's local rank 0, as report_error prints an
    error every rank hits, for the line that says why the process ends, which each node's log should hold).
    With an environment torchrun would not give, yes: the safe side (cli.main refuses to run on it)."""
    try:
        rank, _, local_rank = place_in_the_job()
    except LaunchEnvironmentError:
        return True
    return (local_rank if per_node else rank) == 0


def say_once(message: str, per_node: bool = False) -> None:
    """Print to stderr a note, warning or interruption that every process of the job computes alike (from the same
    command line, files or signal), by the one process prints_here picks: not once per rank."""
    if prints_here(per_node):
        print(message, file=sys.stderr, flush=True)
