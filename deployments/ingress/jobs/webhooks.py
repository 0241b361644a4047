"""Webhooks: one POST of a finished job to the URL given at submit, from the Ingress (never the Generator).

- Allowlist: only hosts in ``jobs.webhooks.allowed_hosts`` are called (exact names, or ``*.example.com`` for its
  subdomains), and only on their port: an entry without one allows the scheme's default port (443, 80),
  ``host:8443`` that port, ``host:*`` any (``http://localhost:8265/api/jobs/``, the Ray dashboard's job API, is not
  ``localhost``'s receiver); a URL outside it is refused at submit with 422, so the service is no open relay into the
  cluster's network (SSRF). https only unless ``allow_http``. The URL's host is checked, never resolved
  addresses: list names you control. The URL must parse the same with urllib and with yarl (aiohttp's parser,
  the sender's): one it cannot parse, or where it reads another host, is refused; user info (``user@``) too.
- Signature: ``X-InstantID-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>">`` with the secret
  from the env var ``secret_env`` names (the scheme Stripe uses: the timestamp inside the MAC stops replays).
  ``X-InstantID-Webhook-Id`` is the same on every retry of one delivery, so receivers can drop duplicates.
- Delivery: ``max_attempts`` tries, ``timeout_s`` each, backoff ``backoff_s`` doubling; a 2xx ends it, a 4xx
  other than 408/429 too (the receiver refused it: retrying cannot help), and a 3xx (never followed: a redirect
  could lead past the allowlist; retrying gets the same redirect). Sent by a background task.

Client: aiohttp, already installed with ``ray[serve]`` (no new dependency).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import os
import time
import uuid
from urllib.parse import urlsplit

from deployments import metrics
from deployments.errors import INVALID_PARAMETER

log = logging.getLogger("instantid.serve")

SIGNATURE_HEADER = "X-InstantID-Signature"
MAX_URL_CHARS = 2048


def sign(secret: str, body: bytes, timestamp: int) -> str:
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def verify(secret: str, body: bytes, header: str, tolerance_s: float = 300, now: float | None = None) -> bool:
    """What a receiver does (and the tests): the MAC matches and the timestamp is recent."""
    try:
        parts = dict(p.split("=", 1) for p in header.split(","))
        timestamp = int(parts["t"])
    except (ValueError, KeyError):
        return False
    if abs((now or time.time()) - timestamp) > tolerance_s:
        return False
    return hmac.compare_digest(sign(secret, body, timestamp), header)


def sender_host(url: str) -> str | None:
    """The host the sender (aiohttp, through yarl) reads in ``url``; ValueError where it cannot parse it (a
    backslash or '[' in the authority...); None when yarl is not installed (the sender cannot run either)."""
    try:
        import yarl
    except ImportError:
        return None
    try:
        host = yarl.URL(url).raw_host
    except (ValueError, TypeError) as exc:
        raise ValueError(str(exc)) from None
    return (host or "").strip("[]")


def same_host(a: str, b: str) -> bool:
    """Whether two spellings name one host (case, a trailing dot and IDNA encoding aside)."""
    def norm(host: str) -> str:
        host = host.lower().rstrip(".")
        try:
            return host.encode("idna").decode()
        except UnicodeError:
            return host
    return norm(a) == norm(b)


DEFAULT_PORTS = {"https": 443, "http": 80}


def _split_entry(entry: str) -> tuple[str, str | None]:
    """An allowlist entry as (host pattern, port or '*' or None): 'h', 'h:8443', 'h:*', '[::1]:8443'."""
    entry = entry.strip().lower()
    if entry.startswith("["):
        host, _, rest = entry[1:].partition("]")
        return host, rest[1:] if rest.startswith(":") else None
    if entry.count(":") == 1:
        host, _, port = entry.partition(":")
        return host, port
    return entry, None


def host_allowed(host: str, allowed: list[str], port: int | None = None, scheme: str = "https") -> bool:
    """Whether ``host`` on ``port`` (None: the scheme's default) matches an allowlist entry, its port included."""
    host = host.lower().rstrip(".")
    port = DEFAULT_PORTS.get(scheme) if port is None else port
    for entry in allowed:
        pattern, entry_port = _split_entry(entry)
        pattern = pattern.rstrip(".")
        if entry_port is None:
            port_ok = port == DEFAULT_PORTS.get(scheme)
        else:
            port_ok = entry_port == "*" or (entry_port.isdigit() and int(entry_port) == port)
        if not port_ok:
            continue
        if pattern.startswith("*.") and host.endswith(pattern[1:]) and len(host) > len(pattern) - 1:
            return True
        if host == pattern:
            return True
    return False


class WebhookSender:
    def __init__(self, config):
        self.config = config
        self.tasks: set[asyncio.Task] = set()

    def secret(self) -> str | None:
        return os.environ.get(self.config.secret_env) or None

    def check(self, url, field: str = "webhook") -> str:
        """The URL, or 422 naming ``field``: well-formed, https (or http when allowed), an allowed host."""
        if not isinstance(url, str) or not url or len(url) > MAX_URL_CHARS:
            raise INVALID_PARAMETER(f"{field}: a URL of at most {MAX_URL_CHARS} characters",
                               field=field)
        try:
            parts = urlsplit(url)
            host = parts.hostname or ""
            port = parts.port  # raises on a malformed port
            sent = sender_host(url)  # the host aiohttp (the sender) will call: it must be the one checked
        except ValueError:
            raise INVALID_PARAMETER(f"{field}: not a valid URL", field=field) from None
        if "@" in parts.netloc or parts.username is not None or parts.password is not None:
            raise INVALID_PARAMETER(f"{field}: a URL with user info (user:password@) is not "
                               "accepted", field=field)
        if sent is not None and not same_host(sent, host):
            raise INVALID_PARAMETER(f"{field}: not a valid URL", field=field)
        schemes = ("https", "http") if self.config.allow_http else ("https",)
        if parts.scheme not in schemes or not host:
            raise INVALID_PARAMETER(f"{field}: must be an {' or '.join(schemes)} URL",
                               field=field)
        if not host_allowed(host, self.config.allowed_hosts, port, parts.scheme):
            raise INVALID_PARAMETER(f"{field}: host not in this service's webhook allowlist",
                               field=field)
        if self.secret() is None:
            raise INVALID_PARAMETER(f"{field}: webhooks are not configured on this service "
                               f"(no signing secret)", field=field)
        return url

    def send(self, url: str, payload: dict | str) -> asyncio.Task:
        """Deliver in the background; the caller never waits."""
        task = asyncio.ensure_future(self.deliver(url, payload))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    async def deliver(self, url: str, payload: dict | str) -> bool:
        import aiohttp

        secret = self.secret()
        if secret is None:
            log.warning("webhook not sent: %s is unset", self.config.secret_env)
            metrics.webhook("failed")
            return False
        # a str is the JSON already (the job core serialises the final job once, off the event loop)
        body = (payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))).encode()
        delivery = uuid.uuid4().hex
        delay = self.config.backoff_s
        timeout = aiohttp.ClientTimeout(total=self.config.timeout_s)
        for attempt in range(1, self.config.max_attempts + 1):
            headers = {"Content-Type": "application/json", "User-Agent": "instantid-serve-webhook",
                       "X-InstantID-Webhook-Id": delivery,
                       SIGNATURE_HEADER: sign(secret, body, int(time.time()))}
            status = None
            try:
                async with aiohttp.ClientSession(timeout=timeout) as session:
                    # no redirects: a 30x to another host would step around the allowlist
                    async with session.post(url, data=body, headers=headers, allow_redirects=False) as resp:
                        status = resp.status
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                log.info("webhook attempt %d failed: %s", attempt, type(exc).__name__)
            if status is not None and (200 <= status < 400 or (400 <= status < 500 and status not in (408, 429))):
                ok = status < 300
                metrics.webhook("delivered" if ok else "refused")
                return ok
            if attempt < self.config.max_attempts:
                await asyncio.sleep(delay)
                delay *= 2
        metrics.webhook("failed")
        log.warning("webhook gave up after %d attempts", self.config.max_attempts)
        return False
