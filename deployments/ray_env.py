"""Environment of the Ray cluster that runs the application.

Ray reads these when its processes start, so they are set wherever Ray starts: the Helm chart's containers
(``instantid.env``; a test keeps the two equal), ``scripts/demo``, the tests and the benchmarks. A Serve config
or a replica cannot set them.

``eval "$(python -m deployments.ray_env --local)"`` before ``serve run serve/local.yaml`` runs the app the way it
ships (``scripts/demo`` does this).
"""

from __future__ import annotations

import shlex
import socket
import sys
import tempfile
from pathlib import Path

CLUSTER_ENV: dict[str, str] = {
    # Ray's HAProxy ingress (Ray >= 2.56, KubeRay's high-throughput setting): HAProxy on each node's HTTP port
    # hands a request straight to an Ingress replica's own HTTP server. Serve's Python proxy instead forwards
    # it as an actor call, and the replica then fetches the body back from the proxy with a second one.
    # Measured on a 2-core machine: 7-9 ms less per request (docs/benchmarks.md, Serve overhead).
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
}

LOCAL_ENV: dict[str, str] = {
    **CLUSTER_ENV,
    # An Ingress replica that stops keeps serving this long so load balancers can deregister it (30 s by
    # default). On one machine nothing needs that time, and shutting down should not wait for it.
    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1",
}


def private_haproxy_env() -> tuple[dict[str, str], Path]:
    """HAProxy's ports and files for one more local cluster on a machine (tests, benchmarks): by default every
    cluster uses the same ones (stats 8404, metrics 9101, /tmp/haproxy-serve). Returns the environment and
    the new directory (the caller removes it). The directory is directly under /tmp: HAProxy refuses socket
    paths over 97 characters, and Ray adds a 64-character subdirectory."""
    directory = Path(tempfile.mkdtemp(prefix="hap-", dir="/tmp"))

    def free_port() -> int:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            return sock.getsockname()[1]

    return ({
        "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port()),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port()),
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(directory / "haproxy.cfg"),
        "RAY_SERVE_HAPROXY_SOCKET_PATH": str(directory / "admin.sock"),
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(directory),
        "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(directory / "server-state"),
    }, directory)


def main(argv: list[str] | None = None) -> None:
    """Print ``export`` lines: CLUSTER_ENV, or with ``--local`` LOCAL_ENV plus a private HAProxy setup (its
    directory is ``$RAY_SERVE_HAPROXY_SERVER_STATE_BASE``, for the caller to remove)."""
    local = "--local" in (argv if argv is not None else sys.argv[1:])
    env = {**LOCAL_ENV, **private_haproxy_env()[0]} if local else CLUSTER_ENV
    for key, value in env.items():
        print(f"export {key}={shlex.quote(value)}")


if __name__ == "__main__":
    main()
