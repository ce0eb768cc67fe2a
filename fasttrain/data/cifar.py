"""Official CIFAR-10 readers: the python version (pickles, read with a restricted unpickler) and the
binary version, each as a folder or as the official tarball; download with md5 check; validation split.

Every problem with the files is a `DataError` that names the file and says how to fix it.
"""
from __future__ import annotations

import contextlib
import gzip
import hashlib
import http.client
import io
import itertools
import os
import pickle
import reprlib
import sys
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from urllib.error import URLError
from urllib.request import urlopen

import numpy as np

from fasttrain.files import create_temp

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
RECORDS_PER_BATCH = 10_000  # every official batch file holds 10,000 images (tests shrink this)
IMAGE_BYTES = 3 * 32 * 32  # one image: 1,024 R, then 1,024 G, then 1,024 B bytes, each plane row-major
NUM_CLASSES = 10
ENV_VAR = "FASTTRAIN_DATA"


class DataError(RuntimeError):
    """The data is missing, corrupt or not what it claims to be; the message says how to fix it."""

    # under torchrun every rank reads the same files under the same data config (a download is local rank 0's,
    # before the others read); fasttrain.distributed.report_error: one rank per node prints it
    every_rank = True


@dataclass
class CifarArrays:
    train_x: np.ndarray  # uint8 [50000, 32, 32, 3], NHWC, RGB
    train_y: np.ndarray  # int64 [50000]
    test_x: np.ndarray  # uint8 [10000, 32, 32, 3]
    test_y: np.ndarray  # int64 [10000]
    classes: list[str]
    source: str  # what was read, for logs and run metadata


@dataclass(frozen=True)
class _Layout:
    """One official version of the data set: its file names and how to decode them."""

    kind: str
    folder: str
    tarball: str
    train_files: tuple[str, ...]
    test_file: str
    meta_file: str
    decode_batch: Callable[[bytes, str, int], tuple[np.ndarray, np.ndarray]]
    decode_meta: Callable[[bytes, str], list[str]]

    @property
    def files(self) -> tuple[str, ...]:
        return (*self.train_files, self.test_file, self.meta_file)


@dataclass(frozen=True)
class CifarLocation:
    """A found copy of CIFAR-10: `path` is the batches folder or the tarball."""

    layout: _Layout
    path: Path

    @property
    def packed(self) -> bool:
        return self.path.suffix == ".gz"


# ---------------------------------------------------------------------------------------------------
# Where the data lives


def resolve_data_dir(explicit: str | None) -> Path:
    """`--data.dir` if given, else the environment variable FASTTRAIN_DATA, else ./data."""
    chosen = explicit or os.environ.get(ENV_VAR) or "data"
    return Path(chosen).expanduser().absolute()


def placement_help(root: Path) -> str:
    """Where to put which files: the text every "not found" error ends with."""
    return (
        f"Put CIFAR-10 into {root} in any one of these forms:\n"
        f"  {root / 'cifar-10-batches-bin'}/  (data_batch_1.bin .. data_batch_5.bin, test_batch.bin, "
        "batches.meta.txt)\n"
        f"  {root / 'cifar-10-batches-py'}/  (data_batch_1 .. data_batch_5, test_batch, batches.meta)\n"
        f"  {root / 'cifar-10-binary.tar.gz'}\n"
        f"  {root / 'cifar-10-python.tar.gz'}  (from {CIFAR10_URL})\n"
        f"or point to the folder that holds one of them with --data.dir DIR or {ENV_VAR}=DIR."
    )


def find_cifar10(root: str | Path) -> CifarLocation | None:
    """The first of the four accepted forms present in `root`, or None.

    Folders come before tarballs (no decompression) and binary before python (no unpickling). `root`
    may also be a batches folder or an official tarball itself, for FASTTRAIN_DATA pointed one level
    too deep.
    """
    root = Path(root)
    for layout in LAYOUTS:
        if root.name == layout.tarball and root.is_file():
            return CifarLocation(layout, root)
    for layout in LAYOUTS:
        if root.name == layout.folder and root.is_dir():
            return CifarLocation(layout, root)
    for layout in LAYOUTS:
        if (root / layout.folder).is_dir():
            return CifarLocation(layout, root / layout.folder)
    for layout in LAYOUTS:
        if (root / layout.tarball).is_file():
            return CifarLocation(layout, root / layout.tarball)
    return None


# ---------------------------------------------------------------------------------------------------
# Download


