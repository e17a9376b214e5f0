"""Running ``tools/serve.py`` as a child process: a free port, waiting for ``/health``, stopping every process.

For tests and benchmarks that start a real server on 127.0.0.1. LitServe runs inference in worker processes of
its own, and stopping only the launching process leaves them running, so the server gets a process group of its
own (``start_new_session=True``) and :func:`stop_group` stops the whole group and checks that it is gone.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on now (the OS picks it)."""
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def wait_until_healthy(url: str, process: subprocess.Popen, log: Path, seconds: float) -> None:
    """Return once ``url/health`` answers 200; raise with the log's tail if the server exits or ``seconds`` pass."""
    deadline = time.monotonic() + seconds
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"no {url}/health after {seconds:g} s:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:  # not listening yet
            pass
        time.sleep(0.5)


def stop_group(process: subprocess.Popen, timeout: float = 15.0) -> None:
    """SIGTERM to the process group led by ``process``, SIGKILL after ``timeout``; raises if any of it is left."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=timeout)
    deadline = time.monotonic() + timeout
    while group_alive(process.pid):
        if time.monotonic() > deadline:
            os.killpg(process.pid, signal.SIGKILL)
            raise RuntimeError("processes of the server's group were still running after it stopped")
        time.sleep(0.2)


def group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    return True
