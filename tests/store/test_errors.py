"""HDF5's errors as the store tells them apart (lossatlas/store/h5.py): by exception type and errno where
h5py gives them, by HDF5's message where it raises a bare OSError, each case from a real file."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from lossatlas.store import RunReader, RunWriter
from lossatlas.store import h5 as store_h5
from lossatlas.store.h5 import LOCKED, NOT_HDF5, OPEN_FOR_WRITE, TRUNCATED, OpenError, open_failure, open_h5
from lossatlas.store.integrity import disk_full


def h5py_error(path: Path) -> OSError:
    """The error h5py raises opening ``path`` for reading."""
    with pytest.raises(OSError) as info:
        h5py.File(path, "r")
    return info.value


def test_open_failures_from_real_files(tmp_path: Path) -> None:
    text = tmp_path / "notes.h5"
    text.write_text("not HDF5 at all")
    empty = tmp_path / "empty.h5"
    empty.touch()
    whole = tmp_path / "whole.h5"
    with h5py.File(whole, "w", libver="latest") as f:
        f["x"] = np.arange(50_000.0)
    cut = tmp_path / "cut.h5"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    assert open_failure(h5py_error(text)) == NOT_HDF5 and open_failure(h5py_error(empty)) == NOT_HDF5
    assert open_failure(h5py_error(cut)) == TRUNCATED
    with pytest.raises(OpenError) as info:
        open_h5(tmp_path / "missing.h5", "r")
    assert info.value.failure is None and info.value.what == "no such file"

    run = tmp_path / "run.h5"
    with RunWriter(run, model_spec=None) as w:
        w.write_checkpoint(0, {"w": torch.arange(3.0)})
    code = "import h5py, sys, time; f = h5py.File(sys.argv[1], 'r+'); print('open', flush=True); time.sleep(60)"
    child = subprocess.Popen([sys.executable, "-c", code, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "open"
        held = h5py_error(run)  # another process holds HDF5's lock: typed, no message needed
        assert isinstance(held, BlockingIOError) and open_failure(held) == LOCKED
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
    assert open_failure(h5py_error(run)) == OPEN_FOR_WRITE  # the dead writer left its flags set
    assert RunReader(run).steps() == [0]  # read through the recovery view


def test_a_held_lock_is_retried_then_refused(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "held.h5"
    with h5py.File(path, "w") as f:
        f["x"] = 1
    code = "import h5py, sys, time; f = h5py.File(sys.argv[1], 'r+'); print('open', flush=True); time.sleep(60)"
    child = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE, text=True)
    monkeypatch.setattr(store_h5, "LOCK_WAIT_S", 0.3)
    try:
        assert child.stdout.readline().strip() == "open"
        t = time.monotonic()
        with pytest.raises(OpenError, match="another process holds the file locked") as info:
            open_h5(path, "r")
        assert info.value.failure == LOCKED and time.monotonic() - t >= 0.3
    finally:
        child.kill()
        child.wait(timeout=30)
    with open_h5(path, "r") as f:  # released: opens at once
        assert f["x"][()] == 1


def test_disk_full_by_errno_or_by_hdf5_message() -> None:
    assert disk_full(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    assert disk_full(OSError(errno.EDQUOT, os.strerror(errno.EDQUOT)))
    wrapped = RuntimeError("flush failed")
    wrapped.__cause__ = OSError("Can't write data (file write failed: errno = 28, error message = "
                                "'No space left on device')")
    assert disk_full(wrapped)
    assert not disk_full(OSError(errno.EACCES, "Permission denied"))
    assert not disk_full(OSError("Unable to synchronously open file (truncated file: eof = 1)"))
