"""Helpers for tests that start a real server (kedro viz, mlflow models serve) in its own process group."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest


def free_port(first: int = 41000, last: int = 49000) -> int:
    """A free port below 49152 (kedro-viz refuses the ephemeral range the OS would hand out)."""
    for port in range(first + os.getpid() % 1000, last):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {first}..{last}")


def wait_for_http(url: str, proc: subprocess.Popen, log_path: Path, timeout_s: float = 240) -> None:
    """Poll ``url`` until it answers 200; fail with the server's log when it exits or the time is up."""
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            pytest.fail(f"server exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"no answer from {url} within {timeout_s:.0f} s:\n{log_path.read_text()[-3000:]}")
        time.sleep(1)


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM the server's process group, SIGKILL what is left after 15 s; fail if anything survives."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=0.2)
            if proc.returncode is not None and not group_alive(proc.pid):
                return
    assert not group_alive(proc.pid), "server process group survived SIGKILL"
