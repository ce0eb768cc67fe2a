"""CIFAR-10 readers: both official versions as folders and tarballs, the restricted unpickler, validation
errors, data-dir resolution, the download (md5, offline), build_data, and the real data set."""
import functools
import gzip
import hashlib
import io
import os
import pickle
import re
import struct
import tarfile
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch

from augment_check import recover_crops
from fasttrain.config import DataConfig
from fasttrain.data import DataBundle, TorchLoader, build_data
from fasttrain.data import cifar
from fasttrain.data.cifar import DataError, find_cifar10, load_cifar10, resolve_data_dir, split_validation
from fasttrain.data.loader_torch import epoch_draws

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
PER_BATCH = 20  # a miniature CIFAR: 5 training batches and a test batch of 20 images each


# ---------------------------------------------------------------------------------------------------
# Writers for the two official layouts


class Py2Pickler(pickle._Pickler):
    """Writes what Python 2's cPickle wrote for the official batches: every str and bytes as a py2 str
    (BINSTRING), and numpy's array reconstructor under its old name numpy.core.multiarray."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_py2_str(self, obj):
        data = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str
    dispatch[str] = save_py2_str

    def save_global(self, obj, name=None):
        if getattr(obj, "__module__", "") == "numpy._core.multiarray":
            self.write(pickle.GLOBAL + b"numpy.core.multiarray\n" + obj.__name__.encode() + b"\n")
            self.memoize(obj)
        else:
            super().save_global(obj, name)


def py2_pickle(obj) -> bytes:
    buffer = io.BytesIO()
    Py2Pickler(buffer, protocol=2).dump(obj)
    return buffer.getvalue()


def planes(images_nhwc: np.ndarray) -> np.ndarray:
    """[N, 32, 32, 3] -> the official [N, 3072] rows (R plane, G plane, B plane)."""
    return images_nhwc.transpose(0, 3, 1, 2).reshape(len(images_nhwc), -1)


def make_arrays(seed=0):
    rng = np.random.default_rng(seed)
    train_x = rng.integers(0, 256, (5 * PER_BATCH, 32, 32, 3), dtype=np.uint8)
    test_x = rng.integers(0, 256, (PER_BATCH, 32, 32, 3), dtype=np.uint8)
    train_y, test_y = rng.integers(0, 10, 5 * PER_BATCH), rng.integers(0, 10, PER_BATCH)
    return train_x, train_y, test_x, test_y


def batches(arrays):
    train_x, train_y, test_x, test_y = arrays
    for i in range(5):
        part = slice(i * PER_BATCH, (i + 1) * PER_BATCH)
        yield i + 1, train_x[part], train_y[part]
    yield None, test_x, test_y


def write_binary(root: Path, arrays) -> Path:
    folder = root / "cifar-10-batches-bin"
    folder.mkdir(parents=True)
    for number, x, y in batches(arrays):
        table = np.concatenate([y.astype(np.uint8)[:, None], planes(x)], axis=1)
        (folder / (f"data_batch_{number}.bin" if number else "test_batch.bin")).write_bytes(table.tobytes())
    (folder / "batches.meta.txt").write_text("\n".join(CLASSES) + "\n\n")
    return folder


def write_python(root: Path, arrays) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for number, x, y in batches(arrays):
        name = f"data_batch_{number}" if number else "test_batch"
        batch = {b"batch_label": b"batch " + name.encode(), b"labels": [int(v) for v in y],
                 b"data": planes(x), b"filenames": [b"img_%d.png" % i for i in range(len(x))]}
        (folder / name).write_bytes(py2_pickle(batch))
    meta = {b"num_cases_per_batch": PER_BATCH, b"label_names": [c.encode() for c in CLASSES], b"num_vis": 3072}
    (folder / "batches.meta").write_bytes(py2_pickle(meta))
    return folder


def pack(folder: Path, tarball: Path) -> Path:
    with tarfile.open(tarball, "w:gz") as tar:
        tar.add(folder, arcname=folder.name)
    return tarball


FORMS = {
    "binary-folder": lambda root, arrays: write_binary(root, arrays),
    "python-folder": lambda root, arrays: write_python(root, arrays),
    "binary-tarball": lambda root, arrays: pack(write_binary(root / "src", arrays), root / "cifar-10-binary.tar.gz"),
    "python-tarball": lambda root, arrays: pack(write_python(root / "src", arrays), root / "cifar-10-python.tar.gz"),
}


@pytest.fixture(autouse=True)
def miniature_batches(monkeypatch):
    monkeypatch.setattr(cifar, "RECORDS_PER_BATCH", PER_BATCH)


# ---------------------------------------------------------------------------------------------------
# Reading


@pytest.mark.parametrize("form", FORMS)
def test_reads_every_official_form_exactly(tmp_path, form):
    arrays = make_arrays()
    data_root = tmp_path / "data"
    data_root.mkdir()
    FORMS[form](data_root, arrays)
    loaded = load_cifar10(data_root, download=False)
    train_x, train_y, test_x, test_y = arrays
    assert loaded.train_x.dtype == np.uint8 and loaded.train_x.flags.c_contiguous
    # the test images too: a view of the planes would reach the loaders with NCHW strides, and their NHWC
    # batches would then not be channels_last
    assert loaded.test_x.dtype == np.uint8 and loaded.test_x.flags.c_contiguous
    assert loaded.train_y.dtype == np.int64 and loaded.test_y.dtype == np.int64
    np.testing.assert_array_equal(loaded.train_x, train_x)  # NHWC, RGB, pixel for pixel
    np.testing.assert_array_equal(loaded.train_y, train_y)
    np.testing.assert_array_equal(loaded.test_x, test_x)
    np.testing.assert_array_equal(loaded.test_y, test_y)
    assert loaded.classes == CLASSES
    assert form.split("-")[0] in loaded.source


def test_plane_layout_is_rgb_row_major(tmp_path):
    """A hand-built record: pixel (row 1, col 2) is red 200, green 100, blue 50."""
    arrays = make_arrays()
    folder = write_binary(tmp_path, arrays)
    record = np.zeros(1 + 3072, np.uint8)
    record[0] = 7
    for channel, value in enumerate((200, 100, 50)):
        record[1 + channel * 1024 + 1 * 32 + 2] = value
    raw = bytearray((folder / "data_batch_1.bin").read_bytes())
    raw[:3073] = record.tobytes()
    (folder / "data_batch_1.bin").write_bytes(bytes(raw))
    loaded = load_cifar10(tmp_path, download=False)
    assert loaded.train_y[0] == 7
    assert loaded.train_x[0, 1, 2].tolist() == [200, 100, 50]
    assert loaded.train_x[0].sum() == 350


def test_find_prefers_folders_and_accepts_the_folder_itself(tmp_path):
    arrays = make_arrays()
    assert find_cifar10(tmp_path) is None
    pack(write_python(tmp_path / "src", arrays), tmp_path / "cifar-10-python.tar.gz")
    assert find_cifar10(tmp_path).path.name == "cifar-10-python.tar.gz"
    folder = write_binary(tmp_path, arrays)
    assert find_cifar10(tmp_path).path == folder
    assert find_cifar10(folder).path == folder


def test_find_prefers_the_binary_version_to_the_python_one(tmp_path):
    """Both versions side by side, as folders or as tarballs: the binary one is read (no unpickling)."""
    arrays = make_arrays()
    pack(write_python(tmp_path / "src", arrays), tmp_path / "cifar-10-python.tar.gz")
    pack(write_binary(tmp_path / "src", arrays), tmp_path / "cifar-10-binary.tar.gz")
    assert find_cifar10(tmp_path).path.name == "cifar-10-binary.tar.gz"
    write_python(tmp_path, arrays)
    binary = write_binary(tmp_path, arrays)
    assert find_cifar10(tmp_path).path == binary


# ---------------------------------------------------------------------------------------------------
# The restricted unpickler


class RunsShell:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


class RunsEval:
    def __reduce__(self):
        return eval, ("__import__('os').system('false')",)


@pytest.mark.parametrize("payload", ["system", "eval"])
def test_malicious_pickle_is_refused(tmp_path, payload):
    folder = write_python(tmp_path, make_arrays())
    sentinel = tmp_path / "SENTINEL"
    evil = RunsShell(f"touch {sentinel}") if payload == "system" else RunsEval()
    (folder / "data_batch_2").write_bytes(py2_pickle({b"data": evil, b"labels": []}))
    with pytest.raises(DataError, match=r"data_batch_2.*refused to unpickle the global (posix|os|__builtin__)\."):
        load_cifar10(tmp_path, download=False)
    assert not sentinel.exists()


def test_unpickler_admits_only_numpy_array_globals():
    unpickler = cifar._CifarUnpickler(b"", "somefile")
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):  # numpy 1 and numpy 2 spellings
        reconstruct = unpickler.find_class(module, "_reconstruct")
        array = reconstruct(unpickler.find_class("numpy", "ndarray"), (0,), b"b")
        assert type(array) is np.ndarray and array.shape == (0,)
    assert unpickler.find_class("numpy", "dtype")("u1", False, True) == np.uint8
    for code in ("U4", "S4", "V8", "c16", "M8"):  # no objects in them, but not plain numbers either
        with pytest.raises(DataError, match=r"somefile: refused the dtype dtype\(.*hold only plain numbers"):
            unpickler.find_class("numpy", "dtype")(code, False, True)
    for module, name in [("numpy", "load"), ("numpy.core.multiarray", "scalar"), ("builtins", "getattr"),
                         ("subprocess", "Popen"), ("copy_reg", "_reconstructor")]:
        with pytest.raises(DataError, match=f"somefile: refused to unpickle the global {module}.{name}"):
            unpickler.find_class(module, name)


def _global(module: str, name: str) -> bytes:
    return pickle.GLOBAL + f"{module}\n{name}\n".encode()


def _pickled_dtype(code: str, state_flags: int | None = 0) -> bytes:
    """numpy.dtype(code, False, True) with numpy's own state tuple; `state_flags` forges its flags (None: no
    state and no BUILD, the dtype as its constructor made it)."""
    call = (_global("numpy", "dtype") + pickle.MARK + pickle.SHORT_BINUNICODE + bytes([len(code)]) + code.encode()
            + pickle.NEWFALSE + pickle.NEWTRUE + pickle.TUPLE + pickle.REDUCE)
    if state_flags is None:
        return call
    state = (pickle.MARK + pickle.BININT1 + b"\x03" + pickle.SHORT_BINUNICODE + b"\x01|" + pickle.NONE * 3
             + (pickle.BININT + struct.pack("<i", -1)) * 2 + pickle.BININT + struct.pack("<i", state_flags)
             + pickle.TUPLE)
    return call + state + pickle.BUILD


# Ways to an array whose elements are pointers taken from the file's bytes (reading one would crash the
# process, or worse): numpy.ndarray called on a buffer, numpy's own reconstructor with an object dtype
# (with a dtype state, and without one: then no BUILD check sees the dtype, only its constructor's), and
# a plain dtype whose flags the pickled state forges to "holds objects".
_POINTER_BYTES = pickle.SHORT_BINBYTES + b"\x08" + b"A" * 8
_RECONSTRUCT_EMPTY = (_global("numpy.core.multiarray", "_reconstruct") + pickle.MARK + _global("numpy", "ndarray")
                      + pickle.MARK + pickle.BININT1 + b"\x00" + pickle.TUPLE + pickle.SHORT_BINBYTES + b"\x01b"
                      + pickle.TUPLE + pickle.REDUCE)
OBJECT_ARRAY_PICKLES = {
    "ndarray-called": _global("numpy", "ndarray") + pickle.MARK + pickle.MARK + pickle.BININT1 + b"\x01"
                      + pickle.TUPLE + _pickled_dtype("O") + _POINTER_BYTES + pickle.TUPLE + pickle.REDUCE,
    "object-dtype": _global("numpy.core.multiarray", "_reconstruct") + pickle.MARK
                    + _global("numpy", "ndarray") + pickle.MARK + pickle.BININT1 + b"\x00" + pickle.TUPLE
                    + pickle.SHORT_BINBYTES + b"\x01b" + pickle.TUPLE + pickle.REDUCE
                    + pickle.MARK + pickle.BININT1 + b"\x01" + pickle.MARK + pickle.BININT1 + b"\x01" + pickle.TUPLE
                    + _pickled_dtype("O") + pickle.NEWFALSE + _POINTER_BYTES + pickle.TUPLE + pickle.BUILD,
    "forged-flags": _global("numpy.core.multiarray", "_reconstruct") + pickle.MARK
                    + _global("numpy", "ndarray") + pickle.MARK + pickle.BININT1 + b"\x00" + pickle.TUPLE
                    + pickle.SHORT_BINBYTES + b"\x01b" + pickle.TUPLE + pickle.REDUCE
                    + pickle.MARK + pickle.BININT1 + b"\x01" + pickle.MARK + pickle.BININT1 + b"\x08" + pickle.TUPLE
                    + _pickled_dtype("u1", state_flags=0x3F) + pickle.NEWFALSE + _POINTER_BYTES + pickle.TUPLE
                    + pickle.BUILD,
    "object-dtype-without-state": _RECONSTRUCT_EMPTY + pickle.MARK + pickle.BININT1 + b"\x01" + pickle.MARK
                                  + pickle.BININT1 + b"\x01" + pickle.TUPLE + _pickled_dtype("O8", state_flags=None)
                                  + pickle.NEWFALSE + _POINTER_BYTES + pickle.TUPLE + pickle.BUILD,
}
# which check refuses each: the object dtype as soon as it is made, the forged state at its BUILD
REFUSED_BECAUSE = {"ndarray-called": r"the dtype dtype\('O'\)", "object-dtype": r"the dtype dtype\('O'\)",
                   "object-dtype-without-state": r"the dtype dtype\('O'\)",
                   "forged-flags": r"the state \(3, '\|', None, None, None, -1, -1, 63\) for dtype\('uint8'\)"}


@pytest.mark.parametrize("how", OBJECT_ARRAY_PICKLES)
def test_arrays_of_pointers_are_refused_before_anything_reads_them(tmp_path, how):
    """The labels list holds the crafted array: the reader's np.asarray(labels) would dereference it."""
    folder = write_python(tmp_path, make_arrays())
    batch = pickle.loads((folder / "data_batch_3").read_bytes(), encoding="bytes")
    good = py2_pickle({b"data": batch[b"data"]})  # one item: ... SETITEM STOP; the labels go in before STOP
    assert good.endswith(pickle.SETITEM + pickle.STOP)
    crafted = (good[:-1] + pickle.SHORT_BINSTRING + b"\x06labels" + pickle.EMPTY_LIST
               + OBJECT_ARRAY_PICKLES[how] + pickle.APPEND + pickle.SETITEM + pickle.STOP)
    (folder / "data_batch_3").write_bytes(crafted)
    with pytest.raises(DataError, match=rf"data_batch_3: refused {REFUSED_BECAUSE[how]}.*not an official one"):
        load_cifar10(tmp_path, download=False)


