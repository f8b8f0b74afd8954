"""Binder smoke test: JupyterLab started through binder/start serves the notebooks and runs a kernel
in which the package imports, as a Binder user would see it. Loopback only, bounded waits."""

import json
import os
import secrets
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
import pytest

websocket = pytest.importorskip("websocket")  # websocket-client, a jupyter_server dependency

REPO = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
START_TIMEOUT = 90  # s
REPLY_TIMEOUT = 120  # s, for `import bkgtemplate` in a new kernel


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


@pytest.mark.slow
def test_binder_jupyterlab_smoke(tmp_path):
    port, token = free_port(), secrets.token_hex(16)
    server = Server(port, token)
    env = {k: v for k, v in os.environ.items() if not k.startswith("JUPYTER")}
    env.update(HOME=str(tmp_path), JUPYTER_RUNTIME_DIR=str(tmp_path / "runtime"))
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
        f"--ServerApp.root_dir={REPO}",
        "--ServerApp.allow_root=True",
    ]
    log = open(tmp_path / "jupyter.log", "wb")
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        server.wait_ready(process, START_TIMEOUT)

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
            Server(port, "wrong-token").request("GET", "/api/contents/notebooks")

        kernel = server.request("POST", "/api/kernels", {"name": "python3"})
        code = "import os, bkgtemplate\nprint(bkgtemplate.__name__, os.environ['GAMMAPY_DATA'])"
        reply, stdout = execute(server, kernel["id"], code, REPLY_TIMEOUT)
        assert reply["status"] == "ok", reply
        assert stdout.split() == ["bkgtemplate", str(tmp_path / "gammapy-data")]

        server.request("DELETE", f"/api/kernels/{kernel['id']}")
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
