"""HDF5 access for the store: opening, errors, the header check, names, JSON attributes and tensors.

Files open with lock retries; HDF5's errors become one-line UserErrors; the lossatlas header is checked; names are
escaped for HDF5 paths; attributes are JSON; tensors are numpy arrays holding the same bits (every torch dtype
round-trips, bfloat16 and float8 as their raw bits).

HDF5 errors are told apart by type where h5py says enough (``FileNotFoundError``; ``BlockingIOError``
for a held file lock; an ``OSError`` whose ``errno`` h5py read from HDF5's report, as ENOSPC). For the
rest h5py raises a bare ``OSError`` and only HDF5's message tells: ``hdf5_says`` is the one place
that reads it.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import h5py
import numpy as np

from lossatlas.errors import UserError

if TYPE_CHECKING:  # torch is imported where a tensor is built, so that reading metadata stays torch-free
    from torch import Tensor

FORMAT_VERSION = 1  # the run file's format
# the results file's format: 2 labels every axis with an HDF5 dimension scale (netCDF-4 readable); 1 is read too
RESULTS_FORMAT_VERSION = 2
LOCK_WAIT_S = 30.0  # how long an open waits for another process's HDF5 file lock

# what an HDF5 error means, where h5py's exception type does not say it
LOCKED = "locked"
NOT_HDF5 = "not HDF5"
TRUNCATED = "truncated"
OPEN_FOR_WRITE = "open for write"
DISK_FULL = "disk full"

# the HDF5 messages (HDF5 1.10 to 2.0) that carry each meaning
_HDF5_MESSAGES: dict[str, tuple[str, ...]] = {
    # "unable to lock file, errno = 11|13": the lock is held (HDF5 built with fcntl locks reports EACCES)
    LOCKED: ("unable to lock file",),
    # "file signature not found": no HDF5 superblock, as in a text file or an empty file
    NOT_HDF5: ("signature",),
    # "truncated file: eof = ..., stored_eof = ...": shorter than its superblock says
    TRUNCATED: ("truncated file",),
    # "file is already open for write (may use <h5clear file> ...)", "... open for write/SWMR write",
    # "file is not already open for SWMR writing", "SWMR read access flag not the same for file that
    # is already open": the superblock's open-for-write flags are set (a writer is attached or was
    # killed outside SWMR), or this process holds the file open with other SWMR flags
    OPEN_FOR_WRITE: ("open for", "SWMR"),
    # "file write failed: ..., errno = 28, error message = 'No space left on device'" when h5py
    # did not lift the errno out of the report
    DISK_FULL: ("No space left on device", "Disk quota exceeded", f"errno = {errno.ENOSPC},",
                f"errno = {errno.EDQUOT},"),
}


def write_plain(path: str | Path, arrays: dict[str, np.ndarray]) -> Path:
    """Write ``arrays`` as top-level datasets of a new HDF5 file (no lossatlas layout), for other tools' readers."""
    path = Path(path)
    with h5py.File(path, "w") as f:
        for name, arr in arrays.items():
            f[name] = arr
    return path


def hdf5_says(e: BaseException, meaning: str) -> bool:
    """Whether the HDF5 message in ``e`` says ``meaning``: the one place that reads HDF5's error text.

    ``meaning`` is LOCKED, NOT_HDF5, TRUNCATED, OPEN_FOR_WRITE or DISK_FULL.

    h5py raises a bare ``OSError`` (no errno, no subclass) when HDF5 finds no signature, a truncated
    file or set open-for-write flags, so only the text tells these apart; ``_HDF5_MESSAGES`` lists the
    messages recognised for each meaning.
    """
    text = str(e)
    return any(s in text for s in _HDF5_MESSAGES[meaning])


def open_failure(e: OSError) -> str | None:
    """Why ``h5py.File`` could not open a file: LOCKED, NOT_HDF5, TRUNCATED, OPEN_FOR_WRITE or None.

    None is another reason. A held lock is a ``BlockingIOError`` (h5py's errno EAGAIN); the rest only HDF5's
    message tells.
    """
    if isinstance(e, BlockingIOError):
        return LOCKED
    for meaning in (LOCKED, NOT_HDF5, TRUNCATED, OPEN_FOR_WRITE):
        if hdf5_says(e, meaning):
            return meaning
    return None


class OpenError(UserError):
    """A file ``open_h5`` could not open, a UserError saying why and how to fix it.

    ``failure`` says why (see ``open_failure``; None: another reason) and ``what`` is the message's first part,
    without the path and the fix.
    """

    def __init__(self, path: Path, failure: str | None, what: str, fix: str) -> None:
        super().__init__(f"{path}: {what}; {fix}")
        self.failure, self.what = failure, what


def open_h5(path: Path, mode: str, **kwargs: Any) -> h5py.File:
    """``h5py.File`` with a retry while another process holds its lock, and one-line errors (OpenError)."""
    deadline = time.monotonic() + LOCK_WAIT_S
    while True:
        try:
            return h5py.File(path, mode, **kwargs)
        except FileNotFoundError:
            raise OpenError(path, None, "no such file", "check the path") from None
        except OSError as e:
            failure = open_failure(e)
            if failure == LOCKED and time.monotonic() < deadline:
                time.sleep(0.05)
                continue
            if failure == LOCKED:
                raise OpenError(path, LOCKED, "another process holds the file locked", "wait for it to finish "
                                "(a run written with swmr=False cannot be read while it is written)") from None
            if failure == NOT_HDF5:
                raise OpenError(path, NOT_HDF5, "not an HDF5 file",
                                "pass a lossatlas run file (.h5) or results file") from None
            raise OpenError(path, failure, f"cannot open the HDF5 file ({e})", "it may be damaged or in use") from None