def test_a_clean_crafted_pickle_of_the_same_shape_loads():
    """The control for the test above: the same hand-built frame around a plain label list is accepted."""
    data = np.arange(PER_BATCH * 3072, dtype=np.uint8).reshape(PER_BATCH, 3072)
    good = py2_pickle({b"data": data})
    labels = pickle.EMPTY_LIST + pickle.MARK + pickle.BININT1 + b"\x07" + pickle.APPENDS
    crafted = good[:-1] + pickle.SHORT_BINSTRING + b"\x06labels" + labels + pickle.SETITEM + pickle.STOP
    batch = cifar._unpickle(crafted, "somefile")
    assert batch[b"labels"] == [7]
    np.testing.assert_array_equal(batch[b"data"], data)


# ---------------------------------------------------------------------------------------------------
# Validation errors


@pytest.mark.parametrize("change", [-100, 5], ids=["truncated", "5-extra-bytes"])
def test_binary_batch_of_the_wrong_length(tmp_path, change):
    """Too short or too long by a few bytes: either way not an official batch (a longer one must not be
    read as its first 20 records, nor fail later in a reshape)."""
    folder = write_binary(tmp_path, make_arrays())
    path = folder / "data_batch_3.bin"
    raw = path.read_bytes()
    path.write_bytes(raw[:change] if change < 0 else raw + bytes(change))
    found, expected = f"{PER_BATCH * 3073 + change:,}", f"{PER_BATCH * 3073:,}"
    with pytest.raises(DataError, match=rf"data_batch_3.bin: {found} bytes, expected {expected} .*truncated.*fresh"):
        load_cifar10(tmp_path, download=False)