def download_cifar10(root: Path) -> Path:
    """Fetch the official python tarball into `root`: a temp file, md5 check, then an atomic rename,
    so an interrupted or corrupt download never leaves a file that looks complete."""
    target = root / "cifar-10-python.tar.gz"
    # the folders made for a download that fails are removed again, root first: nothing left behind
    made = list(itertools.takewhile(lambda folder: not folder.exists(), (root, *root.parents)))
    try:
        root.mkdir(parents=True, exist_ok=True)
        fd, partial = create_temp(root, prefix=".cifar-10-python.", suffix=".part")
    except OSError as err:
        raise DataError(f"no CIFAR-10 in {root}, and the download cannot be saved there ({err}). Choose a "
                        f"folder you can write with --data.dir DIR or {ENV_VAR}=DIR.\n" + placement_help(root)) from err
    try:
        with os.fdopen(fd, "wb") as out:
            digest = _fetch(CIFAR10_URL, out)
        if digest != CIFAR10_MD5:
            raise DataError(
                f"downloaded {CIFAR10_URL}, but its md5 is {digest}, not {CIFAR10_MD5}: the download is "
                "corrupt or was altered, so it was deleted. Run again, or fetch the file yourself.\n"
                + placement_help(root)
            )
        os.replace(partial, target)
    except (URLError, OSError, http.client.HTTPException) as err:
        raise DataError(
            f"no CIFAR-10 in {root}, and downloading {CIFAR10_URL} failed ({err}).\n" + placement_help(root)
        ) from err
    finally:
        partial.unlink(missing_ok=True)
        if not target.exists():
            for folder in made:
                with contextlib.suppress(OSError):  # not empty (someone else's files): kept
                    folder.rmdir()
    return target


def _fetch(url: str, out) -> str:
    """Copy `url` into the file `out`, showing progress; return the md5 hex digest."""
    md5 = hashlib.md5(usedforsecurity=False)
    with urlopen(url, timeout=60) as response:
        total = int(response.headers.get("Content-Length") or 0) or None
        with _download_progress(url, total) as advance:
            while chunk := response.read(1 << 20):
                out.write(chunk)
                md5.update(chunk)
                advance(len(chunk))
    return md5.hexdigest()


@contextlib.contextmanager
def _download_progress(url: str, total: int | None):
    """Yield `advance(nbytes)`: a rich bar on a terminal, a line per 10% (or per 16 MiB) in plain logs."""
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn

    console = Console(stderr=True)
    if console.is_terminal:
        columns = (BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn())
        with Progress("[bold]CIFAR-10[/]", *columns, console=console) as progress:
            task = progress.add_task("download", total=total)
            yield lambda nbytes: progress.advance(task, nbytes)
        return
    print(f"downloading {url}", file=sys.stderr, flush=True)
    step = total // 10 if total else 16 << 20
    done, next_report = 0, step

    def advance(nbytes: int) -> None:
        nonlocal done, next_report
        done += nbytes
        if done >= next_report:
            share = f" ({100 * done // total}%)" if total else ""
            print(f"  {done / 2**20:.0f} MiB{share}", file=sys.stderr, flush=True)
            next_report += step

    yield advance


# ---------------------------------------------------------------------------------------------------
# Reading


def load_cifar10(root: str | Path, download: bool = True) -> CifarArrays:
    """Read CIFAR-10 from `root` (any of the four official forms), downloading it first if allowed."""
    root = Path(root).expanduser().absolute()
    location = find_cifar10(root)
    if location is None and not root.exists() and root.name in _FORM_NAMES:
        # one level too deep, at a form not there yet: the folder meant is its parent. A download into
        # `root` itself would be found next time as an (empty) batches folder and refused.
        root = root.parent
        location = find_cifar10(root)
    if location is None and root.exists() and not root.is_dir():
        raise DataError(f"{root} is a file, not a folder: --data.dir (or {ENV_VAR}) names the folder that holds "
                        f"CIFAR-10, or one of its official tarballs.\n" + placement_help(root.parent))
    if location is None:
        if not download:
            raise DataError(f"no CIFAR-10 in {root} (download disabled).\n" + placement_help(root))
        location = CifarLocation(PYTHON_LAYOUT, download_cifar10(root))
    return read_cifar10(location)


def read_cifar10(location: CifarLocation) -> CifarArrays:
    layout = location.layout
    raw = _read_tarball(location) if location.packed else _read_folder(location)
    records = RECORDS_PER_BATCH
    train = [layout.decode_batch(raw[name], _where(location, name), records) for name in layout.train_files]
    test_x, test_y = layout.decode_batch(raw[layout.test_file], _where(location, layout.test_file), records)
    classes = layout.decode_meta(raw[layout.meta_file], _where(location, layout.meta_file))
    return CifarArrays(
        train_x=_contiguous_nhwc([x for x, _ in train]),
        train_y=np.concatenate([y for _, y in train]),
        test_x=_contiguous_nhwc([test_x]),
        test_y=test_y,
        classes=classes,
        source=f"CIFAR-10 {layout.kind} version, {location.path}",
    )


