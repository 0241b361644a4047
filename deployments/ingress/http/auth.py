"""API keys (Bearer, checked against sha256 hashes) and rate limits: a token bucket per key, and one per client
address for failed key checks. A FastAPI dependency of the /v1 router (``AppArgs.auth``); the handle API is
for trusted in-cluster callers and skips them."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import math
import time

from deployments.ingress.http.api_keys import KeyHashSource
from deployments.errors import RATE_LIMITED, TOO_MANY_IN_FLIGHT, UNAUTHORIZED, ServiceError


class Authenticator:
    """Bearer API keys, checked against sha256 hashes ('name:sha256hex,...') from an env var or the file that
    <env var>_FILE names, re-read so that a rotated Secret reaches running replicas (deployments/ingress/http/api_keys.py)."""

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


# Failed API key checks per client address: a burst, then one a second. Past it every /v1 call of that address,
# with a right key or a wrong one, is a 429 until the bucket refills, so keys cannot be guessed faster than
# this (~600 guesses a second before). Clients behind one NAT address share the bucket.
AUTH_FAILURE_BURST = 20


AUTH_FAILURES_PER_S = 1.0


def client_address(request) -> str | None:
    """The client's address: the last X-Forwarded-For entry, the one our HAProxy appends
    (deployments/haproxy_guard.py). None without one: behind a proxy that does not add it (Serve's Python
    proxy, ``serve.httpIngress: proxy``) the peer is the proxy, shared by every client, and limiting it would let one client lock out all."""
    forwarded = request.headers.getlist("x-forwarded-for")
    if forwarded:
        return forwarded[-1].split(",")[-1].strip()[:64] or None
    return None


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
    """Who a /v1 caller is (its key's name) and which identities it may see; throttles failed checks per client
    address and requests per key."""

    def __init__(self, auth_args):
        self.args = auth_args
        self.auth = Authenticator(auth_args.key_hashes_env) if auth_args.enabled else None
        self.limiter = RateLimiter(auth_args.rate_per_s, auth_args.burst) if auth_args.enabled else None
        self.failures = RateLimiter(AUTH_FAILURES_PER_S, AUTH_FAILURE_BURST)
        self.slots = KeySlots(auth_args.max_in_flight)

    def scope_of(self, api_key: str | None) -> str | None:
        """The identity scope of a key: its own identities, or all of them for ``auth.admin_keys``."""
        if self.auth is None or api_key is None or api_key in self.args.admin_keys:
            return None
        return api_key

    def authenticate(self, authorization: str | None, client: str | None = None) -> str | None:
        """The key's name; failed checks are throttled per client address when it is known."""
        if self.auth is None:
            return None
        wait = self.failures.exhausted(client) if client else None
        if wait is not None:
            raise RATE_LIMITED("too many failed API key checks from this address",
                               headers={"Retry-After": str(max(1, math.ceil(wait)))})
        try:
            name = self.auth.check(authorization)
        except ServiceError:
            if client:
                self.failures.spend(client)
            raise
        self.limiter.take(name)
        return name

    def admit(self, request) -> str | None:
        """Authenticate a request and hold one of its key's in-flight slots until its response ends
        (``ReleaseSlots``); sets ``request.state.api_key``."""
        name = self.authenticate(request.headers.get("authorization"), client_address(request))
        request.state.api_key = name
        if name is not None and SLOT_KEY not in request.scope.setdefault("state", {}):
            self.slots.take(name)
            request.scope["state"][SLOT_KEY] = name
        return name
