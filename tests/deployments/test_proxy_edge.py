"""The proxy edge (issue 10, items 2, 12, 13, 14): HAProxy as Ray starts it, through deployments/haproxy_guard.py
(bounded request time, JSON errors, local-only stats, admin socket 600, dies with its parent), and the Ingress's
own bounds on receiving bodies (the body's time counts against the deadline; uploads per client).

The unit tests render a configuration shaped like Ray 2.60's and check it with the real HAProxy (``-c``); the
live ones (marked serve) run against the shared test app, which serves through HAProxy and the guard."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from deployments.ray_env import free_port
from deployments.haproxy_guard import HTTP_REQUEST_TIMEOUT_S, MARK, error_file, harden, real_binary, write_error_files
from serve_helpers import assert_error
from fakes import generate_request, make_client


def ray_like_config(directory: Path, port: int, stats: int, metrics: int) -> str:
    """The parts of Ray 2.60's rendered haproxy.cfg that the guard rewrites (see haproxy_templates.py)."""
    (directory / "500.http").write_bytes(b"HTTP/1.1 500 Internal Server Error\r\nContent-Type: text/plain\r\n"
                                         b"Content-Length: 21\r\n\r\nInternal Server Error")
    return textwrap.dedent(f"""\
        global
            stats socket {directory}/admin.sock mode 666 level admin expose-fd listeners
            stats timeout 30s
            maxconn 64
        defaults
            mode http
            timeout connect 5s
            timeout client 3600s
            timeout server 60s
            option abortonclose
            errorfile 502 {directory}/500.http
            errorfile 503 {directory}/500.http
            errorfile 504 {directory}/500.http
        frontend prometheus
            bind :{metrics}
            mode http
            http-request use-service prometheus-exporter if {{ path /metrics }}
            no log
        frontend http_frontend
            bind 127.0.0.1:{port}
            acl is_app path_beg /v1/
            use_backend app if is_app
            default_backend default_backend
        backend app
            server replica 127.0.0.1:{free_port()}
        backend default_backend
            http-request return status 404 content-type text/plain lf-string "Path \\'%[path]\\' not found. Ping http://.../-/routes for available routes."
        listen stats
          bind *:{stats}
          stats enable
          stats uri /stats
          stats refresh 1s
        """)


@pytest.fixture()
def hardened(tmp_path):
    port, stats, metrics = free_port(), free_port(), free_port()
    config = ray_like_config(tmp_path, port, stats, metrics)
    text = harden(config, write_error_files(tmp_path / "instantid-errors"))
    path = tmp_path / "haproxy.cfg"
    path.write_text(text)
    return path, text, port, stats, metrics