@pytest.mark.parametrize("names", [CLASSES[:9], CLASSES + ["unicorn"]], ids=["nine", "eleven"])
def test_binary_meta_with_the_wrong_number_of_class_names(tmp_path, names):
    """batches.meta.txt must name exactly the 10 classes: one missing or one too many is an error that
    gives the count."""
    folder = write_binary(tmp_path, make_arrays())
    (folder / "batches.meta.txt").write_text("\n".join(names) + "\n")
    with pytest.raises(DataError, match=rf"batches.meta.txt: {len(names)} class names, expected 10"):
        load_cifar10(tmp_path, download=False)


def test_binary_label_out_of_range(tmp_path):
    folder = write_binary(tmp_path, make_arrays())
    raw = bytearray((folder / "test_batch.bin").read_bytes())
    raw[5 * 3073] = 10  # the label byte of image 5
    (folder / "test_batch.bin").write_bytes(bytes(raw))
    with pytest.raises(DataError, match=r"test_batch.bin: label 10 of image 5 is outside 0..9"):
        load_cifar10(tmp_path, download=False)


def rewrite_python_batch(folder: Path, name: str, **changes):
    batch = pickle.loads((folder / name).read_bytes(), encoding="bytes")
    batch.update({key.encode(): value for key, value in changes.items()})
    (folder / name).write_bytes(py2_pickle(batch))


