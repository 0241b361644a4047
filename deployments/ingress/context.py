"""Per-request state on the Ingress: who asks, when the request must end, and the backend calls in flight (so a
deadline or a client that went away cancels them)."""

from __future__ import annotations

import contextlib
import time
import uuid
from dataclasses import dataclass, field
from typing import Any


@dataclass
class RequestContext:
    """One request (HTTP, handle or a job's run): id, route, start time, per-stage timings and in-flight calls."""

    route: str
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    started: float = field(default_factory=time.perf_counter)
    timings: dict[str, Any] = field(default_factory=dict)
    pending: list = field(default_factory=list)
    api_key: str | None = None  # the caller's key name: the owner of identities it creates
    scope: str | None = None  # whose identities it may see (None: all; auth off, admin keys, handle API)
    deadline: float | None = None  # time.time() when the request times out (504); backends stop work past it

    async def call(self, response):
        """Await a backend call, tracked so that ``cancel_pending`` reaches it while it runs."""
        self.pending.append(response)
        try:
            return await response
        finally:
            with contextlib.suppress(ValueError):
                self.pending.remove(response)

    def cancel_pending(self) -> None:
        """Cancel every backend call still in flight (the Generator drops the rows at its next step)."""
        for response in list(self.pending):
            with contextlib.suppress(Exception):
                response.cancel()
