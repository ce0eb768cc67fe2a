"""The temporary file of an atomic write (write, fsync, rename over the target).

`tempfile.mkstemp` creates its file with mode 0600 whatever the umask, and the rename keeps that mode:
checkpoints, exported weights and the downloaded data would then be readable by their owner alone,
even in a run folder shared by a team. A temporary file made here gets the mode of any file the
program writes (0666 less the umask), as `torch.save(obj, path)` or `open(path, "wb")` would give it.
`write_atomic` is the whole write (`write_text_atomic` for a run folder's text files).
"""
from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path
from typing import IO, Callable, Iterator


def file_error_message(e: OSError) -> str | None:
    """What the file system said about a named file (a full disk, no permission, a folder where a file goes),
    naming a rename's destination rather than its temp file; None for an OSError that names no file (a socket,
    a library's own), which keeps its traceback."""
    target = e.filename2 or e.filename
    return f"{target}: {e.strerror or e}" if target else None


def file_error_line(e: OSError) -> str | None:
    """file_error_message's one `error:` line (None where it is None)."""
    message = file_error_message(e)
    return f"error: {message}" if message else None


@contextlib.contextmanager
def naming(path: Path) -> Iterator[None]:
    """An OSError inside the block that names no file is given `path` as its file name. A write that finds the
    disk full (ENOSPC, EDQUOT, EIO) fails in write, flush, fsync or close, whose errors name no file, so the CLI's
    one `error:` line (file_error_message) had nothing to name and the run ended in a traceback."""
    try:
        yield
    except OSError as e:
        if e.filename is None and e.filename2 is None:
            e.filename = str(path)
        raise


def create_temp(directory: Path, prefix: str, suffix: str, made: list[Path] | None = None) -> tuple[int, Path]:
    """A new, empty file in `directory` (beside its target, so the rename stays on one file system),
    opened for writing: (file descriptor, path). A `prefix` starting with "." keeps it hidden. `made`: its path is
    appended there before it is created, so that the caller can remove it whatever interrupts the creation or the
    return of the path (a Ctrl-C there left an empty temp file)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    made = [] if made is None else made
    for _ in range(100):
        path = Path(directory) / f"{prefix}{secrets.token_hex(6)}{suffix}"
        made.append(path)
        try:
            return os.open(path, flags, 0o666), path
        except FileExistsError:  # 48 random bits: only a crowded folder or a bad random source gets here
            made.pop()  # another's
    raise FileExistsError(f"could not create a temporary file {prefix}*{suffix} in {directory}")


def write_atomic(path: Path, write: Callable[[IO], object], text: bool = False,
                 before_rename: Callable[[], object] = lambda: None) -> None:
    """Replace `path` as one step: `write(f)` into a new, fsync'ed, hidden temp file beside it (.NAME.*.tmp: not
    matched by a glob for NAME's suffix), then `before_rename()`, then the rename over `path`. The temp file is
    removed if anything fails or is interrupted before the rename. Its creation and the rename are in the write's
    try block: a Ctrl-C that came as a function handing the temp file to its caller returned (before the caller's
    own try block) left the temp file behind, beside an exported OUT for good."""
    made: list[Path] = []  # the temp file, named there before it is created
    try:
        try:
            fd, tmp = create_temp(path.parent, prefix=f".{path.name}.", suffix=".tmp", made=made)
        except OSError as e:  # named by the file being written: the temp file's hidden name means nothing to a user
            e.filename, e.filename2 = str(path), None
            raise
        with naming(path), os.fdopen(fd, "w", encoding="utf-8") if text else os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        before_rename()
        os.replace(tmp, path)
    except BaseException:
        for tmp in made:
            tmp.unlink(missing_ok=True)
        raise


def temp_files_of(path: Path) -> list[Path]:
    """The temp files write_atomic made for `path` that are still there: left by a process killed while writing it
    (a write that ends renames or removes its own)."""
    return sorted(path.parent.glob(f".{path.name}.*.tmp"))


def write_text_atomic(path: str | Path, text: str) -> None:
    """Replace `path` with `text` as one step (temp file beside it, fsync, rename): a kill or a full disk
    mid-write leaves the old file whole, never an empty or half-written one."""
    write_atomic(Path(path), lambda f: f.write(text), text=True)
