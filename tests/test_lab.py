"""JupyterLab as users meet it: the committed notebooks open cleanly, and Run All works in a real browser.

The browser test starts JupyterLab from this environment on a free localhost port, drives Debian's Chromium
(headless, through Playwright) to open a notebook, choose Run → Run All Cells and wait for the kernel to go
idle, then checks what is on the page. It works on a copy of notebooks/ and data/ in a temporary folder.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nbformat
from nbformat.sign import NotebookNotary
import pytest

from conftest import DATA, ROOT

NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
KERNELSPEC = {"name": "ironman-nb", "display_name": "Python (ironman_nb)", "language": "python"}
CHROMIUM = Path("/usr/bin/chromium")
# What works as root on a machine without a network outside: no sandbox (root), no GPU, nothing phoning home.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


# ---------------------------------------------------------------- the committed notebooks

@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_notebook_is_valid_clean_and_names_the_project_kernel(path):
    nb = nbformat.read(path, as_version=nbformat.NO_CONVERT)
    assert nb.nbformat == 4
    nbformat.validate(nb)
    parameters = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(parameters) == 1 and parameters[0].cell_type == "code"
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, "commit notebooks without outputs"
    # No stored outputs, so nothing for Jupyter to distrust: no trust prompt, no signature to keep.
    assert "signature" not in nb.metadata
    assert NotebookNotary(data_dir=":memory:").check_cells(nb)
    # The kernel `make install` registers: JupyterLab opens the notebook with it and asks nothing.
    assert dict(nb.metadata.kernelspec) == KERNELSPEC


def test_the_notebooks_kernel_is_registered_for_this_environment():
    """What `make install` registers: without it JupyterLab opens every notebook with a kernel dialog."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        spec = KernelSpecManager().get_kernel_spec(KERNELSPEC["name"])
    except NoSuchKernel:
        pytest.fail(f"no Jupyter kernel {KERNELSPEC['name']!r}: run `make install`")
    assert spec.display_name == KERNELSPEC["display_name"] and spec.language == "python"
    python = Path(spec.argv[0])
    assert python.is_file(), f"kernel {KERNELSPEC['name']!r} runs {python}, which is gone: run `make install`"
    assert python.parent.parent.resolve() == Path(sys.prefix).resolve(), (
        f"kernel {KERNELSPEC['name']!r} runs {python}, another environment: run `make install` here")


