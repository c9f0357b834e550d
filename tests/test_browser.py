"""The MLflow UI and the comparison report, opened in a real headless browser (Debian's chromium,
driven by Playwright): the runs table of a gradlab experiment lists the matrix and its children, a
run's grad/norm chart renders, and the report's table and figures render. Slow: it starts an
MLflow server and a browser (`pip install -e '.[browser]'`; chromium from Debian's package)."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from conftest import PYTHON, TINY, store_uri

pytestmark = pytest.mark.slow

ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if not found and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, timeout=600)
        subprocess.run(["apt-get", "install", "-y", "-qq", "chromium"], env=env, capture_output=True, timeout=1800)
        found = shutil.which("chromium")
    if not found:
        pytest.skip("no chromium: install Debian's chromium package (apt-get install chromium)")
    return found


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install -e '.[browser]' (Playwright)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium(), args=ARGS)
        yield b
        b.close()


def not_blank(png: Path) -> bool:
    import matplotlib.image as mpimg

    img = mpimg.imread(png)
    return img.ndim == 3 and img.shape[0] >= 600 and float(np.std(img[..., :3])) > 0.02


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A tiny matrix (2 scenarios x none/clip, 1 seed) and its report."""
    from gradlab.matrix import run_matrix, spec_from_dict
    from gradlab.report import select_runs, write_report

    tmp = tmp_path_factory.mktemp("browser")
    uri = store_uri(tmp / "store")
    spec = spec_from_dict({
        "experiment": "browser", "seeds": [0], "stabilizers": ["none", "clip"],
        "scenarios": [{"name": "calm", "experiment": None, "overrides": ["optimizer=sgd", "optimizer.lr=0.5"]},
                      {"name": "blowup", "experiment": None, "overrides": ["optimizer=sgd", "optimizer.lr=1e10"]}],
        "overrides": ["data=synthetic", "trainer.max_steps=40", "trainer.device=cpu", "trainer.progress=false", *TINY]})
    cwd = os.getcwd()
    os.chdir(tmp)
    try:
        result = run_matrix(spec, tmp / "runs.json", uri=uri, log=lambda line: None)
        write_report(select_runs(tmp / "runs.json"), tmp / "reports")
    finally:
        os.chdir(cwd)
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    return {"tmp": tmp, "uri": uri, "result": result, "client": client,
            "experiment": client.get_experiment_by_name("browser").experiment_id}


@pytest.fixture(scope="module")
def server(store):
    port = free_port()
    proc = subprocess.Popen([str(Path(PYTHON).parent / "mlflow"), "server", "--backend-store-uri", store["uri"],
                             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=store["tmp"])
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while True:
        try:
            urllib.request.urlopen(url + "/health", timeout=2)
            break
        except OSError:
            if time.time() > deadline or proc.poll() is not None:
                proc.kill()
                pytest.fail("mlflow server did not start")
            time.sleep(0.5)
    yield url
    proc.terminate()
    proc.wait(timeout=30)


def test_runs_table_lists_the_matrix_and_its_children(store, server, browser):
    page = browser.new_page(viewport={"width": 1500, "height": 1000})
    # workflowType=machine_learning: MLflow 3.17's "Model training" view (it opens in its GenAI view otherwise)
    page.goto(f"{server}/#/experiments/{store['experiment']}/runs?workflowType=machine_learning")
    parent = store["client"].get_run(store["result"]["parent_run_id"]).info.run_name
    page.get_by_text(parent).first.wait_for(timeout=60000)
    # the matrix's child runs are nested under it: the row's first button expands them
    page.locator("[role=row]", has_text=parent).first.locator("button").first.click()
    children = [store["client"].get_run(r).info.run_name for r in store["result"]["run_ids"]]
    for name in children:
        page.get_by_text(name).first.wait_for(timeout=30000)
    assert page.get_by_text("synthetic").count() >= 1  # the Datasets column
    shot = store["tmp"] / "runs.png"
    page.screenshot(path=str(shot))
    assert not_blank(shot)


def test_grad_norm_chart_renders(store, server, browser):
    page = browser.new_page(viewport={"width": 1500, "height": 1000})
    run_id = store["result"]["run_ids"][0]
    page.goto(f"{server}/#/experiments/{store['experiment']}/runs/{run_id}/model-metrics?workflowType=machine_learning")
    page.get_by_placeholder("Search metric charts").fill("grad/norm")
    page.locator(".js-plotly-plot").first.wait_for(timeout=60000)
    assert page.get_by_text("(grad/norm)").count() >= 1  # the chart's legend: <run name> (grad/norm)
    assert page.locator(".js-plotly-plot .scatterlayer path").count() >= 1  # a drawn line
    shot = store["tmp"] / "chart.png"
    page.screenshot(path=str(shot))
    assert not_blank(shot)


def test_report_renders(store, browser):
    page = browser.new_page(viewport={"width": 1500, "height": 1000})
    page.goto((store["tmp"] / "reports" / "report.html").as_uri())
    assert page.get_by_text("Gradient-explosion remedies").count() >= 1
    assert page.locator("table tr").count() >= 5  # header + 4 cells
    widths = page.eval_on_selector_all("img", "imgs => imgs.map(i => i.naturalWidth)")
    assert widths and all(w > 100 for w in widths)  # every figure decoded
    shot = store["tmp"] / "report.png"
    page.screenshot(path=str(shot), full_page=True)
    assert not_blank(shot)