@pytest.mark.parametrize("bad", [11, -1])
def test_python_label_out_of_range(tmp_path, bad):
    """Above the classes or below 0 (a python batch's labels are a list of any ints)."""
    folder = write_python(tmp_path, make_arrays())
    rewrite_python_batch(folder, "data_batch_4", labels=[3] * (PER_BATCH - 1) + [bad])
    with pytest.raises(DataError, match=rf"data_batch_4: label {bad} of image {PER_BATCH - 1} is outside 0..9"):
        load_cifar10(tmp_path, download=False)


LABELS = r"b'labels' must be a list of 20 integers, found "  # what a python batch's labels are, then what was found


@pytest.mark.parametrize("change, message", [
    (dict(data=np.zeros((PER_BATCH, 3000), np.uint8)), r"b'data' is uint8 \[20, 3000\], expected uint8 \[20, 3072\]"),
    (dict(data=np.zeros((PER_BATCH, 3072), np.float32)), r"b'data' is float32"),
    (dict(labels=[1, 2, 3]), LABELS + r"a list of 3\."),
    (dict(labels=[1] * 5 + [1.5] * 15), LABELS + r"float 1\.5 at index 5"),  # not truncated to 1
    (dict(labels=[[1, 2]] * (PER_BATCH - 1) + [[3]]), LABELS + r"list \[1, 2\] at index 0"),  # ragged
    # a list nested in itself 24 deep: a few hundred bytes of pickle that np.asarray expanded to 2^24 elements
    (dict(labels=[functools.reduce(lambda inner, _: [inner, inner], range(24), [0])] * PER_BATCH),
     LABELS + r"list \[\[\[\[\[\[.* at index 0"),
    (dict(labels=[True] * PER_BATCH), LABELS + r"bool True at index 0"),
    (dict(labels=np.zeros(PER_BATCH, np.int64)), LABELS + r"ndarray\."),
    (dict(labels=[0] * (PER_BATCH - 1) + [2**70]), r"b'labels' holds an integer outside 0\.\.9 \(beyond int64\)"),
])
def test_python_wrong_shapes(tmp_path, change, message):
    folder = write_python(tmp_path, make_arrays())
    rewrite_python_batch(folder, "data_batch_1", **change)
    with pytest.raises(DataError, match=rf"data_batch_1: {message}"):
        load_cifar10(tmp_path, download=False)


@pytest.mark.parametrize("payload", [{b"data": np.zeros((PER_BATCH, 3072), np.uint8)}, [b"data", b"labels"]],
                         ids=["no-labels", "a-list"])
def test_python_batch_that_is_not_a_dict_of_data_and_labels(tmp_path, payload):
    """A pickle that loads but is not a batch: a DataError that says what a batch is, not a KeyError or
    TypeError from reading it."""
    folder = write_python(tmp_path, make_arrays())
    (folder / "data_batch_1").write_bytes(py2_pickle(payload))
    with pytest.raises(DataError, match=r"data_batch_1: not a CIFAR-10 python batch \(a dict with b'data' and "
                                        r"b'labels'\)\. Replace it"):
        load_cifar10(tmp_path, download=False)


@pytest.mark.parametrize("meta", [{b"num_vis": 3072}, {b"label_names": CLASSES}], ids=["no-names", "str-names"])
def test_python_meta_without_a_list_of_byte_names(tmp_path, meta):
    """batches.meta without b'label_names', or with them as str (a Python 3 re-pickle): a DataError naming the
    file, not a KeyError or AttributeError."""
    folder = write_python(tmp_path, make_arrays())
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=4))
    with pytest.raises(DataError, match=r"batches.meta: no b'label_names' list; not the official batches.meta"):
        load_cifar10(tmp_path, download=False)


def test_truncated_pickle(tmp_path):
    folder = write_python(tmp_path, make_arrays())
    path = folder / "data_batch_5"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(DataError, match=r"data_batch_5: cannot unpickle it .*truncated or corrupt"):
        load_cifar10(tmp_path, download=False)


@pytest.mark.parametrize("writer, missing", [(write_binary, "test_batch.bin"), (write_binary, "batches.meta.txt"),
                                             (write_python, "data_batch_2")])
@pytest.mark.parametrize("in_its_place", [None, "a folder"])
def test_missing_file_in_folder(tmp_path, writer, missing, in_its_place):
    """Missing, or a folder of that name where the file should be (not an IsADirectoryError)."""
    folder = writer(tmp_path, make_arrays())
    (folder / missing).unlink()
    if in_its_place:
        (folder / missing).mkdir()
    with pytest.raises(DataError, match=rf"{missing} is missing.*incomplete.*fresh copy"):
        load_cifar10(tmp_path, download=False)


