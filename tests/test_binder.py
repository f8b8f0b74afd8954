"""JupyterLab as Binder starts it (through binder/start): a smoke test of its REST API and a kernel
in which the package imports, and a real-browser test that runs a notebook through the UI in
headless Chromium, as a Binder user would. Loopback only, bounded waits (no speed assertions)."""

import contextlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
import nbformat
import pytest

websocket = pytest.importorskip("websocket")  # websocket-client, a jupyter_server dependency

REPO = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
START_TIMEOUT = 90  # s
REPLY_TIMEOUT = 120  # s, for `import bkgtemplate` in a new kernel
PAGE_TIMEOUT = 180  # s, for JupyterLab to load the notebook and start its kernel in the browser
RUN_TIMEOUT = 900  # s, for all cells of a notebook on the real data (about 15 s alone)
CHROMIUM = "/usr/bin/chromium"  # Debian's chromium and chromium-driver packages
CHROMEDRIVER = "/usr/bin/chromedriver"
BROWSER_NOTEBOOK = "01_select_off_runs.ipynb"


def free_port():
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


class Server:
    """REST client of a local Jupyter server."""

    def __init__(self, port, token):
        self.port = port
        self.url = f"http://{HOST}:{port}"
        self.token = token

    def request(self, method, path, body=None, timeout=10):
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            f"{self.url}{path}",
            data=data,
            method=method,
            headers={"Authorization": f"token {self.token}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=timeout) as response:
            text = response.read().decode()
        return json.loads(text) if text else None

    def wait_ready(self, process, timeout):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"jupyter lab exited with code {process.returncode}")
            try:
                return self.request("GET", "/api/status", timeout=2)
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.5)
        raise TimeoutError(f"jupyter lab not ready after {timeout} s")


def execute(server, kernel_id, code, timeout):
    """Run ``code`` in the kernel over its websocket; return (execute_reply content, stdout)."""
    ws = websocket.create_connection(
        f"ws://{HOST}:{server.port}/api/kernels/{kernel_id}/channels",
        header=[f"Authorization: token {server.token}"],
        timeout=timeout,
    )
    try:
        msg_id = uuid.uuid4().hex
        ws.send(
            json.dumps(
                {
                    "channel": "shell",
                    "header": {
                        "msg_id": msg_id,
                        "msg_type": "execute_request",
                        "username": "test",
                        "session": uuid.uuid4().hex,
                        "version": "5.3",
                    },
                    "parent_header": {},
                    "metadata": {},
                    "content": {"code": code, "silent": False, "store_history": False},
                }
            )
        )
        stdout = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            message = json.loads(ws.recv())
            if message.get("parent_header", {}).get("msg_id") != msg_id:
                continue
            if message["msg_type"] == "stream" and message["content"]["name"] == "stdout":
                stdout.append(message["content"]["text"])
            if message["msg_type"] == "execute_reply":
                return message["content"], "".join(stdout)
        raise TimeoutError(f"no execute_reply within {timeout} s")
    finally:
        ws.close()


