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
    from lossatlas.probes.hessian import HessianProbe
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
    run_probe(run, HessianProbe(top_k=2, blocks="layers"), opts)  # real λ_max with its stability threshold
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


# a JSON object or array as json.dumps writes it: {"key": ... or [{"key": ...
RAW_JSON = re.compile(r'[{\[]\s*"[^"\n]{1,80}"\s*:')


def _page_state(driver) -> dict:
    """What a reader sees: the page's visible text, its section order, the summary and the plotly layouts."""
    return driver.execute_script("""
        const plots = [...document.querySelectorAll('.js-plotly-plot')];
        const sum = document.querySelector('#summary');
        return {
          text: document.body.innerText,
          sections: [...document.querySelectorAll('main > section')].map(s => s.id),
          summary_top: sum ? sum.getBoundingClientRect().top : null,
          summary_bottom: sum ? sum.getBoundingClientRect().bottom : null,
          glance: sum ? sum.querySelector('.glance').innerText : '',
          findings: sum ? [...sum.querySelectorAll('ul.findings li')].map(li => li.innerText) : [],
          annotations: plots.flatMap(p => ((p.layout || {}).annotations || []).map(a => a.text || '')),
          plots: plots.map(p => ({title: ((p.layout || {}).title || {}).text || '',
                                  axes: (p.data || []).map(t => (t.name || '') + '@' + (t.yaxis || 'y'))})),
        };""")


def _stored(run_path: Path, probe: str) -> list:
    """The real (not synthetic) Results of ``probe`` stored for the fixture's run, in step order."""
    from lossatlas.store import ResultsStore, default_results_path

    store = ResultsStore(default_results_path(run_path), mode="r")
    entries = [e for e in store.entries(probe) if e["key"] != "synthetic"]
    found = [store.read(probe, e["key"], e["step"])[0] for e in entries]
    return sorted(found, key=lambda r: r.step)


def test_report_opens_with_the_summary(report, tmp_path):
    """The first screen is the run at a glance and the findings, checked against the stored numbers; the page
    shows no raw JSON (not even with every fold opened), a constant η is a sentence and not a panel, and loss
    and accuracy have an axis each."""
    import math

    from test_figures import LR

    from lossatlas.store import RunReader

    run_path = report.parent / "run.h5"
    reader = RunReader(run_path)
    params = reader.checkpoint(reader.steps()[-1]).params
    n_params = sum(math.prod(t.shape) for t in params.values())  # counted from the tensors themselves
    beta = float(reader.optimizer["defaults"]["momentum"])
    threshold = 2.0 * (1.0 + beta) / LR  # heavy-ball stability threshold 2(1+β)/η, closed form
    lam = [float(np.max(r.values["top_eigenvalues"])) for r in _stored(run_path, "hessian")]
    peak = max(lam) / threshold
    last_blocks = _stored(run_path, "hessian_blocks")[-1]  # the per-layer part, stored beside the Hessian's own
    blocks = np.asarray(last_blocks.values["block_top_eigenvalues"]).max(axis=1)
    names = [str(n) for n in last_blocks.coords["block"]]
    sharpest = names[int(np.argmax(blocks))]

    driver = chromium_driver(tmp_path / "profile")
    try:
        driver.set_window_size(1300, 900)
        driver.get(report.resolve().as_uri())
        deadline = time.time() + 60
        while time.time() < deadline and driver.execute_script("return document.readyState") != "complete":
            time.sleep(0.25)
        time.sleep(1.0)  # let plotly lay the figures out
        state = _page_state(driver)
        shot = Path("/tmp/lossatlas_report_first_screen.png")
        for path in (tmp_path / "first_screen.png", shot):
            assert driver.save_screenshot(str(path))
        driver.execute_script("document.querySelectorAll('details').forEach(d => d.open = true)")
        unfolded = driver.execute_script("return document.body.innerText")
        height = driver.execute_script("return document.documentElement.scrollHeight")
        driver.set_window_size(1300, min(int(height) + 40, 16000))
        driver.save_screenshot("/tmp/lossatlas_report_unfolded.png")
    finally:
        driver.quit()

    assert state["sections"][0] == "summary", f"the page opens with {state['sections'][:3]}"
    assert state["summary_top"] < 200 and state["summary_bottom"] < 900, "the summary does not fit the first screen"
    assert f"{n_params:,}" in state["glance"], state["glance"]
    assert "mlp" in state["glance"] and "digits" in state["glance"]
    topics = {f.split(":")[0] for f in state["findings"]}
    assert {"Loss", "Spikes", "Edge of stability", "Collapse", "Sharpest layer"} <= topics, state["findings"]
    eos = next(f for f in state["findings"] if f.startswith("Edge of stability"))
    assert f"{peak:.2f}" in eos, (eos, peak)
    assert ("not reached" in eos) == (peak < 0.9), eos
    assert f"{threshold:.3g}" in eos, (eos, threshold)
    layer = next(f for f in state["findings"] if f.startswith("Sharpest layer"))
    assert sharpest in layer and f"{blocks.max():.3g}" in layer, (layer, sharpest, blocks)

    for text in (state["text"], unfolded):
        found = RAW_JSON.search(text)
        assert found is None, f"raw JSON on the page: {text[max(0, found.start() - 60):found.end() + 60]!r}"
    sentence = f"learning rate η = {LR:.4g} throughout (constant)."
    assert sentence in state["text"]
    assert not [a for a in state["annotations"] if "learning rate" in a], "a constant η still gets a panel"
    loss_plot = next(p for p in state["plots"] if "evaluated loss and accuracy" in p["title"])
    axes = dict(a.rsplit("@", 1) for a in loss_plot["axes"])
    assert axes["loss"] != axes["accuracy (%)"], f"loss and accuracy share an axis: {axes}"

    from PIL import Image

    img = np.asarray(Image.open(tmp_path / "first_screen.png").convert("L"), dtype=np.float64)
    assert img.std() > 10, "the first screen is (nearly) uniform: nothing was painted"