@contextlib.contextmanager
def damage_is_user_error(path: Path) -> Iterator[None]:
    """Turn an HDF5 error while reading ``path`` (a damaged block) into a UserError."""
    try:
        yield
    except OSError as e:
        raise UserError(f"{path}: cannot read the file ({first_line(e)}); it was truncated or corrupted — "
                        "restore it from a copy") from None


def first_line(e: BaseException) -> str:
    """The first line of an error's message (at most 200 characters), for a one-line UserError."""
    lines = str(e).strip().splitlines()
    return (lines[0] if lines else type(e).__name__)[:200]


def check_kind(f: h5py.File, path: Path, want: str | None) -> str:
    """``"run"`` or ``"results"`` from the header of ``f``.

    Raises UserError for another file, a newer format, or (with ``want``) the other kind.
    """
    kind = f.attrs.get("lossatlas_format")
    if kind not in ("run", "results"):
        raise UserError(f"{path}: an HDF5 file but not a lossatlas file (no lossatlas_format attribute); "
                        "pass a run file written by lossatlas (see `lossatlas import`)")
    version = int(f.attrs.get("format_version", 0))
    newest = RESULTS_FORMAT_VERSION if kind == "results" else FORMAT_VERSION
    if version > newest:
        raise UserError(f"{path}: written by a newer lossatlas (format_version {version}, this one reads "
                        f"{newest}); upgrade lossatlas (pip install -U lossatlas)")
    if want is not None and kind != want:
        hint = "pass the run file, not its .results.h5" if want == "run" else "pass a results file"
        raise UserError(f"{path}: a lossatlas {kind} file, not a {want} file; {hint}")
    return kind


# -- names, JSON and tensors --------------------------------------------------------------------
@functools.lru_cache(maxsize=8192)  # the log escapes the same names every step
def escape(name: str) -> str:
    """A name as an HDF5 link name: '%' -> '%25', '/' -> '%2F' ('', '.' and '..' are refused)."""
    if not isinstance(name, str) or name in ("", ".", ".."):
        raise ValueError(f"invalid name {name!r}: names must be non-empty strings other than '.' and '..'")
    return name.replace("%", "%25").replace("/", "%2F")


def unescape(name: str) -> str:
    """The name ``escape`` was given."""
    return name.replace("%2F", "/").replace("%25", "%")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    torch = sys.modules.get("torch")  # a torch dtype can only reach here once torch is imported
    if torch is not None and isinstance(obj, torch.dtype):
        return str(obj).removeprefix("torch.")
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON-serialisable")


def dumps(obj: Any, what: str) -> str:
    """``obj`` as JSON with sorted keys (numpy values, dtypes, sets and paths as plain JSON).

    Raises ValueError naming ``what`` for anything else.
    """
    try:
        return json.dumps(obj, default=_json_default, sort_keys=True)
    except TypeError as e:
        raise ValueError(f"{what} must be JSON-able (dicts, lists, numbers, strings): {e}") from None


# dtypes numpy cannot hold, by torch dtype name: stored as their raw bits (the torch view dtype, the numpy dtype)
_RAW_BITS: dict[str, tuple[str, np.dtype]] = {
    "bfloat16": ("int16", np.dtype(np.uint16)),
    **{n: ("uint8", np.dtype(np.uint8)) for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")},
}


def tensor_to_numpy(value: Any, what: str) -> tuple[np.ndarray, str]:
    """A tensor as a numpy array holding the same bits, and the torch dtype's name."""
    import torch  # lazily: only writers build tensors' bits (readers of metadata never import torch)

    t = torch.as_tensor(value).detach()
    name = str(t.dtype).removeprefix("torch.")
    t = t.cpu().resolve_conj().resolve_neg().contiguous()
    if name in _RAW_BITS:
        int_dtype, np_dtype = _RAW_BITS[name]
        return t.view(getattr(torch, int_dtype)).numpy().view(np_dtype), name
    try:
        return t.numpy(), name
    except TypeError as e:
        raise ValueError(f"{what}: cannot store a tensor of dtype {t.dtype}: {e}") from None


def numpy_to_tensor(arr: np.ndarray, dtype_name: str) -> "Tensor":
    """The tensor of torch dtype ``dtype_name`` whose bits ``arr`` holds (the inverse of ``tensor_to_numpy``)."""
    import torch  # lazily: the first tensor a reader builds imports torch, never a metadata read

    dtype = getattr(torch, dtype_name)
    arr = np.asarray(arr)  # h5py hands back a numpy scalar for a 0-d row
    if not arr.flags.c_contiguous:
        arr = arr.copy()
    if dtype_name in _RAW_BITS:
        int_dtype, _ = _RAW_BITS[dtype_name]
        return torch.from_numpy(arr.view(int_dtype)).view(dtype)
    return torch.from_numpy(arr)
