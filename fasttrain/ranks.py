"""This process's place in a torchrun job, read from the environment torchrun gives its workers, and which of the
job's processes prints a line that every one of them computes alike.

`os` and `sys` only (loaded with the interpreter): `python -m fasttrain` imports it to say that a Ctrl-C came
while torch was imported, and fasttrain.distributed builds on it.
"""
import os
import sys


def place_in_the_job() -> tuple[int, int, int]:
    """(rank, world size, local rank) of this process in the job torchrun describes in the environment, without
    joining its process group: (0, 1, 0) for one process (no WORLD_SIZE, or WORLD_SIZE=1)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return 0, 1, 0
    return int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", "0"))


def prints_here(per_node: bool = False) -> bool:
    """Whether this process prints a line that every process of the job computes alike: one process, yes; under
    torchrun rank 0 alone, as the run's console (per_node: each node's local rank 0, as report_error prints an
    error every rank hits, for the line that says why the process ends, which each node's log should hold)."""
    rank, _, local_rank = place_in_the_job()
    return (local_rank if per_node else rank) == 0


def say_once(message: str, per_node: bool = False) -> None:
    """Print to stderr a note, warning or interruption that every process of the job computes alike (from the same
    command line, files or signal), by the one process prints_here picks: not once per rank."""
    if prints_here(per_node):
        print(message, file=sys.stderr, flush=True)