def _contiguous_nhwc(parts: list[np.ndarray]) -> np.ndarray:
    """Stack NHWC views into one C-contiguous array: the single NCHW -> NHWC copy. (np.concatenate
    would keep the views' transposed strides.)"""
    out = np.empty((sum(map(len, parts)), *parts[0].shape[1:]), dtype=np.uint8)
    np.concatenate(parts, out=out)
    return out


def _where(location: CifarLocation, name: str) -> str:
    """A file's name for messages: a path, or a tarball and its member."""
    if location.packed:
        return f"{location.path} (member {location.layout.folder}/{name})"
    return str(location.path / name)


def _fix(location: CifarLocation) -> str:
    return (
        f"Replace it with a fresh copy from the official {location.layout.tarball}, or delete "
        f"{location.path} so that another copy (or a download) is used."
    )


def _read_folder(location: CifarLocation) -> dict[str, bytes]:
    raw = {}
    for name in location.layout.files:
        path = location.path / name
        if not path.is_file():
            raise DataError(f"{path} is missing, so {location.path} is incomplete. {_fix(location)}")
        raw[name] = path.read_bytes()
    return raw


def _max_member_bytes() -> int:
    """An official batch holds about RECORDS_PER_BATCH x 3,073 bytes in either version (the python one
    adds file names); twice that is room enough. (A function: tests shrink RECORDS_PER_BATCH.)"""
    return 2 * RECORDS_PER_BATCH * (1 + IMAGE_BYTES) + (1 << 20)


def _read_tarball(location: CifarLocation) -> dict[str, bytes]:
    """Read the members straight out of the tarball: nothing is extracted, so no path can escape."""
    wanted = {f"{location.layout.folder}/{name}": name for name in location.layout.files}
    raw = {}
    try:
        with tarfile.open(location.path, "r:gz") as tar:
            for member in tar:
                name = wanted.get(member.name.removeprefix("./"))
                if name is None or not member.isfile():  # links and devices are never followed
                    continue
                if member.size > _max_member_bytes():  # a crafted header must not exhaust memory
                    raise DataError(f"{location.path}: member {member.name} claims {member.size:,} bytes, more "
                                    f"than any official file holds: it is not the official "
                                    f"{location.layout.tarball}. Delete it and download it again.")
                raw[name] = tar.extractfile(member).read()
            # gzip checks its CRC only at the end of the stream, which reading the members stops short of:
            # without this, a flipped bit in a member would load as a changed pixel.
            while tar.fileobj.read(1 << 20):
                pass
    except (tarfile.TarError, gzip.BadGzipFile, EOFError, zlib.error) as err:
        raise DataError(f"{location.path}: cannot read the tarball ({err}); it is truncated or corrupt. "
                        f"Delete it and download it again.") from err
    except OSError as err:  # not the file's fault (permissions, a failing disk): nothing to delete
        raise DataError(f"{location.path}: cannot read the tarball ({err.strerror or err}); make it readable "
                        f"to this user, or point --data.dir (or {ENV_VAR}) at another copy.") from err
    missing = [member for member, name in wanted.items() if name not in raw]
    if missing:
        raise DataError(f"{location.path} lacks {', '.join(missing)}: it is not the official "
                        f"{location.layout.tarball}. Delete it and download it again.")
    return raw


def _planes_to_nhwc(pixels: np.ndarray) -> np.ndarray:
    """[N, 3072] rows of R, G, B planes -> an [N, 32, 32, 3] view (the copy happens on concatenation)."""
    return pixels.reshape(len(pixels), 3, 32, 32).transpose(0, 2, 3, 1)


def _check_labels(labels: np.ndarray, where: str) -> np.ndarray:
    bad = np.flatnonzero((labels < 0) | (labels >= NUM_CLASSES))
    if bad.size:
        raise DataError(f"{where}: label {labels[bad[0]]} of image {bad[0]} is outside 0..{NUM_CLASSES - 1} "
                        f"({bad.size} such labels): the file is corrupt or not CIFAR-10. Replace it with a "
                        "fresh copy of the official files.")
    return labels.astype(np.int64)


