"""The HTML report in a real browser: headless Chromium opens it through file://, every plotly figure renders
with data, the console stays free of errors and no request leaves the file (no CDN, no network).

Needs Debian's chromium + chromium-driver (/usr/bin/chromium, /usr/bin/chromedriver) and selenium; skips only
when /usr/bin/chromium is absent.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
LOCAL_SCHEMES = {"file", "data", "blob", "about"}  # none of these leaves the machine


def chromium_driver(profile: Path):
    """A headless Chromium WebDriver with browser-console and network (performance) logging, no network services."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is needed to drive chromium")
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    opts = Options()
    opts.binary_location = str(CHROMIUM)
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1300,900", f"--user-data-dir={profile}",
                 # WebGL (the 3-D surface) on the CPU rasteriser, since there is no GPU
                 "--use-angle=swiftshader", "--enable-unsafe-swiftshader"):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    driver_path = CHROMEDRIVER if CHROMEDRIVER.exists() else shutil.which("chromedriver")
    if driver_path is None:
        pytest.fail("chromium is installed but chromedriver is not: apt-get install chromium-driver")
    return webdriver.Chrome(options=opts, service=Service(str(driver_path)))


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """A report of a real run with landscape, collapse, loss and (synthetic) Hessian results."""
    if not CHROMIUM.exists():
        pytest.skip("/usr/bin/chromium not found (apt-get install chromium chromium-driver)")
    from test_figures import HESSIAN_STEPS, LR, TINY_MLP, hessian_result

    from lossatlas.analysis.reporting import report_command
    from lossatlas.analysis.runner import RunOptions, default_results_path, run_probe
    from lossatlas.probes.collapse import NeuralCollapse
    from lossatlas.probes.connectivity import Interpolate
    from lossatlas.probes.loss import Loss
    from lossatlas.probes.surface import Surface
    from lossatlas.store import ResultsStore, RunReader
    from lossatlas.train import TrainConfig, train

    d = tmp_path_factory.mktemp("browser")
    run = d / "run.h5"
    train(TrainConfig(model=TINY_MLP, data={"name": "digits"}, lr=LR, steps=20, batch_size=64, checkpoint_every=5),
          str(run))
    opts = RunOptions(steps="all", max_examples=256)
    run_probe(run, Loss(), opts)
    run_probe(run, NeuralCollapse(), opts)
    run_probe(run, Surface(dims=2, xrange=(-1.0, 1.0, 7), quadratic_check=False), RunOptions(steps="last", max_examples=256))
    run_probe(run, Interpolate(to_step=20, alphas=(0.0, 1.0, 9)), RunOptions(steps=[0], max_examples=256))
    with ResultsStore(default_results_path(run), run_fingerprint=RunReader(run).fingerprint()) as store:
        for s in HESSIAN_STEPS:
            store.write(hessian_result(s), key="synthetic")
    return report_command(run, output=d / "report.html")


def test_report_renders_offline_in_chromium(report, tmp_path):
    html = report.read_text()
    expected = len(re.findall(r'<div id="plot-\d+"', html))
    assert expected >= 8
    driver = chromium_driver(tmp_path / "profile")
    try:
        driver.get("about:blank")
        driver.get_log("performance")  # drop what the browser loaded by itself (its new-tab page)
        driver.get_log("browser")
        driver.get(report.resolve().as_uri())
        deadline = time.time() + 60
        state = None
        while time.time() < deadline:
            state = driver.execute_script(
                "const d = [...document.querySelectorAll('.js-plotly-plot')];"
                "return {ready: document.readyState, plots: d.length,"
                "        traces: d.map(p => (p.data || []).length), ids: d.map(p => p.id),"
                "        drawn: d.map(p => !!p._fullLayout && p.querySelectorAll('.main-svg').length > 0)};")
            if state["ready"] == "complete" and state["plots"] >= expected and all(state["drawn"]):
                break
            time.sleep(0.25)
        assert state["plots"] == expected, f"{state['plots']} of {expected} plotly figures rendered"
        assert all(n > 0 for n in state["traces"]), f"a figure holds no data: {dict(zip(state['ids'], state['traces']))}"
        assert all(state["drawn"]), f"a figure was not drawn: {dict(zip(state['ids'], state['drawn']))}"
        has_gl = driver.execute_script("return document.querySelectorAll('.js-plotly-plot .gl-container canvas').length")
        assert has_gl >= 1, "the 3-D surface drew no WebGL canvas"

        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert not errors, f"console errors: {errors}"
        urls = []
        for entry in driver.get_log("performance"):
            msg = json.loads(entry["message"])["message"]
            if msg["method"] == "Network.requestWillBeSent":
                urls.append(msg["params"]["request"]["url"])
        assert urls and urls[0].startswith("file:"), urls[:3]
        remote = [u for u in urls if urlparse(u).scheme not in LOCAL_SCHEMES]
        assert not remote, f"the report made network requests: {remote}"

        height = driver.execute_script("return document.documentElement.scrollHeight")
        driver.set_window_size(1300, min(int(height) + 40, 16000))
        shot = tmp_path / "report.png"
        assert driver.save_screenshot(str(shot))
        from PIL import Image

        img = np.asarray(Image.open(shot).convert("L"), dtype=np.float64)
        assert img.std() > 10, "the screenshot is (nearly) uniform: nothing was painted"
    finally:
        driver.quit()