# ---------------------------------------------------------------- JupyterLab in a browser

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """JupyterLab (this environment's) on a free localhost port, serving a copy of notebooks/ and data/."""
    if not CHROMIUM.is_file():
        pytest.skip(f"{CHROMIUM} not found: `make test` installs Debian's chromium as root (scripts/install_browser.sh)")
    pytest.importorskip("playwright.sync_api", reason="playwright (requirements-dev.txt) is not installed")
    home = tmp_path_factory.mktemp("lab")
    work = home / "work"
    shutil.copytree(ROOT / "notebooks", work / "notebooks")
    shutil.copytree(ROOT / "data", work / "data", ignore=shutil.ignore_patterns("_parts"))
    # 03 plots the trainer_state.json at its default location (a real LLaMA-Factory run of the recipe).
    (work / "runs" / "lab" / "adapter").mkdir(parents=True)
    shutil.copy(DATA / "recipe_qwen2_trainer_state.json", work / "runs" / "lab" / "adapter" / "trainer_state.json")
    # The user's settings and workspaces stay untouched; the only setting: no "get Jupyter news?" toast.
    settings = home / "settings"
    (settings / "@jupyterlab" / "apputils-extension").mkdir(parents=True)
    (settings / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings").write_text(
        json.dumps({"fetchNews": "false", "checkForUpdates": False}))
    env = {k: v for k, v in os.environ.items() if k != "MPLBACKEND"}  # kernels get matplotlib's inline backend
    env.update(JUPYTERLAB_SETTINGS_DIR=str(settings), JUPYTERLAB_WORKSPACES_DIR=str(home / "workspaces"),
               JUPYTER_RUNTIME_DIR=str(home / "runtime"))
    port = _free_port()
    log = open(home / "jupyterlab.log", "w")
    process = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}",
         "--ServerApp.port_retries=0", f"--ServerApp.root_dir={work}", "--IdentityProvider.token=",
         "--ServerApp.allow_root=True", "--LabApp.expose_app_in_browser=True"],
        cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            if process.poll() is not None:
                pytest.fail(f"JupyterLab exited with {process.returncode}:\n{(home / 'jupyterlab.log').read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{url}/api/status", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"JupyterLab did not answer on {url}:\n{(home / 'jupyterlab.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield type("Lab", (), {"url": url, "work": work, "log": home / "jupyterlab.log"})
    finally:
        process.terminate()  # the server shuts its kernels down on SIGTERM
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


@pytest.fixture(scope="module")
def browser(lab):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


# The open notebook as JupyterLab holds it (window.jupyterapp: --LabApp.expose_app_in_browser). JupyterLab draws an
# error and a stderr stream alike, so the model, not the page, tells them apart.
NOTEBOOK_STATE = """() => {
  const widget = window.jupyterapp && window.jupyterapp.shell.currentWidget;
  if (!widget || !widget.content || !widget.content.model || !widget.sessionContext) return null;
  const model = widget.content.model, cells = [];
  for (let i = 0; i < model.cells.length; i++) {
    const cell = model.cells.get(i);
    if (cell.type === 'code') cells.push({count: cell.executionCount, outputs: cell.outputs.toJSON()});
  }
  const kernel = widget.sessionContext.session && widget.sessionContext.session.kernel;
  return {path: widget.context.path, kernel: kernel ? kernel.status : null, kernel_name: kernel ? kernel.name : null,
          prompts: [...widget.node.querySelectorAll('.jp-CodeCell .jp-InputArea-prompt')].map(e => e.textContent),
          dialogs: [...document.querySelectorAll('.jp-Dialog')].map(e => e.innerText), cells};
}"""


def run_all_in_lab(page, lab, name: str, timeout: float = 300) -> dict:
    """Open notebooks/<name> in a fresh workspace, Run → Run All Cells, wait until the kernel is idle again."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    page.goto(f"{lab.url}/lab/tree/notebooks/{name}?reset")
    try:
        page.wait_for_function(
            f"() => {{ const s = ({NOTEBOOK_STATE})(); return s && s.path === 'notebooks/{name}' && s.kernel === 'idle'; }}",
            timeout=120_000)
    except PlaywrightTimeout:
        state = page.evaluate(NOTEBOOK_STATE)
        pytest.fail(f"{name}: the kernel did not start; dialogs on the page: {state and state['dialogs']}")
    state = page.evaluate(NOTEBOOK_STATE)
    assert state["dialogs"] == [], f"{name} opened with a dialog (trust or kernel selection): {state['dialogs']}"
    assert state["kernel_name"] == KERNELSPEC["name"]

    page.locator(".lm-MenuBar-item", has_text="Run").click()
    page.get_by_role("menuitem", name="Run All Cells", exact=True).click()
    deadline = time.monotonic() + timeout
    while True:
        state = page.evaluate(NOTEBOOK_STATE)
        errors = [o for c in state["cells"] for o in c["outputs"] if o["output_type"] == "error"]
        finished = all(c["count"] for c in state["cells"]) or errors  # Run All stops at an error
        if state["kernel"] == "idle" and not any("*" in p for p in state["prompts"]) and finished:
            return state
        if time.monotonic() > deadline:
            pytest.fail(f"{name}: Run All did not finish in {timeout} s; prompts {state['prompts']}, kernel {state['kernel']}")
        time.sleep(0.5)


def problems(state: dict) -> list[str]:
    """Error outputs, tracebacks on stderr, cells not run, dialogs."""
    found = []
    for index, cell in enumerate(state["cells"]):
        if not cell["count"]:
            found.append(f"code cell {index} was not run")
        for output in cell["outputs"]:
            if output["output_type"] == "error":
                found.append(f"code cell {index}: {output['ename']}: {output['evalue']}")
            elif output["output_type"] == "stream" and output["name"] == "stderr" and "Traceback" in "".join(output["text"]):
                found.append(f"code cell {index}: a traceback on stderr")
    return found + [f"dialog: {d}" for d in state["dialogs"]]


@pytest.fixture
def page(browser):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    try:
        yield page
    finally:
        page.close()


def test_run_all_in_jupyterlab_prepares_the_data_and_draws_the_loss_chart(lab, page, tmp_path):
    state = run_all_in_lab(page, lab, "01_prepare_data.ipynb")
    assert problems(state) == []
    cell = page.locator(".jp-CodeCell", has_text="prepare(cfg)")
    table = cell.locator(".jp-OutputArea-output[data-mime-type='text/html'] table")
    assert table.count() == 1, "the data summary renders as an HTML table"
    table.scroll_into_view_if_needed()
    page.screenshot(path=tmp_path / "01_prepare_data.png")
    text = table.inner_text()
    assert "rows kept" in text and "train rows" in text and "eval rows" in text
    assert (lab.work / "runs" / "lab" / "data" / "train.jsonl").is_file()  # the defaults wrote into the copy

    state = run_all_in_lab(page, lab, "03_plot_training.ipynb")
    assert problems(state) == []
    cell = page.locator(".jp-CodeCell", has_text="plot_training(cfg)")
    image = cell.locator(".jp-OutputArea-output[data-mime-type='image/png'] img")
    assert image.count() == 1, "the loss chart renders inline"
    image.scroll_into_view_if_needed()
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=image.element_handle(), timeout=10_000)
    width, height = image.evaluate("img => [img.naturalWidth, img.naturalHeight]")
    assert width > 400 and height > 200
    page.screenshot(path=tmp_path / "03_plot_training.png")
    assert (lab.work / "runs" / "lab" / "plots" / "training_loss.png").is_file()
    print(f"screenshots: {tmp_path / '01_prepare_data.png'}, {tmp_path / '03_plot_training.png'}")


def test_the_browser_check_sees_an_error_output(lab, page, tmp_path):
    """The check above would see a failing cell: Run All stops there and the error is reported."""
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("print('before')"),
                                         nbformat.v4.new_code_cell("raise ValueError('deliberate failure')"),
                                         nbformat.v4.new_code_cell("print('never')")])
    nb.metadata["kernelspec"] = dict(KERNELSPEC)
    nbformat.write(nb, lab.work / "notebooks" / "fails.ipynb")
    state = run_all_in_lab(page, lab, "fails.ipynb", timeout=60)
    page.screenshot(path=tmp_path / "fails.png")
    assert problems(state) == ["code cell 1: ValueError: deliberate failure", "code cell 2 was not run"]