def _decode_binary_batch(raw: bytes, where: str, records: int) -> tuple[np.ndarray, np.ndarray]:
    """Binary version: `records` rows of 1 label byte + 3,072 pixel bytes."""
    expected = records * (1 + IMAGE_BYTES)
    if len(raw) != expected:
        raise DataError(f"{where}: {len(raw):,} bytes, expected {expected:,} ({records:,} records of "
                        f"{1 + IMAGE_BYTES:,} bytes): the file is truncated or not from the CIFAR-10 binary "
                        "version. Replace it with a fresh copy from the official cifar-10-binary.tar.gz.")
    table = np.frombuffer(raw, dtype=np.uint8).reshape(records, 1 + IMAGE_BYTES)
    return _planes_to_nhwc(table[:, 1:]), _check_labels(table[:, 0], where)


def _decode_binary_meta(raw: bytes, where: str) -> list[str]:
    classes = [line.strip() for line in raw.decode("ascii", errors="replace").splitlines() if line.strip()]
    return _check_classes(classes, where)


def _check_classes(classes: list[str], where: str) -> list[str]:
    if len(classes) != NUM_CLASSES:
        raise DataError(f"{where}: {len(classes)} class names, expected {NUM_CLASSES}. Replace it with a fresh "
                        "copy of the official file.")
    return classes


class _CifarUnpickler(pickle._Unpickler):  # the Python one: its BUILD opcode can be checked
    """Admits only what a plain numeric numpy array's pickle needs, so a crafted file cannot run code.

    Refusing foreign globals is not enough: numpy.ndarray and numpy.dtype alone can build an array of
    "objects" whose elements are pointers taken from the file's bytes, which crash the process (or
    worse) when read or freed. So `ndarray` is a token only `_reconstruct` accepts, a dtype must be a
    plain number, and BUILD may give a dtype only the state it already has (no forged flags or fields)
    and an array only raw bytes.

    The official batches were written by Python 2, so their strings arrive as bytes (encoding='bytes').
    """

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, raw: bytes, where: str):
        super().__init__(io.BytesIO(raw), encoding="bytes")
        self.where = where
        self._ndarray = self._call_ndarray  # one object: `_reconstruct` knows it by identity

    def find_class(self, module: str, name: str):
        if name == "_reconstruct" and module in ("numpy.core.multiarray", "numpy._core.multiarray"):
            return self._reconstruct
        if module == "numpy" and name == "ndarray":
            return self._ndarray
        if module == "numpy" and name == "dtype":
            return self._dtype
        self._refuse(f"to unpickle the global {module}.{name} (CIFAR-10 python batches hold only numpy arrays)")

    def _reconstruct(self, cls, shape, typecode):
        # numpy pickles an array as _reconstruct(ndarray, (0,), b'b'), then BUILD with its state
        if cls is not self._ndarray or typecode not in (b"b", "b"):
            self._refuse(f"an array built as _reconstruct({cls!r}, {typecode!r})")
        return _numpy_reconstruct()(np.ndarray, shape, typecode)

    def _call_ndarray(self, *args):
        self._refuse("numpy.ndarray called directly (it builds an array over raw bytes)")

    def _dtype(self, *args):
        dtype = np.dtype(*args)
        if dtype.kind not in "biuf" or dtype.hasobject or dtype.fields is not None or dtype.subdtype is not None:
            self._refuse(f"the dtype {dtype!r}: CIFAR-10 python batches hold only plain numbers")
        return dtype

    def load_build(self):
        state, target = self.stack[-1], self.stack[-2]
        if isinstance(target, np.dtype):
            # Python 2's str arrives as bytes: b'|' is the byte order '|'
            as_text = tuple(v.decode("latin1") if isinstance(v, bytes) else v for v in state) \
                if isinstance(state, tuple) else state
            if as_text != target.__reduce__()[2]:
                self._refuse(f"the state {state!r} for {target!r} (it would change what the dtype holds)")
        elif isinstance(target, np.ndarray):
            # (version, shape, dtype, fortran order, data): the dtype came through _dtype, the data is bytes
            if not (isinstance(state, tuple) and len(state) == 5 and isinstance(state[2], np.dtype)
                    and isinstance(state[4], bytes)):
                self._refuse("an array state that is not (version, shape, dtype, order, bytes)")
        else:
            self._refuse(f"a state for {type(target).__name__}")
        super().load_build()

    dispatch[pickle.BUILD[0]] = load_build

    def _refuse(self, what: str):
        raise DataError(f"{self.where}: refused {what}. This file is not an official one and may be "
                        "malicious. Delete it and use the official cifar-10-python.tar.gz.")


def _numpy_reconstruct():
    try:  # numpy 2 moved numpy.core to numpy._core; the official pickles name the old module
        from numpy._core.multiarray import _reconstruct
    except ImportError:
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


