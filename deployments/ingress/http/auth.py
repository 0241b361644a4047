"""API keys (Bearer, checked against sha256 hashes) and rate limits: a token bucket per key, and bounds on failed
key checks (per client address, per presented credential, and for the whole replica) that never refuse a right key.
A FastAPI dependency of the /v1 router (``AppArgs.auth``); the handle API is for trusted in-cluster callers and
skips them. ``client_address`` is where the edge learns who a caller is: X-Forwarded-For only from trusted
proxies."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import ipaddress
import math
import time

from deployments.ingress.http.api_keys import KeyHashSource
from deployments.errors import RATE_LIMITED, TOO_MANY_IN_FLIGHT, UNAUTHORIZED, ServiceError


class Authenticator:
    """Bearer API keys, checked against sha256 hashes ('name:sha256hex,...') from an env var or the file that
    <env var>_FILE names, re-read so that a rotated Secret reaches running replicas
    (deployments/ingress/http/api_keys.py). With no usable key configured every bearer is refused (401)."""

    def __init__(self, env_var: str):
        self.source = KeyHashSource(env_var)

    @property
    def hashes(self) -> dict[str, str]:
        return self.source.current()

    def check(self, authorization: str | None) -> str:
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise UNAUTHORIZED("missing API key: send 'Authorization: Bearer <key>'",
                               headers={"WWW-Authenticate": "Bearer"})
        digest = hashlib.sha256(token.strip().encode()).hexdigest()
        found = None
        for known, name in self.hashes.items():  # compare against all, in constant time each
            if hmac.compare_digest(known, digest):
                found = name
        if found is None:
            raise UNAUTHORIZED("invalid API key", headers={"WWW-Authenticate": "Bearer"})
        return found


class RateLimiter:
    """A token bucket per API key (per Ingress replica); also one per client address for failed logins."""

    def __init__(self, rate_per_s: float, burst: int, clock=time.monotonic):
        self.rate, self.burst, self.clock = float(rate_per_s), float(burst), clock
        self.buckets: dict[str, tuple[float, float]] = {}

    def take(self, key: str) -> None:
        now = self.clock()
        tokens, last = self.buckets.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        if tokens < 1.0:
            self.buckets[key] = (tokens, now)
            retry = max(1, math.ceil((1.0 - tokens) / self.rate))
            raise RATE_LIMITED("too many requests for this API key",
                               headers={"Retry-After": str(retry)})
        self.buckets[key] = (tokens - 1.0, now)

    def spend(self, key: str) -> None:
        """Take a token if one is left, never raising: the next ``take`` refuses once they are gone."""
        with contextlib.suppress(ServiceError):
            self.take(key)
        if len(self.buckets) > 100_000:  # many addresses: forget the ones that have refilled
            now = self.clock()
            self.buckets = {k: (t, last) for k, (t, last) in self.buckets.items()
                            if t + (now - last) * self.rate < self.burst}

    def exhausted(self, key: str) -> float | None:
        """Seconds until ``key`` has a token again; None when it has one now."""
        tokens, last = self.buckets.get(key, (self.burst, self.clock()))
        tokens = min(self.burst, tokens + (self.clock() - last) * self.rate)
        return None if tokens >= 1.0 else (1.0 - tokens) / self.rate


# Failed API key checks: a burst, then a steady rate, per client address (when known), per presented credential
# (a client retrying a revoked key) and for the whole replica (rotating addresses or keys). Past a bound a wrong
# key gets 429 instead of 401; a RIGHT key always passes: the key is checked first (a sha256 and a constant-time
# compare, cheap). Refusing right keys too (as before issue 30) let one client lock every key out behind a proxy
# that all clients share (ingress-nginx). Guessing is bounded by the keys themselves: docs/deploy.md makes them
# with secrets.token_urlsafe(32), 256 bits.
AUTH_FAILURE_BURST = 20
AUTH_FAILURES_PER_S = 1.0
GLOBAL_AUTH_FAILURE_BURST = 200
GLOBAL_AUTH_FAILURES_PER_S = 20.0


class TrustedProxies:
    """Addresses (CIDRs) whose X-Forwarded-For is believed: the proxies in front of this replica."""

    def __init__(self, cidrs: list[str]):
        self.networks = [ipaddress.ip_network(c, strict=False) for c in cidrs]

    def __contains__(self, address: str | None) -> bool:
        try:
            ip = ipaddress.ip_address((address or "").strip().strip("[]"))
        except ValueError:
            return False
        return any(ip in net for net in self.networks)


def client_address(request, trusted: TrustedProxies) -> str | None:
    """The client's address. The TCP peer, unless it is a trusted proxy (``AppArgs.trusted_proxies``: our HAProxy
    on the node's loopback, deployments/haproxy_guard.py): then the X-Forwarded-For entries are read from the
    right, past those that are trusted proxies too, and the first other one is the client (what a client writes
    into the header itself sits further left and is never read). None when only proxies are known (a proxy that
    does not forward the address: limiting it would let one client lock out all)."""
    peer = request.client.host if request.client else None
    if peer is None:
        return None
    if peer not in trusted:
        return peer[:64]
    entries = [e.strip() for h in request.headers.getlist("x-forwarded-for") for e in h.split(",")]
    for entry in reversed(entries):
        if entry and entry not in trusted:
            return entry[:64]
    return None


def _credential(authorization: str | None) -> str:
    """A short hash of what was presented (never the secret itself), the failure bucket of that credential."""
    return "key:" + hashlib.sha256((authorization or "").strip().encode()).hexdigest()[:16]


class KeySlots:
    """Calls in flight per API key on this Ingress replica (``auth.max_in_flight``): past the bound a call is
    answered 429 at once with Retry-After, instead of one key's long calls (``Prefer: wait``, event streams,
    /v1/generate) holding every slot of the replica while the other keys and the probes wait."""

    def __init__(self, limit: int, retry_after_s: int = 2):
        self.limit, self.retry_after_s = int(limit), int(retry_after_s)
        self.held: dict[str, int] = {}

    def take(self, key: str) -> None:
        held = self.held.get(key, 0)
        if self.limit and held >= self.limit:
            raise TOO_MANY_IN_FLIGHT(f"this API key has {held} calls in flight on this replica (auth.max_in_flight "
                                     f"{self.limit}); retry when one has ended",
                                     headers={"Retry-After": str(self.retry_after_s)})
        self.held[key] = held + 1

    def give(self, key: str) -> None:
        held = self.held.get(key, 0) - 1
        if held > 0:
            self.held[key] = held
        else:
            self.held.pop(key, None)


SLOT_KEY = "instantid_in_flight_key"  # in the request's scope state: the key whose slot the call holds


class ReleaseSlots:
    """ASGI middleware: gives back a call's in-flight slot once its response has ended (a stream's too)."""

    def __init__(self, app, slots: KeySlots):
        self.app, self.slots = app, slots

    async def __call__(self, scope, receive, send):
        try:
            await self.app(scope, receive, send)
        finally:
            key = (scope.get("state") or {}).pop(SLOT_KEY, None)
            if key is not None:
                self.slots.give(key)


class AccessControl:
    """Who a /v1 caller is (its key's name) and which identities it may see; throttles requests per key and failed
    checks per client address, per credential and per replica."""

    def __init__(self, auth_args, trusted_proxies: list[str] = ("127.0.0.1/32", "::1/128")):
        self.args = auth_args
        self.trusted = TrustedProxies(list(trusted_proxies))
        self.auth = Authenticator(auth_args.key_hashes_env) if auth_args.enabled else None
        self.limiter = RateLimiter(auth_args.rate_per_s, auth_args.burst) if auth_args.enabled else None
        self.failures = RateLimiter(AUTH_FAILURES_PER_S, AUTH_FAILURE_BURST)
        self.all_failures = RateLimiter(GLOBAL_AUTH_FAILURES_PER_S, GLOBAL_AUTH_FAILURE_BURST)
        self.slots = KeySlots(auth_args.max_in_flight)

    def client(self, request) -> str | None:
        """The caller's address (``client_address`` with this service's trusted proxies)."""
        return client_address(request, self.trusted)

    def scope_of(self, api_key: str | None) -> str | None:
        """The identity scope of a key: its own identities, or all of them for ``auth.admin_keys``."""
        if self.auth is None or api_key is None or api_key in self.args.admin_keys:
            return None
        return api_key

    def authenticate(self, authorization: str | None, client: str | None = None) -> str | None:
        """The key's name. A wrong key is 401, or 429 once its address, its credential or the replica is past its
        failure bound; a right key is never refused for others' failures (only by its own rate limit)."""
        if self.auth is None:
            return None
        try:
            name = self.auth.check(authorization)
        except ServiceError as refused:
            buckets = [(self.failures, _credential(authorization)), (self.all_failures, "*")]
            if client:
                buckets.append((self.failures, "addr:" + client))
            waits = [w for limiter, key in buckets if (w := limiter.exhausted(key)) is not None]
            for limiter, key in buckets:
                limiter.spend(key)
            if waits:
                raise RATE_LIMITED("too many failed API key checks",
                                   headers={"Retry-After": str(max(1, math.ceil(max(waits))))}) from None
            raise refused
        self.limiter.take(name)
        return name

    def admit(self, request) -> str | None:
        """Authenticate a request and hold one of its key's in-flight slots until its response ends
        (``ReleaseSlots``); sets ``request.state.api_key``."""
        name = self.authenticate(request.headers.get("authorization"), self.client(request))
        request.state.api_key = name
        if name is not None and SLOT_KEY not in request.scope.setdefault("state", {}):
            self.slots.take(name)
            request.scope["state"][SLOT_KEY] = name
        return name