def test_tarball_missing_member_and_truncated(tmp_path):
    folder = write_binary(tmp_path / "src", make_arrays())
    (folder / "data_batch_5.bin").unlink()
    tarball = pack(folder, tmp_path / "cifar-10-binary.tar.gz")
    with pytest.raises(DataError, match=r"lacks cifar-10-batches-bin/data_batch_5.bin"):
        load_cifar10(tmp_path, download=False)
    tarball.write_bytes(tarball.read_bytes()[:5000])
    with pytest.raises(DataError, match=r"cifar-10-binary.tar.gz: cannot read the tarball .*truncated or corrupt"):
        load_cifar10(tmp_path, download=False)


@pytest.mark.parametrize("damage", ["not-gzip", "bad-deflate-inside-a-member"])
def test_tarball_that_is_not_gzip_or_whose_deflate_data_breaks(tmp_path, damage):
    """Two failures besides truncation, each a DataError naming the tarball and the fix: a web page saved under
    the tarball's name (not gzip at all: tarfile's error), and a deflate stream that turns invalid inside a
    member's data (zlib's own error, which the flipped bits below rarely produce)."""
    tarball = FORMS["binary-tarball"](tmp_path, make_arrays())
    if damage == "not-gzip":
        tarball.write_bytes(b"<html><body>Please sign in to continue</body></html>\n")
    else:
        contents = gzip.decompress(tarball.read_bytes())
        with tarfile.open(tarball) as tar:
            member = tar.getmember("cifar-10-batches-bin/data_batch_1.bin")
        cut = member.offset_data + member.size // 2
        # a valid gzip member up to the middle of data_batch_1.bin, then a member whose deflate block type is invalid
        tarball.write_bytes(gzip.compress(contents[:cut]) + gzip.compress(b"")[:10] + b"\xff" * 64)
    with pytest.raises(DataError, match=r"cifar-10-binary.tar.gz: cannot read the tarball .*truncated or corrupt\. "
                                        r"Delete it and download it again\."):
        load_cifar10(tmp_path, download=False)


def test_an_unreadable_tarball_is_not_called_corrupt(tmp_path, monkeypatch):
    """Permissions (or a failing disk) are not the file's fault: the error says so, and does not tell the
    user to delete a good tarball (root here reads anything, so the open is made to fail)."""
    tarball = FORMS["binary-tarball"](tmp_path, make_arrays())

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(tarball))

    monkeypatch.setattr(cifar.tarfile, "open", denied)
    with pytest.raises(DataError, match=r"cifar-10-binary.tar.gz: cannot read the tarball \(Permission denied\); "
                                        r"make it readable to this user") as err:
        load_cifar10(tmp_path, download=False)
    assert "Delete it" not in str(err.value)


def test_a_bad_member_of_a_tarball_is_named_as_a_member(tmp_path):
    """An error about a file inside a tarball names the tarball and the member: there is no path to that file
    to go and look at."""
    folder = write_binary(tmp_path / "src", make_arrays())
    (folder / "data_batch_3.bin").write_bytes(bytes(100))
    tarball = pack(folder, tmp_path / "cifar-10-binary.tar.gz")
    with pytest.raises(DataError, match=re.escape(f"{tarball} (member cifar-10-batches-bin/data_batch_3.bin): 100 bytes, "
                                                  "expected")):
        load_cifar10(tmp_path, download=False)


@pytest.mark.parametrize("form", ["binary-tarball", "python-tarball"])
def test_tarball_with_a_flipped_bit_is_refused(tmp_path, form):
    """gzip's CRC covers every member; a bit flipped anywhere in the compressed stream is an error, not
    a changed pixel. (Not the last 16 bytes: the deflate stream's final bits may be padding.)"""
    tarball = FORMS[form](tmp_path, make_arrays())
    packed = tarball.read_bytes()
    rng = np.random.default_rng(0)
    for offset in rng.integers(20, len(packed) - 16, size=6):
        flipped = bytearray(packed)
        flipped[offset] ^= 1 << int(rng.integers(8))
        tarball.write_bytes(bytes(flipped))
        with pytest.raises(DataError, match=rf"{tarball.name}: .*(corrupt|not the official)"):
            load_cifar10(tmp_path, download=False)
    tarball.write_bytes(packed)
    assert load_cifar10(tmp_path, download=False).train_x.shape == (5 * PER_BATCH, 32, 32, 3)