def _unpickle(raw: bytes, where: str):
    try:
        return _CifarUnpickler(raw, where).load()
    except DataError:
        raise
    except Exception as err:  # noqa: BLE001 -- garbage bytes fail in many ways; all of them mean "corrupt file"
        raise DataError(f"{where}: cannot unpickle it ({type(err).__name__}: {err}); the file is truncated or "
                        "corrupt. Replace it with a fresh copy from the official cifar-10-python.tar.gz.") from err


def _decode_python_batch(raw: bytes, where: str, records: int) -> tuple[np.ndarray, np.ndarray]:
    """Python version: a pickled dict with b'data' uint8 [records, 3072] and b'labels' (a list)."""
    batch = _unpickle(raw, where)
    fix = "Replace it with a fresh copy from the official cifar-10-python.tar.gz."
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise DataError(f"{where}: not a CIFAR-10 python batch (a dict with b'data' and b'labels'). {fix}")
    data = batch[b"data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.shape != (records, IMAGE_BYTES):
        found = f"{data.dtype} {list(data.shape)}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(f"{where}: b'data' is {found}, expected uint8 [{records}, {IMAGE_BYTES}]. {fix}")
    # checked as the list it is before numpy sees it: np.asarray of a list nested in itself k deep (a few
    # KB of pickle) builds 2^k elements, and of floats it would hide them as float64 to be truncated
    labels = batch[b"labels"]
    found = _describe_labels(labels, records)
    if found:
        raise DataError(f"{where}: b'labels' must be a list of {records} integers, found {found}. {fix}")
    try:
        labels = np.asarray(labels, dtype=np.int64)
    except OverflowError:  # an int beyond int64: outside 0..9 as surely as any
        raise DataError(f"{where}: b'labels' holds an integer outside 0..9 (beyond int64). {fix}") from None
    return _planes_to_nhwc(data), _check_labels(labels, where)


def _describe_labels(labels, records: int) -> str | None:
    """What is wrong with a python batch's b'labels' (None: a list of `records` ints), in a few words."""
    if not isinstance(labels, list):
        return type(labels).__name__
    if len(labels) != records:
        return f"a list of {len(labels)}"
    bad = next((i for i, v in enumerate(labels) if type(v) is not int), None)  # a bool is not a label either
    # reprlib: a plain repr of a list nested in itself would walk its 2^depth leaves
    return None if bad is None else f"{type(labels[bad]).__name__} {reprlib.repr(labels[bad])[:20]} at index {bad}"


def _decode_python_meta(raw: bytes, where: str) -> list[str]:
    meta = _unpickle(raw, where)
    names = meta.get(b"label_names") if isinstance(meta, dict) else None
    if not isinstance(names, list) or not all(isinstance(n, bytes) for n in names):
        raise DataError(f"{where}: no b'label_names' list; not the official batches.meta. Replace it with a "
                        "fresh copy from the official cifar-10-python.tar.gz.")
    return _check_classes([n.decode("ascii", errors="replace") for n in names], where)


BINARY_LAYOUT = _Layout(
    kind="binary", folder="cifar-10-batches-bin", tarball="cifar-10-binary.tar.gz",
    train_files=tuple(f"data_batch_{i}.bin" for i in range(1, 6)), test_file="test_batch.bin",
    meta_file="batches.meta.txt", decode_batch=_decode_binary_batch, decode_meta=_decode_binary_meta,
)
PYTHON_LAYOUT = _Layout(
    kind="python", folder="cifar-10-batches-py", tarball="cifar-10-python.tar.gz",
    train_files=tuple(f"data_batch_{i}" for i in range(1, 6)), test_file="test_batch",
    meta_file="batches.meta", decode_batch=_decode_python_batch, decode_meta=_decode_python_meta,
)
LAYOUTS = (BINARY_LAYOUT, PYTHON_LAYOUT)  # search order: binary first, it needs no unpickling
_FORM_NAMES = {name for layout in LAYOUTS for name in (layout.folder, layout.tarball)}


# ---------------------------------------------------------------------------------------------------
# Validation split


def split_validation(arrays: CifarArrays, val_size: int):
    """(train_x, train_y, val_x, val_y): the last `val_size` training images are held out (views, no copy).
    With val_size=0 there is no validation set: val_x and val_y are None."""
    total = len(arrays.train_x)
    if not 0 <= val_size < total:
        raise DataError(f"data.val_size={val_size} must be in 0..{total - 1} (the training set has {total} "
                        "images).")
    if val_size == 0:
        return arrays.train_x, arrays.train_y, None, None
    keep = total - val_size
    return arrays.train_x[:keep], arrays.train_y[:keep], arrays.train_x[keep:], arrays.train_y[keep:]
