"""The Ingress's view of its backends (FaceAnalyzer, Generator): the handles it calls them through, and whether
they can serve, from Serve's status and by asking them.

Handles: by value over Serve's gRPC data plane for small messages (the cheapest path), by reference (an actor
call; large arguments and results through Ray's object store) for messages over ``BY_VALUE_MAX_BYTES``.
Readiness: Serve's status read at most once a second, off the request path after the first read; a backend
whose status says it failed makes requests that need it a fast 503 instead of a queue until the deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

from deployments.errors import RETRY_LATER, UNAVAILABLE, from_exception
from deployments.messages import ModelNotLoaded
from deployments.ray_compat import by_reference

READY_STATES = {"HEALTHY", "UPSCALING", "DOWNSCALING"}
DOWN_STATES = {"UNHEALTHY", "DEPLOY_FAILED"}
BACKENDS = ("FaceAnalyzer", "Generator")
# A backend call whose request or response carries more than this goes by reference (an actor call; large
# arguments and results through Ray's object store) instead of by value over Serve's gRPC data plane, which
# refuses messages over 4 MiB (Ray's replica gRPC max message length) and is slower from ~1 MB on: 15 MB by
# value 104 ms, by reference 19 ms; 48 MB 313 vs 19 ms (bench/data_plane.py, docs/reliability.md).
BY_VALUE_MAX_BYTES = 1024 * 1024


def _reason(message: str) -> str:
    """Why a deployment is not ready, from Serve's status message: the replica's own one-line reason
    (``ModelNotLoaded``, raised by check_health) when present, never a traceback."""
    found = ModelNotLoaded.reason_in(message)
    if found:
        return found
    lines = [line for line in (message or "").strip().splitlines() if line.strip()]
    return lines[0][:200] if lines and "Traceback" not in lines[0] else ""


class Backends:
    """The FaceAnalyzer and Generator handles of one Ingress replica, and their readiness."""

    def __init__(self, face, generator, *, status_fn=None, app_name: str | None = None):
        self.face = face
        self.generator = generator
        self._generators: dict[tuple[str, bool], Any] = {}
        self._face_large = None
        self._status_fn = status_fn
        self._app_name = app_name
        self._ready_cache: tuple[float, dict] | None = None
        self._probe_cache: tuple[float, dict] | None = None
        self._refresh: asyncio.Future | None = None
        self._status_messages: dict[str, str] = {}
        self._running: dict[str, int] = {}  # RUNNING replicas per deployment, from the last status read

    # -- handles -----------------------------------------------------------------------------------------
    def generator_for(self, model: str, message_bytes: int = 0):
        """The Generator's handle for ``model``, by reference when a message is over BY_VALUE_MAX_BYTES."""
        large = message_bytes > BY_VALUE_MAX_BYTES
        handle = self._generators.get((model, large))
        if handle is None:
            handle = self._generators[(model, large)] = (by_reference(self.generator, multiplexed_model_id=model)
                                                         if large else
                                                         self.generator.options(multiplexed_model_id=model))
        return handle

    def face_for(self, message_bytes: int):
        """The FaceAnalyzer's handle, by reference when the photos are over BY_VALUE_MAX_BYTES."""
        if message_bytes <= BY_VALUE_MAX_BYTES:
            return self.face
        if self._face_large is None:
            self._face_large = by_reference(self.face)
        return self._face_large

    # -- readiness ---------------------------------------------------------------------------------------
    async def require(self, names: tuple[str, ...]) -> None:
        """Fail fast with 503 when a backend this request needs has no healthy replica (it died and is being
        replaced, or its model failed to load), instead of queueing until the deadline."""
        down = self._down(self._known_readiness() or await self.readiness(), names)
        if down:  # the cached view may predate a replacement replica: look again before refusing
            down = self._down(await self.readiness(fresh=True), names)
        if down:
            raise UNAVAILABLE(f"{', '.join(down)} is unavailable; retry later",
                               headers=RETRY_LATER)

    def _down(self, state: dict, names: tuple[str, ...]) -> list[str]:
        """Backends with no running replica whose status says they failed. Serve's status lags: a replacement
        replica serves a moment before its deployment is HEALTHY again, so a running replica counts."""
        statuses = state.get("deployments", {})
        return [n for n in names if not self._running.get(n) and (statuses.get(n) in DOWN_STATES or (
            statuses.get(n) not in READY_STATES
            and ModelNotLoaded.reason_in(self._status_messages.get(n, "")) is not None))]

    def _known_readiness(self) -> dict | None:
        """The last status read, without waiting: a stale one starts a single background refresh, so reading
        Serve's status (a controller round trip) never sits on a request's path after the first one."""
        stale = self._ready_cache is None or time.monotonic() - self._ready_cache[0] >= 1.0
        if stale and (self._refresh is None or self._refresh.done()):
            self._refresh = asyncio.ensure_future(self.readiness())
        return self._ready_cache[1] if self._ready_cache else None

    async def readiness(self, fresh: bool = False) -> dict:
        """Serve's view of the backends, read at most once a second (four times when ``fresh``: a backend that
        looks down is looked at again, but a flood of refused requests never floods the controller)."""
        now = time.monotonic()
        if self._ready_cache and now - self._ready_cache[0] < (0.25 if fresh else 1.0):
            return self._ready_cache[1]
        try:
            statuses = await asyncio.to_thread(self._status_fn or self._serve_status)
            ready = all(statuses.get(name) in READY_STATES for name in BACKENDS)
            result = {"ready": ready, "deployments": statuses}
            if not ready:
                waiting = [n for n in BACKENDS if statuses.get(n) not in READY_STATES]
                reasons = [f"{n}: {_reason(self._status_messages.get(n, ''))}" for n in waiting
                           if _reason(self._status_messages.get(n, ""))]
                result["message"] = (f"not ready: {', '.join(waiting)} (model not loaded or replicas starting)"
                                     + (f"; {'; '.join(reasons)}" if reasons else ""))
        except Exception as exc:
            result = {"ready": False, "deployments": {}, "message": f"cannot read Serve status: {type(exc).__name__}"}
        self._ready_cache = (now, result)
        return result

    async def live_readiness(self, timeout_s: float = 2.0) -> dict:
        """/readyz: Serve's view (``readiness``) and, when that says ready, each backend asked directly: a backend
        whose queue is full, that does not answer within ``timeout_s``, or whose replica says it is not ready
        (a Generator stuck on abandoned work) makes the service not ready. At most one probe a second."""
        state = await self.readiness()
        if not state["ready"]:
            return state
        now = time.monotonic()
        if self._probe_cache and now - self._probe_cache[0] < 1.0:
            return self._probe_cache[1]

        async def ask(name: str, handle) -> str | None:
            if name == "Generator" and self._running.get(name) == 0:
                return None  # scaled to zero: asking would start a replica; Serve's view suffices
            response = handle.ready.remote()
            try:
                answer = await asyncio.wait_for(asyncio.ensure_future(response), timeout_s)
            except asyncio.TimeoutError:
                with contextlib.suppress(Exception):
                    response.cancel()
                return f"{name}: no answer within {timeout_s:g}s (busy or queue full)"
            except Exception as exc:
                return f"{name}: {from_exception(exc).message}"
            return None if answer.ready else f"{name}: {answer.error or 'not ready'}"

        problems = [p for p in await asyncio.gather(ask("FaceAnalyzer", self.face), ask("Generator", self.generator))
                    if p]
        result = state if not problems else {**state, "ready": False, "message": "not ready: " + "; ".join(problems)}
        self._probe_cache = (now, result)
        return result

    def _serve_status(self) -> dict[str, str]:
        from ray import serve

        app_name = self._app_name or serve.get_replica_context().app_name
        app = serve.status().applications[app_name]
        self._status_messages = {name: str(d.message or "") for name, d in app.deployments.items()}
        self._running = {name: sum(n for state, n in d.replica_states.items()
                                   if str(getattr(state, "value", state)) == "RUNNING")
                         for name, d in app.deployments.items()}
        return {name: str(getattr(d.status, "value", d.status)) for name, d in app.deployments.items()}
