"""Hostile round 3 (issue 30) at the HTTP edge: each finding as the tester saw it, and the refusals that guard
security paths (auth with no keys, forwarded addresses, lookalike webhook hosts, signatures by a known answer)."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import time

import httpx
import pytest
from fastapi.testclient import TestClient

from deployments.config import AppArgs
from deployments.ingress.http import readers
from deployments.ingress.http.app import build_http_app
from deployments.ingress.http.auth import (AUTH_FAILURE_BURST, GLOBAL_AUTH_FAILURE_BURST, TrustedProxies,
                                           client_address)
from deployments.ingress.service import GenerationService
from fakes import FakeFace, FakeGenerator, generate_request
from serve_helpers import assert_error, b64, png_bytes

KEY = "sk-round3-" + "7" * 40
OTHER_KEY = "sk-round3-" + "8" * 40
NGINX = "10.1.2.3"  # ingress-nginx in front of HAProxy: every client's connection comes from it


def app_for(tmp_path, **overrides):
    args = AppArgs.model_validate({"identity_store": str(tmp_path / "ids"), **overrides})
    core = GenerationService(args, FakeFace(), FakeGenerator(),
                             status_fn=lambda: {"FaceAnalyzer": "HEALTHY", "Generator": "HEALTHY"})
    return build_http_app(core)


def client_at(app, peer: str) -> TestClient:
    return TestClient(app, raise_server_exceptions=False, client=(peer, 40000))


@pytest.fixture()
def keyed_app(tmp_path, monkeypatch):
    monkeypatch.setenv("ROUND3_KEYS", ",".join(f"{n}:{hashlib.sha256(k.encode()).hexdigest()}"
                                                for n, k in (("alice", KEY), ("bob", OTHER_KEY))))
    return app_for(tmp_path, auth={"enabled": True, "key_hashes_env": "ROUND3_KEYS", "rate_per_s": 1000,
                                   "burst": 1000})


# -- finding 2: failed keys must not lock out right keys -------------------------------------------------------
def test_wrong_keys_never_lock_out_right_keys_behind_a_shared_proxy(keyed_app):
    """21 wrong keys, then ~1/s, from behind ingress-nginx (HAProxy on loopback appends nginx's address): every
    real key got 429 for the whole test. Now right keys pass; the wrong ones are throttled."""
    client = client_at(keyed_app, "127.0.0.1")  # our HAProxy, a trusted proxy
    via_nginx = {"X-Forwarded-For": NGINX}
    statuses = [client.get("/v1/models", headers={**via_nginx, "Authorization": f"Bearer guess-{i}"}).status_code
                for i in range(AUTH_FAILURE_BURST + 5)]
    assert statuses[:AUTH_FAILURE_BURST] == [401] * AUTH_FAILURE_BURST and set(statuses[AUTH_FAILURE_BURST:]) == {429}
    for key in (KEY, OTHER_KEY):
        resp = client.get("/v1/models", headers={**via_nginx, "Authorization": f"Bearer {key}"})
        assert resp.status_code == 200, resp.text
    assert_error(client.get("/v1/models", headers={**via_nginx, "Authorization": "Bearer guess-x"}), 429,
                 "rate_limited")


def test_a_client_retrying_one_wrong_key_is_throttled_whatever_its_address(keyed_app):
    client = client_at(keyed_app, "127.0.0.1")
    statuses = [client.get("/v1/models", headers={"Authorization": "Bearer revoked-key",
                                                  "X-Forwarded-For": f"198.51.100.{i}"}).status_code
                for i in range(AUTH_FAILURE_BURST + 3)]
    assert statuses[-1] == 429 and statuses[0] == 401


def test_the_replica_bounds_failed_checks_from_rotating_addresses_and_keys(tmp_path, monkeypatch):
    from deployments.ingress.http import auth

    monkeypatch.setattr(auth, "GLOBAL_AUTH_FAILURES_PER_S", 0.001)  # no refill while the test runs
    monkeypatch.setenv("ROUND3_KEYS", "alice:" + hashlib.sha256(KEY.encode()).hexdigest())
    client = client_at(app_for(tmp_path, auth={"enabled": True, "key_hashes_env": "ROUND3_KEYS",
                                               "rate_per_s": 1000, "burst": 1000}), "127.0.0.1")
    statuses = [client.get("/v1/models", headers={"Authorization": f"Bearer g{i}",
                                                  "X-Forwarded-For": f"198.51.{i // 250}.{i % 250}"}).status_code
                for i in range(GLOBAL_AUTH_FAILURE_BURST + 3)]
    assert statuses[0] == 401 and statuses[-1] == 429
    assert client.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200


# -- finding 3: X-Forwarded-For only from trusted proxies ------------------------------------------------------
def test_forwarded_for_from_an_untrusted_peer_is_not_believed(keyed_app):
    """A client reaching the replica's own port directly sent 60 guesses with rotating X-Forwarded-For and was
    never throttled: its own address counts."""
    client = client_at(keyed_app, "203.0.113.50")
    statuses = [client.get("/v1/models", headers={"Authorization": "Bearer " + "g" * (i + 1),
                                                  "X-Forwarded-For": f"192.0.2.{i}"}).status_code
                for i in range(AUTH_FAILURE_BURST + 3)]
    assert statuses[:AUTH_FAILURE_BURST] == [401] * AUTH_FAILURE_BURST and statuses[-1] == 429


class _Req:
    def __init__(self, peer, *forwarded):
        from starlette.datastructures import Headers

        self.client = type("C", (), {"host": peer})() if peer else None
        self.headers = Headers(raw=[(b"x-forwarded-for", f.encode()) for f in forwarded])


@pytest.mark.parametrize("peer, forwarded, want", [
    ("127.0.0.1", ["203.0.113.7"], "203.0.113.7"),  # HAProxy appended the client
    ("127.0.0.1", ["6.6.6.6, 203.0.113.7"], "203.0.113.7"),  # what the client wrote itself is further left
    ("127.0.0.1", ["6.6.6.6", "203.0.113.7, 10.1.2.3"], "10.1.2.3"),  # nginx is not trusted by default
    ("127.0.0.1", [], None),  # only a proxy known
    ("::1", ["2001:db8::5"], "2001:db8::5"),
    ("198.51.100.4", ["203.0.113.7"], "198.51.100.4"),  # an untrusted peer: its header is ignored
    ("198.51.100.4", [], "198.51.100.4"),
])
def test_client_address_reads_forwarded_for_only_past_trusted_proxies(peer, forwarded, want):
    assert client_address(_Req(peer, *forwarded), TrustedProxies(["127.0.0.1/32", "::1/128"])) == want


def test_behind_nginx_its_range_is_configured_as_trusted():
    trusted = TrustedProxies(["127.0.0.1/32", "10.0.0.0/8"])
    assert client_address(_Req("127.0.0.1", "6.6.6.6, 203.0.113.7, 10.1.2.3"), trusted) == "203.0.113.7"


def test_trusted_proxies_are_validated(tmp_path):
    with pytest.raises(Exception, match="trusted_proxies"):
        AppArgs.model_validate({"identity_store": str(tmp_path), "trusted_proxies": ["not-an-address"]})


# -- auth enabled with no keys never fails open -----------------------------------------------------------------
@pytest.mark.parametrize("configured", ["", " , ", "alice:", "alice:" + "z" * 64, ":" + "0" * 64])
def test_auth_with_no_usable_keys_refuses_every_bearer(tmp_path, monkeypatch, configured):
    monkeypatch.setenv("ROUND3_EMPTY", configured)
    client = client_at(app_for(tmp_path, auth={"enabled": True, "key_hashes_env": "ROUND3_EMPTY"}), "127.0.0.1")
    for header in ("Bearer x", "Bearer alice", "Bearer " + "z" * 64, "Bearer ", "bearer  ", "Basic YTpi", None):
        headers = {"Authorization": header} if header is not None else {}
        assert_error(client.get("/v1/models", headers=headers), 401, "unauthorized")
    assert_error(client.post("/v1/generate", json=generate_request()), 401, "unauthorized")
    assert_error(client.post("/openai/v1/images/edits", data={"prompt": "x"},
                             files={"image": ("a.png", png_bytes(), "image/png")}), 401, "unauthorized")


# -- finding 4: upload slots are not starved by trickling bodies --------------------------------------------------
def test_trickling_bodies_do_not_starve_an_address(tmp_path, monkeypatch):
    """Auth off, one address: 4 bodies at a byte a second held every slot; other uploads got 429 on 39 of 39."""
    monkeypatch.setattr(readers, "GRACE_S", 0.3)
    app = app_for(tmp_path)
    body = b'{"face_images": ["' + b64(png_bytes()).encode() + b'"], "width": 64, "height": 64, "steps": 2}'

    async def trickle():
        for _ in range(30):
            yield b" "
            await asyncio.sleep(0.2)

    async def run():
        transport = httpx.ASGITransport(app=app, client=("198.51.100.9", 1234))
        async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=30) as ac:
            warm = await ac.post("/v1/generate", content=body, headers={"content-type": "application/json"})
            assert warm.status_code == 200, warm.text  # first-call imports done before the clock matters
            slow = [asyncio.ensure_future(ac.post("/v1/generate", content=trickle(),
                                                  headers={"content-type": "application/json"}))
                    for _ in range(readers.MAX_UPLOADS_PER_CLIENT)]
            await asyncio.sleep(0.6)
            started = time.monotonic()
            fast = await ac.post("/v1/generate", content=body, headers={"content-type": "application/json"})
            waited = time.monotonic() - started
            for task in slow:
                task.cancel()
            results = await asyncio.gather(*slow, return_exceptions=True)
            return fast, waited, results

    fast, waited, results = asyncio.run(run())
    assert fast.status_code == 200, fast.text
    assert waited < 5
    evicted = [r for r in results if isinstance(r, httpx.Response)]
    assert evicted and all(r.status_code == 408 for r in evicted)


def test_a_full_address_with_fast_bodies_is_still_429():
    slots = readers.UploadSlots(per_client=1)
    with slots.hold("a") as first:
        first.received = 10 ** 9  # fast
        from deployments.errors import ServiceError
        with pytest.raises(ServiceError) as err:
            with slots.hold("a"):
                pass
        assert err.value.status == 429


# -- finding 5: JSON parsed off the event loop, bounded -----------------------------------------------------------
def test_a_body_of_many_tiny_objects_is_refused_before_parsing(tmp_path):
    client = client_at(app_for(tmp_path), "198.51.100.1")
    body = b'{"face_images": [' + b",".join([b"{}"] * 200_000) + b"]}"
    resp = client.post("/v1/generate", content=body, headers={"content-type": "application/json"})
    err = assert_error(resp, 400, "invalid_json")
    assert "values" in err["message"]


def test_json_parsing_does_not_hold_the_event_loop(tmp_path, monkeypatch):
    real = readers.parse_json

    def slow(body):
        time.sleep(2.0)
        return real(body)

    app = app_for(tmp_path)

    async def run():
        transport = httpx.ASGITransport(app=app, client=("198.51.100.2", 1))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as ac:
            assert (await ac.post("/v1/generate", json=generate_request())).status_code == 200  # imports done
            monkeypatch.setattr(readers, "parse_json", slow)
            pending = asyncio.ensure_future(ac.post("/v1/generate", json=generate_request()))
            gaps, last = [], time.perf_counter()
            while not pending.done():  # how long the event loop goes without running this task
                await asyncio.sleep(0.01)
                now = time.perf_counter()
                gaps.append(now - last)
                last = now
            health = await ac.get("/healthz")
            return (await pending).status_code, health.status_code, max(gaps)

    status, health, longest = asyncio.run(run())
    assert status == 200 and health == 200
    assert longest < 1.0, longest  # the 2 s parse ran in a worker thread


# -- finding 7: the small ones -----------------------------------------------------------------------------------
def test_a_truncated_multipart_body_is_a_400_not_a_422(tmp_path):
    client = client_at(app_for(tmp_path), "198.51.100.3")
    request = httpx.Request("POST", "http://t/v1/generate", data={"prompt": "a person", "width": "64", "height": "64"},
                            files={"face_images": ("a.png", png_bytes(), "image/png")})
    body = request.read()
    resp = client.post("/v1/generate", content=body[:-60], headers={"content-type": request.headers["content-type"]})
    err = assert_error(resp, 400, "bad_request")
    assert "truncated" in err["message"]
    whole = client.post("/v1/generate", content=body, headers={"content-type": request.headers["content-type"]})
    assert whole.status_code == 200, whole.text


@pytest.mark.parametrize("value, status", [("0", 422), ("1", 422), ("yes", 422), ("false", 200), ("TRUE", 200)])
def test_a_form_boolean_is_true_or_false_only(tmp_path, value, status):
    """The schema says boolean; pydantic alone would read "0", "1" and "yes" as booleans too."""
    client = client_at(app_for(tmp_path), "198.51.100.8")
    resp = client.post("/v1/generate", data={"prompt": "a person", "width": "64", "height": "64",
                                              "identity_score": value},
                       files={"face_images": ("a.png", png_bytes(), "image/png")})
    assert resp.status_code == status, resp.text
    if status == 422:
        assert resp.json()["error"]["field"] == "identity_score"


@pytest.mark.parametrize("size", ["64x64\n", "64x64\r\n", " 64x64", "64x64 "])
def test_openai_size_with_trailing_newline_is_refused(tmp_path, size):
    client = client_at(app_for(tmp_path), "198.51.100.4")
    resp = client.post("/openai/v1/images/edits", data={"prompt": "x", "size": size},
                       files={"image": ("a.png", png_bytes(), "image/png")})
    assert resp.status_code in (400, 422), resp.text
    assert resp.json()["error"]["param"] == "size" if "param" in resp.json()["error"] else True


@pytest.mark.parametrize("path", ["/docs", "/redoc"])
def test_api_docs_pages_cannot_be_framed(tmp_path, path):
    client = client_at(app_for(tmp_path), "198.51.100.5")
    resp = client.get(path)
    assert resp.status_code == 200
    csp = resp.headers.get("content-security-policy", "")
    assert "frame-ancestors 'none'" in csp and "default-src" in csp
    assert resp.headers.get("x-frame-options") == "DENY"


@pytest.mark.parametrize("path", ["/healthz/", "/openai/v1/images/generations/", "/readyz/"])
def test_trailing_slash_answers_never_take_their_host_from_the_request(tmp_path, path):
    client = client_at(app_for(tmp_path), "198.51.100.6")
    resp = client.get(path, headers={"Host": "evil.example"}, follow_redirects=False)
    assert "evil.example" not in resp.headers.get("location", "")
    assert resp.status_code in (307, 308, 404, 405)
    if resp.status_code in (307, 308):
        assert resp.headers["location"].startswith("/")


def test_the_bare_route_prefix_redirects_to_its_page_by_path_only(tmp_path):
    """An app served at /s3: /s3 answers 308 to /s3/ (the page's relative URLs need the slash) with a path-only
    Location, whatever Host the client names; the page itself is at /s3/."""
    client = TestClient(app_for(tmp_path), root_path="/s3", client=("198.51.100.7", 40000))
    resp = client.get("/s3", headers={"Host": "evil.example"}, follow_redirects=False)
    assert resp.status_code == 308 and resp.headers["location"] == "/s3/"
    page = client.get("/s3/", follow_redirects=False)
    assert page.status_code == 200 and 'src="playground/app.js"' in page.text


# -- webhook signatures by a known answer, lookalike hosts -------------------------------------------------------
def test_the_signature_is_hmac_sha256_of_timestamp_dot_body():
    from deployments.ingress.jobs.webhooks import sign, verify

    secret, body, t = "whsec_test", b'{"id":"job_1","status":"succeeded"}', 1_700_000_000
    want = hmac.new(secret.encode(), b"1700000000." + body, hashlib.sha256).hexdigest()
    assert sign(secret, body, t) == f"t=1700000000,v1={want}"
    assert verify(secret, body, f"t=1700000000,v1={want}", now=t + 10)
    assert not verify(secret, body, f"t=1700000001,v1={want}", now=t + 10)  # tampered timestamp
    assert not verify(secret, body + b" ", f"t=1700000000,v1={want}", now=t + 10)
    assert not verify(secret, body, f"t=1700000000,v1={want}", now=t + 301)  # too old: a replay
    assert not verify(secret, body, "t=1700000000", now=t)
    assert not verify("other", body, f"t=1700000000,v1={want}", now=t)


@pytest.mark.parametrize("host, allowed", [
    ("hooks.example.com", True), ("HOOKS.example.com.", True), ("a.corp.example", True),
    ("hooks.example.com.evil.net", False), ("evilhooks.example.com", False), ("hooks.example.co", False),
    ("corp.example", False), ("evilcorp.example", False), ("corp.example.evil", False), ("xn--hoks-6qa.example.com",
                                                                                          False),
])
def test_lookalike_hosts_are_refused(host, allowed):
    from deployments.ingress.jobs.webhooks import host_allowed

    assert host_allowed(host, ["hooks.example.com", "*.corp.example"]) is allowed


@pytest.mark.parametrize("url, ok", [
    ("https://hooks.example.com/x", True), ("https://hooks.example.com:443/x", True),
    ("https://hooks.example.com:8443/x", False), ("http://localhost:8265/api/jobs/", False),
    ("http://localhost/x", True), ("http://localhost:9000/x", True), ("http://127.0.0.1:8265/x", False),
    ("http://127.0.0.1:*/x", False),
])
def test_the_webhook_allowlist_compares_ports(url, ok):
    from deployments.config import WebhookConfig
    from deployments.errors import ServiceError
    from deployments.ingress.jobs.webhooks import WebhookSender

    sender = WebhookSender(WebhookConfig(allowed_hosts=["hooks.example.com", "localhost", "localhost:9000",
                                                        "127.0.0.1:9000"], allow_http=True))
    sender.secret = lambda: "s"
    if ok:
        assert sender.check(url) == url
    else:
        with pytest.raises(ServiceError):
            sender.check(url)


def test_a_redirect_is_neither_followed_nor_retried(monkeypatch):
    """A 3xx was retried like a failure (4 POSTs); it is the receiver's answer: one POST, not delivered, and the
    redirect's target is never called."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from deployments.config import WebhookConfig
    from deployments.ingress.jobs.webhooks import WebhookSender

    hits = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            hits.append(self.path)
            self.rfile.read(int(self.headers["content-length"]))
            self.send_response(302 if self.path == "/hook" else 204)
            self.send_header("Location", "/elsewhere")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *a):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("ROUND3_SECRET", "s")
        sender = WebhookSender(WebhookConfig(allowed_hosts=[f"127.0.0.1:{server.server_port}"], allow_http=True,
                                             secret_env="ROUND3_SECRET", backoff_s=0.01, max_attempts=4))
        url = sender.check(f"http://127.0.0.1:{server.server_port}/hook")
        assert asyncio.run(sender.deliver(url, {"id": "job_1"})) is False
    finally:
        server.shutdown()
    assert hits == ["/hook"]
