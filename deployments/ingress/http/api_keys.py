"""Where the Ingress finds its API-key hashes, and how a rotation reaches running replicas.

The hashes ('name:sha256hex,...') come from the environment variable named by ``auth.key_hashes_env``, or,
when ``<that name>_FILE`` is set, from that file. The Helm chart mounts the API-key Secret as such a file:
Kubernetes rewrites a mounted Secret in place when it changes (within about a minute), so re-reading the file
lets every replica pick up an added or revoked key without a restart. An environment variable is fixed for the
life of the process, which is why replicas used to disagree after a rotation.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Callable

log = logging.getLogger("instantid.auth")

RELOAD_INTERVAL_S = 5.0  # a file read at most this often, on demand (a few hundred bytes)


def parse_key_hashes(text: str, source: str) -> dict[str, str]:
    """{sha256 hex digest: key name} from 'name:sha256hex' entries separated by commas or newlines."""
    hashes: dict[str, str] = {}
    for entry in text.replace("\n", ",").split(","):
        entry = entry.strip()
        if not entry:
            continue
        name, sep, digest = entry.rpartition(":")
        digest = digest.strip().lower()
        if not sep or not name or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            log.warning("ignoring a malformed API key entry in %s (expected name:sha256hex)", source)
            continue
        hashes[digest] = name.strip()
    return hashes


class KeyHashSource:
    """The current API-key hashes: from ``env_var``, or re-read from the file ``<env_var>_FILE`` names."""

    def __init__(self, env_var: str, *, reload_interval_s: float | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.path = os.environ.get(f"{env_var}_FILE") or None
        self.interval = RELOAD_INTERVAL_S if reload_interval_s is None else reload_interval_s
        self.clock = clock
        self._text: str | None = None
        self._checked = float("-inf")
        if self.path is None:
            self._hashes = parse_key_hashes(os.environ.get(env_var) or "", env_var)
            if not self._hashes:
                log.warning("auth is enabled but %s holds no API keys: every /v1 call is refused", env_var)
        else:
            self._hashes = {}
            self.current()
            if not self._hashes:
                log.warning("auth is enabled but %s holds no API keys: every /v1 call is refused", self.path)

    def current(self) -> dict[str, str]:
        if self.path is None or self.clock() - self._checked < self.interval:
            return self._hashes
        self._checked = self.clock()
        try:
            with open(self.path, encoding="utf-8") as f:
                text = f.read()
        except OSError as exc:  # e.g. mid-swap of a Secret volume: keep the keys we had
            log.warning("cannot read API keys from %s (%s); keeping the %d loaded", self.path, type(exc).__name__,
                        len(self._hashes))
            return self._hashes
        if text != self._text:
            first = self._text is None
            self._text, self._hashes = text, parse_key_hashes(text, self.path)
            if not first:
                log.info("API keys reloaded from %s: %d key(s)", self.path, len(self._hashes))
        return self._hashes
