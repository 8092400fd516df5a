"""`lossatlas demo` (the README's first command) end to end, on a short run."""

import h5py

from lossatlas.demo import run_demo


def test_demo_writes_every_output(tmp_path):
    out = run_demo(tmp_path / "demo", steps=60)
    assert set(out) >= {"run", "results", "diagnosis", "report"}
    for path in out.values():
        assert path.exists() and path.stat().st_size > 0, path
    figures = [k for k in out if k.endswith((".png", ".pdf", ".svg", ".html"))]
    assert len(figures) >= 10
    html = out["report"].read_text()
    assert "<html" in html.lower() and "plotly" in html.lower()
    with h5py.File(out["run"], "r") as f:
        assert f.attrs["lossatlas_format"] == "run"
        assert f["log"]["grad_norm"].shape[0] == 60  # telemetry every step