def test_hardened_config_is_valid_and_bounded(hardened):
    path, text, port, stats, metrics = hardened
    check = subprocess.run([real_binary(), "-c", "-f", str(path)], capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stdout + check.stderr
    assert f"timeout http-request {HTTP_REQUEST_TIMEOUT_S}s" in text and "option http-buffer-request" in text
    assert "option forwardfor" in text and "mode 600" in text and "mode 666" not in text
    assert f"bind 127.0.0.1:{stats}" in text and f"bind 127.0.0.1:{metrics}" in text
    assert f"{path.parent}/500.http" not in text and "%[path]" not in text
    assert harden(text, {}) == text and text.startswith(MARK)  # idempotent: reloads re-run it


def test_stats_page_stays_on_loopback_when_the_service_is_on_every_interface(tmp_path):
    """A pod's service binds every interface (0.0.0.0: the serve Service reaches it on the pod's address). The
    exporter follows it (Prometheus scrapes the pod's address); the stats page, which no one in the cluster needs
    (Ray's HAProxy manager uses the admin socket) and which answers without a login, stays on loopback
    (`kubectl port-forward` reaches it there)."""
    config = ray_like_config(tmp_path, 8000, 8404, 9101).replace("bind 127.0.0.1:8000", "bind *:8000")
    text = harden(config, {})
    assert "bind 127.0.0.1:8404" in text and "bind *:8404" not in text
    assert "bind *:9101" in text


@pytest.mark.parametrize("status", [400, 408, 500, 501, 502, 503, 504])
def test_proxy_error_files_are_the_api_json(status):
    head, _, body = error_file(status).partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    assert lines[0].startswith(f"HTTP/1.1 {status} ")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    assert headers["Content-Type"] == "application/json" and int(headers["Content-Length"]) == len(body)
    assert set(json.loads(body)["error"]) == {"code", "message"}
    assert ("Retry-After" in headers) == (status in (502, 503))


def _raw(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except (socket.timeout, ConnectionResetError):
            pass
    return b"".join(chunks)


def _status_and_json(raw: bytes) -> tuple[int, dict, dict]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v for k, v in (line.split(": ", 1) for line in lines[1:] if ": " in line)}
    return int(lines[0].split()[1]), headers, json.loads(body)


def test_guard_launches_haproxy_that_dies_with_its_parent(hardened, tmp_path):
    """The guard as Ray runs it: the parent (here a stand-in for Ray's proxy actor) is SIGKILLed, as
    `ray stop --force` does; HAProxy must not outlive it (it used to stay, listening on the port)."""
    from deployments.ray_env import haproxy_pids, write_guard_launcher

    path, _, port, stats, _ = hardened
    launcher = write_guard_launcher(tmp_path)
    parent = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import subprocess, sys, time
        subprocess.Popen([{str(launcher)!r}, "-db", "-f", {str(path)!r}])
        time.sleep(60)
        """)], start_new_session=True)
    try:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and not haproxy_pids(tmp_path):
            time.sleep(0.1)
        pids = haproxy_pids(tmp_path)
        assert pids, "HAProxy did not start"
        # while it runs: the proxy's own errors are our JSON; the admin socket is private
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        # malformed requests: HAProxy 2.8 answers these from its connection layer, where errorfiles do not
        # apply: a 400 in HAProxy's HTML (documented in docs/reliability.md), never a 5xx
        for bad in (b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
                    b"GET /\x00 HTTP/1.1\r\nHost: x\r\n\r\n",
                    b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 7\r\n\r\nhello"):
            assert _raw(port, bad).startswith(b"HTTP/1.1 400 ")
        # the proxy's own 503 (no replica reachable): our JSON, with Retry-After
        status, headers, body = _status_and_json(_raw(port, b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n"))
        assert (status, body["error"]["code"], headers.get("retry-after")) == (503, "unavailable", "5")
        status, headers, body = _status_and_json(_raw(port, b"GET /x" + b"y" * 500 + b" HTTP/1.1\r\nHost: x\r\n\r\n"))
        assert status == 404 and "yyyy" not in json.dumps(body)
        assert stat.S_IMODE(os.stat(tmp_path / "admin.sock").st_mode) == 0o600
        started = time.monotonic()
        raw = _raw(port, b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nab", timeout=HTTP_REQUEST_TIMEOUT_S + 10)
        status, headers, body = _status_and_json(raw)
        assert status == 408 and body["error"]["code"] == "timeout"
        assert time.monotonic() - started < HTTP_REQUEST_TIMEOUT_S + 3
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and haproxy_pids(tmp_path):
        time.sleep(0.1)
    left = haproxy_pids(tmp_path)
    if left:
        from deployments.ray_env import stop_haproxy

        stop_haproxy(tmp_path)
    assert not left, "HAProxy outlived the process that started it"


# -- the Ingress's side: body time against the deadline, uploads per client -----------------------------------
def _slow_body(chunks: int, pause: float):
    async def body():
        for _ in range(chunks):
            await asyncio.sleep(pause)
            yield b" "
    return body()


def test_a_slow_body_counts_against_the_deadline(tmp_path):
    import httpx

    app = make_client(tmp_path, request_timeout_s=1).app

    async def run():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as ac:
            started = time.perf_counter()
            resp = await ac.post("/v1/generate", content=_slow_body(100, 0.1),  # 10 s of body
                                 headers={"Content-Type": "application/json"})
            return resp, time.perf_counter() - started

    resp, took = asyncio.run(run())
    assert_error(resp, 408, "timeout")
    assert took < 5.0  # cut at the 1 s deadline, not when the body ends (slack for a loaded machine)


def test_uploads_in_progress_are_limited_per_client(tmp_path):
    import httpx

    from deployments.ingress.http.readers import MAX_UPLOADS_PER_CLIENT

    app = make_client(tmp_path, request_timeout_s=5).app

    async def run():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as ac:
            me = {"X-Forwarded-For": "192.0.2.44"}  # the client's address, as HAProxy appends it
            slow = [asyncio.ensure_future(ac.post("/v1/generate", content=_slow_body(10, 0.1),
                                                  headers={"Content-Type": "application/json", **me}))
                    for _ in range(MAX_UPLOADS_PER_CLIENT)]
            await asyncio.sleep(0.3)
            over = await ac.post("/v1/generate", json=generate_request(), headers=me)
            other = await ac.post("/v1/generate", json=generate_request(), headers={"X-Forwarded-For": "198.51.100.7"})
            health = await ac.get("/healthz")
            done = await asyncio.gather(*slow)
            after = await ac.post("/v1/generate", json=generate_request(), headers=me)
            return over, other, health, done, after

    over, other, health, done, after = asyncio.run(run())
    assert_error(over, 429, "rate_limited")
    assert over.headers["retry-after"] == "1"
    assert other.status_code == 200 and health.status_code == 200
    assert [r.status_code for r in done] == [400] * MAX_UPLOADS_PER_CLIENT  # the slow bodies were not JSON
    assert after.status_code == 200  # slots come back


# -- live, through the test app's HAProxy ----------------------------------------------------------------------
@pytest.mark.serve
def test_live_haproxy_is_hardened(serve_env):
    configs = list(serve_env.haproxy_dir.rglob("haproxy.cfg"))
    assert configs, list(serve_env.haproxy_dir.rglob("*"))
    text = configs[0].read_text()
    assert text.startswith(MARK)
    sockets = [p for p in serve_env.haproxy_dir.rglob("admin.sock")]
    assert sockets and all(stat.S_IMODE(os.stat(p).st_mode) == 0o600 for p in sockets)
    stats_port = int(os.environ["RAY_SERVE_HAPROXY_STATS_PORT"])
    metrics_port = int(os.environ["RAY_SERVE_HAPROXY_METRICS_PORT"])
    listening = _listeners()
    for port in (stats_port, metrics_port):
        assert listening.get(port) == {"127.0.0.1"}, (port, listening.get(port))
    port = int(serve_env.base_url.rsplit(":", 1)[1])
    assert _raw(port, b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\nHost: x\r\n\r\n").startswith(b"HTTP/1.1 400 ")
    # the client's address reaches the Ingress (per-address limits): HAProxy appends it
    assert "option forwardfor" in text


def _listeners() -> dict[int, set[str]]:
    """TCP ports in LISTEN state -> local addresses, from /proc/net/tcp (IPv4) and tcp6."""
    out: dict[int, set[str]] = {}
    for name in ("tcp", "tcp6"):
        path = Path(f"/proc/net/{name}")
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            if state != "0A":
                continue
            address, port = local.split(":")
            if len(address) == 8:
                ip = ".".join(str(int(address[i:i + 2], 16)) for i in (6, 4, 2, 0))
            else:
                ip = "::" if set(address) == {"0"} else address
            out.setdefault(int(port, 16), set()).add(ip)
    return out


@pytest.mark.serve
def test_live_slowloris_is_cut_and_the_service_answers(serve_env):
    """40 connections send headers then a byte a second (the probe's attack, bounded: it stops itself after
    HTTP_REQUEST_TIMEOUT_S + 8 s). /healthz and /v1/models answer throughout, and HAProxy cuts every slow
    connection with our JSON 408 within its request timeout."""
    import httpx

    port = int(serve_env.base_url.rsplit(":", 1)[1])
    conns = []
    try:
        for _ in range(40):
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            sock.sendall(b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 100000\r\n\r\n{")
            sock.setblocking(False)
            conns.append({"sock": sock, "data": b"", "closed_at": None})
        started = time.monotonic()
        worst = 0.0
        with httpx.Client(base_url=serve_env.base_url, timeout=10) as client:
            while time.monotonic() - started < HTTP_REQUEST_TIMEOUT_S + 8:
                for conn in conns:
                    if conn["closed_at"] is not None:
                        continue
                    try:
                        conn["sock"].send(b" ")
                    except OSError:
                        pass
                    try:
                        chunk = conn["sock"].recv(65536)
                        conn["data"] += chunk
                        if not chunk:
                            conn["closed_at"] = time.monotonic() - started
                    except BlockingIOError:
                        pass
                    except OSError:
                        conn["closed_at"] = time.monotonic() - started
                for path in ("/healthz", "/v1/models"):
                    t0 = time.monotonic()
                    assert client.get(path).status_code == 200
                    worst = max(worst, time.monotonic() - t0)
                if all(c["closed_at"] is not None for c in conns):
                    break
                time.sleep(1.0)
    finally:
        for conn in conns:
            conn["sock"].close()
    closed = [c["closed_at"] for c in conns if c["closed_at"] is not None]
    print(f"\nslowloris: {len(closed)}/40 cut, last at {max(closed or [0]):.1f}s; worst /healthz|/v1/models "
          f"latency {worst * 1000:.0f} ms")
    assert len(closed) == 40 and max(closed) < HTTP_REQUEST_TIMEOUT_S + 3
    assert worst < 1.0
    answered = [c["data"] for c in conns if c["data"]]
    assert answered and all(_status_and_json(d)[0] == 408 for d in answered)


def test_the_guard_never_execs_itself(tmp_path, monkeypatch):
    """Ray's RAY_SERVE_HAPROXY_BINARY_PATH names the guard's launcher; the real binary is another file."""
    from deployments.ray_env import write_guard_launcher

    launcher = write_guard_launcher(tmp_path)
    monkeypatch.setenv("RAY_SERVE_HAPROXY_BINARY_PATH", str(launcher))
    monkeypatch.delenv("INSTANTID_HAPROXY_BINARY", raising=False)
    assert Path(real_binary()).resolve() != launcher.resolve()


def test_stop_haproxy_stops_only_this_setups_leftovers(hardened, tmp_path):
    """The last line of cleanup (scripts/demo): HAProxy processes whose configuration lies under the private
    directory are stopped; nothing else is looked at."""
    from deployments.ray_env import haproxy_pids, stop_haproxy

    path, *_ = hardened
    orphan = subprocess.Popen([real_binary(), "-db", "-f", str(path)], start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and orphan.pid not in haproxy_pids(tmp_path):
            time.sleep(0.05)
        assert haproxy_pids(tmp_path) == [orphan.pid]
        assert haproxy_pids(tmp_path / "elsewhere") == []
        assert stop_haproxy(tmp_path) == [orphan.pid]
        assert orphan.wait(5) is not None and haproxy_pids(tmp_path) == []
    finally:
        if orphan.poll() is None:
            orphan.kill()
