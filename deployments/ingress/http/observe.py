"""The metrics middleware: per-route request counts and latencies, and a JSON 500 (never a traceback) for
anything unhandled."""

from __future__ import annotations

import logging
import time
import uuid

from deployments import metrics
from deployments.errors import from_exception, json_response

log = logging.getLogger("instantid.serve")


class Observe:
    """ASGI middleware: per-route request metrics, and a JSON 500 (never a traceback) for anything unhandled."""

    def __init__(self, app, router=None):
        self.app = app
        self.router = router

    def _route(self, scope) -> str:
        """The matched route's template (/v1/identities/{identity_id}); 'other' for unmatched paths."""
        route = scope.get("route")  # set by the router on the (shared) scope once a route matched
        if route is not None and isinstance(getattr(route, "path", None), str):
            return route.path
        from starlette.routing import Match

        for candidate in getattr(self.router, "routes", []):
            path = getattr(candidate, "path", None)
            if not isinstance(path, str):
                continue
            try:
                if candidate.matches(scope)[0] == Match.FULL:
                    return path
            except Exception:
                continue
        return "other"

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        state = {"status": 500, "sent": False}

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                state["status"], state["sent"] = message["status"], True
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        except Exception as exc:
            if state["sent"]:
                log.error("error after the response started: %s", exc)
            else:
                await json_response(from_exception(exc, request_id=uuid.uuid4().hex))(scope, receive, send_wrapper)
        finally:
            metrics.request_done(self._route(scope), scope.get("method", ""), state["status"],
                                 time.perf_counter() - started)
