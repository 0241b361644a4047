"""A real ``redis-server`` for tests: started on a free loopback port in a temporary directory, stopped after.
Tests that need it skip, saying why, when the binary is missing (Debian: ``apt-get install redis-server``;
``.ci/run`` installs it)."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from deployments.ray_env import free_port


@contextlib.contextmanager
def redis_server(directory: Path):
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed (Debian: apt-get install redis-server)")
    port = free_port()
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(directory),
                             "--save", "", "--appendonly", "no", "--protected-mode", "yes"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    """A redis-server for the test module (a pytest fixture: import it into the module that uses it)."""
    with redis_server(tmp_path_factory.mktemp("redis")) as url:
        yield url
