"""Environment of the Ray cluster that runs the application.

Ray reads these when its processes start, so they are set wherever Ray starts: the Helm chart's containers
(``instantid.env``; a test keeps the two equal), ``scripts/demo``, the tests and the benchmarks. A Serve config
or a replica cannot set them.

``eval "$(python -m deployments.ray_env --local)"`` before ``serve run serve/local.yaml`` runs the app the way it
ships (``scripts/demo`` does this).
"""

from __future__ import annotations

import math
import os
import random
import shlex
import signal
import socket
import sys
import tempfile
from pathlib import Path

# HAProxy's hard-stop-after must outlive the longest request: Ray reloads HAProxy on every Ingress replica change
# and kills the old worker's connections this long after (Ray's default 120 s; requests may take
# request_timeout_s). The chart derives the same from app.request_timeout_s (instantid.hardStopFloor in
# helm/instantid-serve/templates/_helpers.tpl; a test keeps the two equal).
HARD_STOP_MARGIN_S = 30
HARD_STOP_ENV = "RAY_SERVE_HAPROXY_HARD_STOP_AFTER_S"


def hard_stop_after_s(request_timeout_s: float) -> int:
    """Seconds of hard-stop-after for a service whose requests may take ``request_timeout_s``."""
    return math.ceil(request_timeout_s) + HARD_STOP_MARGIN_S


# serve/production.yaml's and AppArgs' request_timeout_s
DEFAULT_REQUEST_TIMEOUT_S = 300

CLUSTER_ENV: dict[str, str] = {
    # Ray's HAProxy ingress (Ray >= 2.56, KubeRay's high-throughput setting): HAProxy on each node's HTTP port
    # hands a request straight to an Ingress replica's own HTTP server. Serve's Python proxy instead forwards
    # it as an actor call, and the replica then fetches the body back from the proxy with a second one.
    # Measured on a 2-core machine: 7-9 ms less per request (docs/benchmarks.md, Serve overhead).
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    # ... run as the hardened HAProxy (deployments/haproxy_guard.py: request timeouts, forwarded client address,
    # JSON errors, stats page on loopback, dies with its Ray proxy) through the launcher the image writes
    # (Dockerfile). Local runs get a launcher of their own (private_haproxy_env).
    "RAY_SERVE_HAPROXY_BINARY_PATH": "/home/ray/app/instantid-haproxy",
    # ... whose reloads do not cut requests still within their deadline (the chart sets it per value set)
    HARD_STOP_ENV: str(hard_stop_after_s(DEFAULT_REQUEST_TIMEOUT_S)),
}

LOCAL_ENV: dict[str, str] = {
    # the image's launcher path does not exist here: private_haproxy_env writes one per local setup
    **{key: value for key, value in CLUSTER_ENV.items() if key != "RAY_SERVE_HAPROXY_BINARY_PATH"},
    # An Ingress replica that stops keeps serving this long so load balancers can deregister it (30 s by
    # default). On one machine nothing needs that time, and shutting down should not wait for it.
    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1",
}


def _ephemeral_ports() -> range:
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        low, high = 32768, 60999  # Linux's default
    return range(low, high + 1)


def free_port() -> int:
    """A port free now on 127.0.0.1, for a server that binds it later (HAProxy binds its stats and metrics
    ports only when Serve starts, a minute on a loaded machine). Picked outside the kernel's ephemeral range:
    a port from ``bind(0)`` comes from that range, and in the meantime every outgoing connection and every Ray
    worker's ``bind(0)`` draws from it too (CI saw HAProxy's metrics port taken that way). Random, so local
    clusters set up side by side rarely try the same one."""
    ephemeral = _ephemeral_ports()
    candidates = [port for port in range(10000, 65536) if port not in ephemeral]
    for port in random.sample(candidates, 50) if candidates else []:
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as sock:  # no free port outside the range: the kernel's pick is the best left
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_guard_launcher(directory: Path) -> Path:
    """An executable that runs deployments/haproxy_guard.py with this Python (Ray wants one file to exec)."""
    launcher = directory / "haproxy"
    launcher.write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} -m deployments.haproxy_guard \"$@\"\n")
    launcher.chmod(0o755)
    return launcher


def private_haproxy_env() -> tuple[dict[str, str], Path]:
    """HAProxy's ports and files for one more local cluster on a machine (tests, benchmarks): by default every
    cluster uses the same ones (stats 8404, metrics 9101, /tmp/haproxy-serve). Returns the environment and
    the new directory (the caller removes it, after ``stop_haproxy``). The directory is directly under /tmp:
    HAProxy refuses socket paths over 97 characters, and Ray adds a 64-character subdirectory. HAProxy runs
    through deployments/haproxy_guard.py (timeouts, JSON errors, local-only stats, dies with its Ray proxy)."""
    directory = Path(tempfile.mkdtemp(prefix="hap-", dir="/tmp"))
    return ({
        "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port()),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port()),
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(directory / "haproxy.cfg"),
        "RAY_SERVE_HAPROXY_SOCKET_PATH": str(directory / "admin.sock"),
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(directory),
        "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(directory / "server-state"),
        "RAY_SERVE_HAPROXY_BINARY_PATH": str(write_guard_launcher(directory)),
    }, directory)


def haproxy_pids(directory: str | Path) -> list[int]:
    """HAProxy processes started with a configuration under ``directory`` (one private setup's; never
    another cluster's)."""
    prefix = str(Path(directory).resolve()) + os.sep
    pids = []
    for entry in Path("/proc").iterdir() if Path("/proc").is_dir() else []:
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"-f" in argv and argv.index(b"-f") + 1 < len(argv) \
                and argv[argv.index(b"-f") + 1].decode(errors="replace").startswith(prefix):
            pids.append(int(entry.name))
    return pids


def stop_haproxy(directory: str | Path) -> list[int]:
    """SIGTERM, then SIGKILL, every HAProxy of this private setup that outlived Ray (the guard makes HAProxy
    die with its Ray proxy; this is the last line for anything that did not). Returns the pids stopped."""
    import time

    pids = haproxy_pids(directory)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and any(Path(f"/proc/{pid}").exists() for pid in pids):
            time.sleep(0.05)
    return pids


def main(argv: list[str] | None = None) -> None:
    """Print ``export`` lines: CLUSTER_ENV, or with ``--local`` LOCAL_ENV plus a private HAProxy setup (its
    directory is ``$RAY_SERVE_HAPROXY_SERVER_STATE_BASE``, for the caller to remove). ``--stop-haproxy DIR``
    stops what is left of that setup's HAProxy."""
    argv = list(argv if argv is not None else sys.argv[1:])
    if argv[:1] == ["--stop-haproxy"] and len(argv) == 2:
        stopped = stop_haproxy(argv[1])
        if stopped:
            print(f"stopped orphaned HAProxy {stopped}", file=sys.stderr)
        return
    local = "--local" in argv
    env = {**LOCAL_ENV, **private_haproxy_env()[0]} if local else CLUSTER_ENV
    for key, value in env.items():
        print(f"export {key}={shlex.quote(value)}")


if __name__ == "__main__":
    main()
