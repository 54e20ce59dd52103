"""Start ``python serve.py`` in a subprocess and wait until it answers (tests, scripts/bench_serve.py).

    with running_server("--max-sessions", "8") as url:     # http://127.0.0.1:<free port>
        ...
"""
from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from ..config import REPO_ROOT


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def info(url: str) -> dict:
    """The server's ``/api/info``."""
    with urllib.request.urlopen(url.rstrip("/") + "/api/info", timeout=5) as r:
        return json.load(r)


def _tail(log, chars: int = 2000) -> str:
    """The last ``chars`` characters of the server's output file."""
    log.flush()
    log.seek(0)
    return log.read().decode(errors="replace")[-chars:]


@contextlib.contextmanager
def running_server(*args: str, timeout: float = 90.0):
    """``python serve.py --port <free> *args`` -> yields its http URL; stopped on exit."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen([sys.executable, "serve.py", "--port", str(port), *args], cwd=REPO_ROOT,
                                stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + timeout
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"serve.py exited with {proc.returncode}:\n{_tail(log)}")
                with contextlib.suppress(OSError):
                    info(url)
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"serve.py did not answer on {url} within {timeout:g} s; its output:\n"
                                       f"{_tail(log)}")
                time.sleep(0.2)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(60)                 # a Ray Serve server shuts its replicas down first
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