def test_tarball_whose_members_carry_a_dot_slash_prefix_loads_exactly(tmp_path):
    """`tar czf X -C DIR .` names every member ./cifar-10-batches-py/...: the same files, read as they are."""
    arrays = make_arrays()
    folder = write_python(tmp_path / "src", arrays)
    with tarfile.open(tmp_path / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(folder, arcname=f"./{folder.name}")
        assert all(name.startswith("./") for name in tar.getnames())
    loaded = load_cifar10(tmp_path, download=False)
    assert loaded.source.endswith("cifar-10-python.tar.gz")
    np.testing.assert_array_equal(loaded.train_x, arrays[0])
    np.testing.assert_array_equal(loaded.test_y, arrays[3])


def test_tarball_member_that_is_a_link_is_never_followed(tmp_path):
    """A crafted tarball whose data_batch_1.bin is a symlink (here to data_batch_2.bin, which tarfile would
    resolve inside the archive) counts as missing: links and devices are never read through."""
    folder = write_binary(tmp_path / "src", make_arrays())
    tarball = tmp_path / "cifar-10-binary.tar.gz"
    with tarfile.open(tarball, "w:gz") as tar:
        for path in sorted(folder.iterdir(), key=lambda p: p.name != "data_batch_2.bin"):  # the target first
            if path.name != "data_batch_1.bin":
                tar.add(path, arcname=f"{folder.name}/{path.name}")
        link = tarfile.TarInfo(f"{folder.name}/data_batch_1.bin")
        link.type, link.linkname = tarfile.SYMTYPE, "data_batch_2.bin"
        tar.addfile(link)
    with pytest.raises(DataError, match=r"cifar-10-binary.tar.gz lacks cifar-10-batches-bin/data_batch_1.bin: "
                                        r"it is not the official"):
        load_cifar10(tmp_path, download=False)


def test_tarball_member_larger_than_any_official_file_is_not_read(tmp_path):
    folder = write_binary(tmp_path / "src", make_arrays())
    (folder / "test_batch.bin").write_bytes(bytes(2 * PER_BATCH * 3073 + (1 << 20) + 1))
    pack(folder, tmp_path / "cifar-10-binary.tar.gz")
    with pytest.raises(DataError, match=r"member cifar-10-batches-bin/test_batch.bin claims 1,171,497 bytes.*"
                                        r"not the official cifar-10-binary.tar.gz"):
        load_cifar10(tmp_path, download=False)


def test_data_dir_may_name_the_tarball_but_no_other_file(tmp_path):
    tarball = FORMS["binary-tarball"](tmp_path, make_arrays())
    assert load_cifar10(tarball, download=False).source.endswith(str(tarball))
    other = tmp_path / "notes.txt"
    other.write_text("x")
    with pytest.raises(DataError, match=rf"{other} is a file, not a folder: --data.dir .*names the folder"):
        load_cifar10(other, download=True)  # and no download is attempted into a file's path
    assert other.read_text() == "x"
    impostor = tmp_path / "elsewhere" / "cifar-10-batches-bin"  # a file with a batches folder's name is no folder
    impostor.parent.mkdir()
    impostor.write_text("x")
    with pytest.raises(DataError, match=rf"{impostor} is a file, not a folder"):
        load_cifar10(impostor, download=False)


def test_nothing_found_says_where_to_put_files(tmp_path):
    with pytest.raises(DataError) as caught:
        load_cifar10(tmp_path, download=False)
    message = str(caught.value)
    for needle in ["cifar-10-batches-bin", "data_batch_1.bin", "cifar-10-batches-py", "cifar-10-binary.tar.gz",
                   "cifar-10-python.tar.gz", "FASTTRAIN_DATA", "--data.dir", str(tmp_path)]:
        assert needle in message


# ---------------------------------------------------------------------------------------------------
# Data dir, download


def test_resolve_data_dir_precedence(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FASTTRAIN_DATA", raising=False)
    assert resolve_data_dir(None) == tmp_path / "data"
    monkeypatch.setenv("FASTTRAIN_DATA", str(tmp_path / "from-env"))
    assert resolve_data_dir(None) == tmp_path / "from-env"
    assert resolve_data_dir("flag") == tmp_path / "flag"
    assert resolve_data_dir(str(tmp_path / "abs")) == tmp_path / "abs"


@pytest.fixture
def served_tarball(tmp_path, monkeypatch):
    """The python tarball behind a file:// URL, standing in for the canonical address."""
    arrays = make_arrays(seed=1)
    tarball = pack(write_python(tmp_path / "server" / "src", arrays), tmp_path / "server" / "cifar-10-python.tar.gz")
    monkeypatch.setattr(cifar, "CIFAR10_URL", tarball.as_uri())
    monkeypatch.setattr(cifar, "CIFAR10_MD5", hashlib.md5(tarball.read_bytes()).hexdigest())
    return arrays


def test_download_verifies_md5_and_renames_atomically(tmp_path, served_tarball, capsys):
    root = tmp_path / "fresh" / "data"
    loaded = load_cifar10(root, download=True)
    np.testing.assert_array_equal(loaded.train_x, served_tarball[0])
    assert sorted(p.name for p in root.iterdir()) == ["cifar-10-python.tar.gz"]  # no temp file left
    assert "downloading" in capsys.readouterr().err  # plain progress: pytest's stderr is not a terminal
    again = load_cifar10(root, download=True)  # the second time reads the tarball, no download
    np.testing.assert_array_equal(again.train_x, served_tarball[0])
    assert "downloading" not in capsys.readouterr().err


@pytest.mark.parametrize("name", ["cifar-10-batches-py", "cifar-10-batches-bin", "cifar-10-python.tar.gz"])
def test_a_data_dir_one_level_too_deep_downloads_beside_it(tmp_path, served_tarball, capsys, name):
    """--data.dir named like a form of CIFAR-10 that is not there yet (FASTTRAIN_DATA pointed one level too
    deep): the download goes to its parent, where the next run finds it. Into the path itself, the next run
    took that folder for an unpacked one missing its batches, and under torchrun every rank but the first
    read it so on the first run."""
    root = tmp_path / "data" / name
    load_cifar10(root, download=True)
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["cifar-10-python.tar.gz"]
    assert (tmp_path / "data" / "cifar-10-python.tar.gz").is_file()  # not a folder of that name holding it
    assert "downloading" in capsys.readouterr().err
    again = load_cifar10(root, download=True)
    np.testing.assert_array_equal(again.train_x, served_tarball[0])
    assert "downloading" not in capsys.readouterr().err


def test_downloaded_tarball_gets_the_mode_the_umask_allows(tmp_path, served_tarball):
    """Not mkstemp's 0600: a data folder shared by a team stays readable by it."""
    previous = os.umask(0o022)
    try:
        load_cifar10(tmp_path / "data", download=True)
    finally:
        os.umask(previous)
    assert (tmp_path / "data" / "cifar-10-python.tar.gz").stat().st_mode & 0o777 == 0o644


def test_download_with_wrong_md5_is_deleted(tmp_path, served_tarball, monkeypatch):
    monkeypatch.setattr(cifar, "CIFAR10_MD5", "0" * 32)
    root = tmp_path / "fresh" / "data"
    with pytest.raises(DataError, match=r"md5 is [0-9a-f]{32}, not 0{32}.*deleted"):
        load_cifar10(root, download=True)
    assert list(tmp_path.iterdir()) == [tmp_path / "server"]  # the folders made for the download go with it


def test_download_disabled_never_touches_the_network(tmp_path, monkeypatch):
    """data.download false: an empty folder is an error that says so, and not one request is made (an
    offline cluster node must not hang on a connect timeout, nor a site's policy be broken)."""
    requests = []

    def recorder(url, timeout=None):
        requests.append(url)
        raise URLError("the test forbids the network")

    monkeypatch.setattr(cifar, "urlopen", recorder)
    root = tmp_path / "data"
    root.mkdir()
    with pytest.raises(DataError, match=rf"no CIFAR-10 in {root} \(download disabled\)"):
        load_cifar10(root, download=False)
    with pytest.raises(DataError, match=r"\(download disabled\)"):  # the config's data.download reaches it
        build_data(data_cfg(root, download=False), batch_size=32, eval_batch_size=16, device="cpu",
                   dtype=torch.float32, channels_last=False, seed=0)
    assert requests == [] and list(root.iterdir()) == []


def test_offline_download_says_where_to_put_files(tmp_path, monkeypatch):
    def no_network(url, timeout=None):
        raise URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(cifar, "urlopen", no_network)
    root = tmp_path / "data"
    with pytest.raises(DataError, match=r"(?s)downloading https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz "
                                        r"failed .*name resolution.*cifar-10-batches-bin.*FASTTRAIN_DATA=DIR"):
        load_cifar10(root, download=True)
    assert not root.exists()  # the folder made for the download goes with it
    root.mkdir()  # a folder that was there stays, empty
    with pytest.raises(DataError, match="failed"):
        load_cifar10(root, download=True)
    assert root.is_dir() and list(root.iterdir()) == []


# ---------------------------------------------------------------------------------------------------
# Validation split, build_data


def test_split_validation_holds_out_the_end():
    train_x, train_y, test_x, test_y = make_arrays()
    arrays = cifar.CifarArrays(train_x, train_y, test_x, test_y, CLASSES, "test")
    tx, ty, vx, vy = split_validation(arrays, 30)
    np.testing.assert_array_equal(vx, train_x[-30:])
    np.testing.assert_array_equal(vy, train_y[-30:])
    np.testing.assert_array_equal(tx, train_x[:70])
    np.testing.assert_array_equal(ty, train_y[:70])
    assert len(tx) == 70 and len(vy) == 30
    # disjoint and complete: training part then validation part is the original set, image for image
    np.testing.assert_array_equal(np.concatenate([tx, vx]), train_x)
    np.testing.assert_array_equal(np.concatenate([ty, vy]), train_y)
    assert split_validation(arrays, 0)[2:] == (None, None)
    for bad in (100, -1):  # -1 would hold out nothing and train on all 100, silently
        with pytest.raises(DataError, match=rf"data.val_size={bad} must be in 0..99"):
            split_validation(arrays, bad)


def data_cfg(root, **overrides):
    cfg = dict(dir=str(root), download=False, val_size=10, mean=[0.49, 0.48, 0.45], std=[0.25, 0.24, 0.26])
    return DataConfig(**{**cfg, **overrides})


def test_build_data(tmp_path):
    arrays = make_arrays()
    write_binary(tmp_path, arrays)
    common = dict(eval_batch_size=16, device="cpu", dtype=torch.bfloat16, channels_last=True, seed=3)
    bundle = build_data(data_cfg(tmp_path, train_subset=64, test_subset=12), batch_size=32, **common)
    assert isinstance(bundle, DataBundle) and isinstance(bundle.train, TorchLoader)
    assert (bundle.train.num_samples, bundle.val.num_samples, bundle.test.num_samples) == (64, 10, 12)
    assert bundle.classes == CLASSES and "binary" in bundle.source
    images, labels = next(iter(bundle.val))
    assert images.dtype == torch.bfloat16 and images.shape == (10, 3, 32, 32)
    np.testing.assert_array_equal(labels.numpy(), arrays[1][-10:])  # held out from the end
    assert build_data(data_cfg(tmp_path, val_size=0), batch_size=32, **common).val is None
    for loader in ("torch", "dali"):  # data.cutout reaches the training loader only
        cut = build_data(data_cfg(tmp_path, loader=loader, cutout=8), batch_size=32, **common)
        assert (cut.train.cutout, cut.val.cutout, cut.test.cutout) == (8, 0, 0), loader
    graphs = build_data(data_cfg(tmp_path, loader="dali", dali_graph="sequence"), batch_size=32, **common)
    assert (graphs.train.graph, graphs.val.graph, graphs.test.graph) == ("sequence",) * 3  # DALI's every loader
    assert graphs.source.endswith("; loader DaliLoader (sequence graph)")  # the run's summary names the graph
    assert bundle.source.endswith("; loader TorchLoader")
    with pytest.raises(DataError, match=r"batch_size=64 is larger than .*\(90 images / 2 rank\(s\) = 45\)"):
        build_data(data_cfg(tmp_path), batch_size=64, rank=1, world_size=2, **common)
    with pytest.raises(DataError, match="data.loader must be auto, dali or torch"):
        build_data(data_cfg(tmp_path, loader="pil"), batch_size=32, **common)


def test_build_data_batch_sizes_and_inclusive_limits(tmp_path):
    """Training batches by batch_size, validation and test by eval_batch_size. The limits include their
    ends: a subset as large as the set is the whole set, and a batch of all of a rank's training images is
    one batch per epoch."""
    write_binary(tmp_path, make_arrays())
    common = dict(eval_batch_size=16, device="cpu", dtype=torch.float32, channels_last=False, seed=3)

    def sizes(loader):
        return [len(labels) for _, labels in loader]

    bundle = build_data(data_cfg(tmp_path, val_size=20), batch_size=32, **common)
    assert (sizes(bundle.train), sizes(bundle.val), sizes(bundle.test)) == ([32, 32], [16, 4], [16, 4])
    whole = build_data(data_cfg(tmp_path, train_subset=90, test_subset=PER_BATCH), batch_size=90, **common)
    assert (len(whole.train_images), whole.test_images, sizes(whole.train)) == (90, PER_BATCH, [90])
    for key, count in (("train_subset", 91), ("test_subset", PER_BATCH + 1)):
        with pytest.raises(DataError, match=rf"data\.{key}={count} must be in 0\.\.{count - 1} "):
            build_data(data_cfg(tmp_path, **{key: count}), batch_size=32, **common)
    second_rank = build_data(data_cfg(tmp_path), batch_size=45, rank=1, world_size=2, **common)  # 90 / 2 ranks
    assert sizes(second_rank.train) == [45]


@pytest.mark.parametrize("loader, graph", [("torch", "samples"), ("dali", "samples"), ("dali", "sequence"),
                                           ("dali", "slice")])
def test_build_data_hands_crop_and_flip_settings_to_the_training_loader(tmp_path, loader, graph):
    """data.crop_padding, data.flip and data.flip_mode reach the training loader, read back from its pixels:
    padding 2 crops at offsets 0..4 (not the loaders' default 4), flip false never mirrors (flip_mode
    alternating included), and flip_mode alternating mirrors each image in exactly one of epochs 0 and 1.
    With DALI, through each of its graphs (data.dali_graph)."""
    write_binary(tmp_path, make_arrays())
    common = dict(eval_batch_size=16, device="cpu", dtype=torch.float32, channels_last=False, seed=3)

    def augmentation(epoch, **settings):
        """Per training image (by index): its (row offset, col offset, flip) in `epoch`."""
        cfg = data_cfg(tmp_path, loader=loader, dali_graph=graph, mean=[0.0] * 3, std=[1.0] * 3,
                       **settings)  # output = x / 255
        bundle = build_data(cfg, batch_size=30, **common)
        assert getattr(bundle.train, "graph", "samples") == graph
        bundle.train.set_epoch(epoch)
        pixels = torch.round(torch.cat([images for images, _ in bundle.train]) * 255)
        order = epoch_draws(3, epoch, 90, 0, False).order  # the shuffle (drawn first): the same for any setting
        assert len(pixels) == len(order) == 90  # 3 batches of 30 hold every image
        found = recover_crops(pixels, bundle.train_images[order.numpy()], settings["crop_padding"])
        return found[order.argsort()]

    cropped = augmentation(0, crop_padding=2, flip=False, flip_mode="alternating")
    assert set(cropped[:, :2].flatten().tolist()) == set(range(5))  # 0..4, both ends reached
    assert not cropped[:, 2].any()
    flips = [augmentation(e, crop_padding=0, flip=True, flip_mode="alternating")[:, 2] for e in (0, 1)]
    assert torch.equal(flips[1], 1 - flips[0]) and 0 < flips[0].sum() < 90


@pytest.mark.parametrize("loader", ["torch", "dali"])
def test_build_data_test_only_builds_the_test_loader_alone(tmp_path, loader):
    """Scoring a checkpoint (`fasttrain eval`) needs no training loader: none is built (no 240 MB of padded
    training images on the GPU), and the test batches are the full bundle's."""
    write_binary(tmp_path, make_arrays())
    common = dict(eval_batch_size=16, device="cpu", dtype=torch.float32, channels_last=False, seed=3)
    full = build_data(data_cfg(tmp_path, loader=loader, test_subset=12), batch_size=32, **common)
    alone = build_data(data_cfg(tmp_path, loader=loader, test_subset=12), batch_size=10_000, test_only=True, **common)
    assert alone.train is None and alone.val is None and alone.train_images is None
    assert alone.test_images == 12 and "test 12 images" in alone.source
    for (x_full, y_full), (x_alone, y_alone) in zip(full.test, alone.test, strict=True):
        assert torch.equal(x_full, x_alone) and torch.equal(y_full, y_alone)


# ---------------------------------------------------------------------------------------------------
# The real data set (CI sets FASTTRAIN_DATA)


def test_real_cifar10(monkeypatch, cifar_dir):
    monkeypatch.setattr(cifar, "RECORDS_PER_BATCH", 10_000)
    arrays = load_cifar10(cifar_dir, download=False)
    assert arrays.train_x.shape == (50_000, 32, 32, 3) and arrays.test_x.shape == (10_000, 32, 32, 3)
    assert arrays.train_x.dtype == np.uint8 and arrays.train_y.dtype == np.int64
    assert np.bincount(arrays.train_y).tolist() == [5_000] * 10
    assert np.bincount(arrays.test_y).tolist() == [1_000] * 10
    assert arrays.classes == CLASSES
    # the first training image is a frog, the first test image a cat (official order)
    assert (arrays.train_y[0], arrays.test_y[0]) == (6, 3)
    assert abs(arrays.train_x.mean() / 255 - 0.473) < 0.01
