"""The Lanczos basis kept on disk (for k·P floats that fit in no memory) gives the in-memory result."""

import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from lossatlas.estimators import lanczos_eigs

MAPS = Path("/proc/self/maps")


def _spectrum_matrix(P: int = 300) -> torch.Tensor:
    g = torch.Generator().manual_seed(9)
    Q, _ = torch.linalg.qr(torch.randn(P, P, generator=g, dtype=torch.float64))
    ev = torch.cat([torch.linspace(0, 1, P - 3, dtype=torch.float64), torch.tensor([4.0, 6.0, 9.0], dtype=torch.float64)])
    return (Q * ev) @ Q.T, ev


def test_basis_on_disk_gives_the_same_eigenpairs_and_leaves_no_file(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # $TMPDIR for this test
    A, ev = _spectrum_matrix()
    mapped = []

    def progress(step, total):  # while the run goes: is a file of tmp_path mapped into this process?
        if MAPS.exists():
            mapped.append(str(tmp_path) in MAPS.read_text())

    ram = lanczos_eigs(A, k=3, tol=1e-10, seed=0, basis_device="cpu")
    disk = lanczos_eigs(A, k=3, tol=1e-10, seed=0, basis_device="disk", progress=progress)
    np.testing.assert_allclose(disk.eigenvalues, ram.eigenvalues, rtol=1e-13, atol=0)
    np.testing.assert_allclose(disk.eigenvalues, [9.0, 6.0, 4.0], rtol=1e-10)
    torch.testing.assert_close(disk.eigenvectors, ram.eigenvectors, rtol=0, atol=1e-12)
    assert disk.matvecs == ram.matvecs and disk.eigenvectors.device.type == "cpu"
    if MAPS.exists():
        assert mapped and all(mapped)  # the basis lived in a file under $TMPDIR during the run
        assert str(tmp_path) not in MAPS.read_text()  # and was unmapped after it
    assert list(tmp_path.iterdir()) == []  # no file left behind


def test_basis_on_disk_refuses_a_dtype_numpy_cannot_map():
    A, _ = _spectrum_matrix(40)
    with pytest.raises(ValueError, match="float32 or float64"):
        lanczos_eigs(A.to(torch.bfloat16), k=1, basis_device="disk")