@contextlib.contextmanager
def binder_jupyterlab(home, root_dir):
    """JupyterLab started through binder/start with HOME=``home`` (so GAMMAPY_DATA is
    ``home/gammapy-data``, as on Binder), serving ``root_dir`` on loopback with a random token;
    yields a `Server` and shuts it down afterwards."""
    port, token = free_port(), secrets.token_hex(16)
    server = Server(port, token)
    # JUPYTER_PATH stays: it is where a non-default install finds lab extensions (widgets);
    # MPLBACKEND (Agg, set for the tests) goes: Binder has none, and with Agg no figure shows
    env = {
        k: v
        for k, v in os.environ.items()
        if (not k.startswith("JUPYTER") or k == "JUPYTER_PATH") and k != "MPLBACKEND"
    }
    env.update(HOME=str(home), JUPYTER_RUNTIME_DIR=str(home / "runtime"))
    command = [
        "bash",
        str(REPO / "binder" / "start"),
        sys.executable,
        "-m",
        "jupyterlab",
        "--no-browser",
        f"--ip={HOST}",
        f"--port={port}",
        "--port-retries=0",
        f"--IdentityProvider.token={token}",
        f"--ServerApp.root_dir={root_dir}",
        "--ServerApp.allow_root=True",
    ]
    log = open(home / "jupyter.log", "wb")
    process = subprocess.Popen(command, cwd=root_dir, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        server.wait_ready(process, START_TIMEOUT)
        yield server
        server.request("POST", "/api/shutdown")
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
        log.close()


@pytest.mark.slow
def test_binder_jupyterlab_smoke(tmp_path):
    with binder_jupyterlab(tmp_path, REPO) as server:
        notebooks = REPO / "notebooks"
        if notebooks.is_dir():
            listing = server.request("GET", "/api/contents/notebooks")
            assert listing["type"] == "directory"
            names = {item["name"] for item in listing["content"]}
            assert {path.name for path in notebooks.glob("*.ipynb")} <= names
        else:
            with pytest.raises(urllib.error.HTTPError, match="404"):
                server.request("GET", "/api/contents/notebooks")

        with pytest.raises(urllib.error.HTTPError, match="403"):
            Server(server.port, "wrong-token").request("GET", "/api/contents/notebooks")

        kernel = server.request("POST", "/api/kernels", {"name": "python3"})
        code = "import os, bkgtemplate\nprint(bkgtemplate.__name__, os.environ['GAMMAPY_DATA'])"
        reply, stdout = execute(server, kernel["id"], code, REPLY_TIMEOUT)
        assert reply["status"] == "ok", reply
        assert stdout.split() == ["bkgtemplate", str(tmp_path / "gammapy-data")]

        server.request("DELETE", f"/api/kernels/{kernel['id']}")


def chromium_driver(user_data_dir):
    """Headless Debian chromium through its chromedriver; skips, with the reason, where absent."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium absent (the test extra)")
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not os.access(path, os.X_OK)]
    if missing:
        pytest.skip(f"{' and '.join(missing)} absent: apt-get install chromium chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in [
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1400,2000",
        f"--user-data-dir={user_data_dir}",
    ]:  # fmt: skip
        options.add_argument(argument)
    log = user_data_dir.parent / "chromedriver.log"
    service = webdriver.ChromeService(executable_path=CHROMEDRIVER, log_output=str(log))
    return webdriver.Chrome(options=options, service=service)


def wait_for(condition, timeout, what, poll=1.0):
    """Poll ``condition`` until it returns a true value and return that; fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(poll)
    pytest.fail(f"{what}: not within {timeout} s")


def kernel_state(server):
    kernels = server.request("GET", "/api/kernels")
    return kernels[0]["execution_state"] if len(kernels) == 1 else None


@pytest.mark.slow
@pytest.mark.ci
def test_browser_runs_notebook_in_jupyterlab(hess_dir, tmp_path):
    """01_select_off_runs.ipynb run with Run > Run All Cells in JupyterLab (as Binder starts it,
    on the real data) in headless Chromium: no error, figures rendered, no warning text."""
    from selenium.webdriver.common.by import By

    driver = chromium_driver(tmp_path / "chromium-profile")
    root = tmp_path / "root"
    ignore = shutil.ignore_patterns("output", ".ipynb_checkpoints")
    shutil.copytree(REPO / "notebooks", root / "notebooks", ignore=ignore)
    (tmp_path / "gammapy-data").symlink_to(hess_dir.parent)  # what binder/postBuild links
    try:
        with binder_jupyterlab(tmp_path, root) as server:
            driver.get(f"{server.url}/lab/tree/notebooks/{BROWSER_NOTEBOOK}?token={server.token}")
            wait_for(lambda: kernel_state(server) == "idle", PAGE_TIMEOUT, "kernel of the notebook started and idle")
            assert driver.find_elements(By.CSS_SELECTOR, ".jp-NotebookPanel .jp-CodeCell"), "JupyterLab shows no code cell"
            # from the file: JupyterLab renders only the cells in view until they run
            n_cells = sum(cell.cell_type == "code" for cell in nbformat.read(root / "notebooks" / BROWSER_NOTEBOOK, 4).cells)

            def run_menu():
                return [item for item in driver.find_elements(By.CSS_SELECTOR, ".lm-MenuBar-item") if item.text == "Run"]

            menu = wait_for(run_menu, PAGE_TIMEOUT, "the Run menu")
            menu[0].click()
            run_all = wait_for(
                lambda: driver.find_elements(By.CSS_SELECTOR, '.lm-Menu-item[data-command="runmenu:run-all"]'),
                30,
                "Run > Run All Cells",
            )
            run_all[0].click()

            def prompts():
                return [p.text for p in driver.find_elements(By.CSS_SELECTOR, ".jp-CodeCell .jp-InputPrompt")]

            wait_for(lambda: kernel_state(server) == "busy" or any("*" in p for p in prompts()), 60, "cells started")
            idle = []

            def finished():  # the kernel idle and no cell queued or running, twice in a row
                idle.append(kernel_state(server) == "idle" and not any("*" in p for p in prompts()))
                return idle[-2:] == [True, True]

            wait_for(finished, RUN_TIMEOUT, f"all cells of {BROWSER_NOTEBOOK} executed", poll=2.0)
            driver.save_screenshot(str(tmp_path / "jupyterlab.png"))

            outputs = driver.find_elements(By.CSS_SELECTOR, ".jp-OutputArea-output")
            texts = [output.text for output in outputs]
            errors = [
                output.text[:500]
                for output in outputs
                if output.get_attribute("data-mime-type") == "application/vnd.jupyter.stderr"
                and any(word in output.text for word in ("Error", "Traceback"))
            ]
            assert not errors, errors
            executed = [p for p in prompts() if any(c.isdigit() for c in p)]
            assert len(executed) == n_cells, f"{len(executed)} of {n_cells} code cells executed: {prompts()}"
            assert driver.find_elements(By.CSS_SELECTOR, ".jp-OutputArea-output img"), "no figure rendered"
            warnings = [text[:500] for text in texts if "Warning" in text or "IProgress" in text]
            assert not warnings, warnings
            assert (root / "notebooks" / "output" / "off-runs.ecsv").is_file()
    finally:
        driver.quit()
