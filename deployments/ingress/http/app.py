"""The FastAPI app of one Ingress replica: the probes, the /v1 router behind auth, the API surfaces on it, the
metrics middleware and the OpenAPI document (bounds in its schemas come from ``service.args``)."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from deployments.errors import METHOD_NOT_ALLOWED, NOT_FOUND, ServiceError, install_handlers, json_response
from deployments.ingress.context import RequestContext
from deployments.ingress.http.auth import AccessControl, ReleaseSlots
from deployments.ingress.http.observe import Observe
from deployments.ingress.http.openapi import install_openapi
from deployments.ingress.http.playground import add_routes as add_playground  # POST /v1/faces:analyze, the page
from deployments.ingress.http.readers import UploadSlots, read_request
from deployments.ingress.http.surfaces import jobs, native, openai_images, replicate
from deployments.ingress.schemas import ErrorBody, Health, Readiness
from deployments.ingress.service import GenerationService

ERROR_STATUSES = (400, 401, 404, 413, 422, 429, 500, 503, 504)


@dataclass
class Edge:
    """What every surface's route needs from the HTTP edge: the service, the caller's context, and the body."""

    service: GenerationService
    access: AccessControl
    uploads: UploadSlots
    errors: dict  # OpenAPI ``responses`` for the error statuses

    def caller(self, route: str, request: Request) -> RequestContext:
        """A request's context with the caller's key name and identity scope (set by the auth dependency)."""
        api_key = getattr(request.state, "api_key", None)
        return RequestContext(route=route, api_key=api_key, scope=self.access.scope_of(api_key))

    async def read(self, request: Request, ctx: RequestContext, max_files: int,
                   file_fields: tuple[str, ...] = ("face_images", "pose_image")) -> tuple[dict, dict | None]:
        """The request's fields and files (JSON or multipart), within the caller's upload slots and the
        request's deadline; a failure is mapped as the service maps its own (``fail``)."""
        args = self.service.args
        who = getattr(request.state, "api_key", None) or self.access.client(request)
        try:
            return await read_request(request, self.uploads, who, args.limits.max_body_bytes,
                                      ctx.started + args.request_timeout_s, max_files, file_fields)
        except Exception as exc:
            raise self.service.fail(ctx, exc) from None


# The API docs pages load Swagger UI / ReDoc from jsDelivr and run one inline script; nothing may frame them
# (clickjacking: "Try it out" sends requests with the viewer's key).
DOCS_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline' https://cdn.jsdelivr.net; "
                               "style-src 'unsafe-inline' https://cdn.jsdelivr.net https://fonts.googleapis.com; "
                               "font-src https://fonts.gstatic.com; img-src 'self' data: https://fastapi.tiangolo.com "
                               "https://cdn.redoc.ly; connect-src 'self'; worker-src blob:; frame-ancestors 'none'; "
                               "base-uri 'none'; form-action 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
}


def add_docs(app: FastAPI) -> None:
    """/docs (Swagger UI, with its OAuth2 redirect page) and /redoc, as FastAPI serves them, with DOCS_HEADERS."""
    from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html

    def url(request: Request) -> str:  # behind a route prefix, as FastAPI's own docs routes do
        return request.scope.get("root_path", "").rstrip("/") + app.openapi_url

    def with_headers(response):
        response.headers.update(DOCS_HEADERS)
        return response

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui(request: Request):
        return with_headers(get_swagger_ui_html(openapi_url=url(request), title=f"{app.title} - Swagger UI",
                                                oauth2_redirect_url="/docs/oauth2-redirect"))

    @app.get("/docs/oauth2-redirect", include_in_schema=False)
    async def swagger_ui_redirect():
        return with_headers(get_swagger_ui_oauth2_redirect_html())

    @app.get("/redoc", include_in_schema=False)
    async def redoc(request: Request):
        return with_headers(get_redoc_html(openapi_url=url(request), title=f"{app.title} - ReDoc"))


class PrefixSlash:
    """ASGI middleware: the bare route prefix (``/s3`` of an app served at ``/s3``) answers 308 to ``<prefix>/``,
    where the page's relative URLs resolve. Its Location is a path, never a URL built from the Host header: the
    one redirect left once Starlette's trailing-slash redirects are off."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        root = scope.get("root_path", "") if scope["type"] == "http" else ""
        if root and scope["path"] in ("", root):
            await Response(status_code=308, headers={"Location": root + "/"})(scope, receive, send)
            return
        await self.app(scope, receive, send)


def build_http_app(service: GenerationService) -> FastAPI:
    """The FastAPI app of one Ingress replica."""
    args = service.args
    app = FastAPI(
        title="InstantID Serve",
        version="0.1.0",
        description="Identity-preserving image generation (InstantID on SDXL). Errors are "
                    '`{"error": {"code", "message", "field"?}}`. Limits of this deployment are in the schemas.',
        docs_url=None, redoc_url=None,  # served below, with a CSP
    )
    # no trailing-slash redirects: Starlette builds their Location from the Host header (an open redirect to
    # whatever host a client names); a path with a slash too many is a 404 like any unknown path
    app.router.redirect_slashes = False
    add_docs(app)
    install_handlers(app)
    edge = Edge(service, AccessControl(args.auth, args.trusted_proxies), UploadSlots(),
                {s: {"model": ErrorBody} for s in ERROR_STATUSES})
    app.add_middleware(ReleaseSlots, slots=edge.access.slots)  # inside Observe: a slot goes before metrics
    app.add_middleware(Observe, router=app.router)
    app.add_middleware(PrefixSlash)

    if args.auth.enabled:
        bearer = HTTPBearer(auto_error=False, description="API key")

        async def auth(request: Request, _creds: HTTPAuthorizationCredentials | None = Depends(bearer)):
            edge.access.admit(request)  # the key, its rate limit and one of its in-flight slots
    else:
        async def auth(request: Request):
            request.state.api_key = None

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(auth)])
    native.add_routes(v1, edge)

    add_playground(app, v1, edge)  # before the catch-all below: routes match in order
    if args.jobs.enabled:  # jobs.enabled false: no job routes (the catch-all's 404)
        jobs.add_routes(v1, edge)

    @v1.api_route("/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"],
                  include_in_schema=False)
    async def unknown(request: Request, path: str):
        """Any other /v1 path: after auth (no route discovery without a key); 405 where the path exists."""
        if allowed_methods(request.scope):
            raise method_not_allowed(request.scope)
        raise NOT_FOUND("no such route")

    def allowed_methods(scope) -> list[str]:
        """The methods of every route at this path (the catch-all above aside)."""
        from starlette.routing import Match

        return sorted({m for r in flat_routes([*v1.routes, *app.router.routes])
                       if getattr(r, "endpoint", None) is not unknown
                       and getattr(r, "methods", None)
                       and r.matches({**scope, "method": "__none__"})[0] == Match.PARTIAL
                       for m in r.methods})

    def flat_routes(routes) -> list:
        """The routes, those of included routers among them: FastAPI >= 0.16x keeps an included router as one
        entry (no ``.methods``; its routes under ``original_router``; included here without a prefix)."""
        out = []
        for route in routes:
            inner = getattr(route, "original_router", None)
            out.extend(flat_routes(inner.routes) if inner is not None else [route])
        return out

    def method_not_allowed(scope) -> ServiceError:
        return METHOD_NOT_ALLOWED("method not allowed",
                            headers={"Allow": ", ".join(allowed_methods(scope))})

    # Starlette answers a method no route lists (TRACE, QUERY, ...) with the first route at the path's methods
    # only; Allow must name all of them
    app.add_exception_handler(405, lambda request, _exc: json_response(method_not_allowed(request.scope)))

    app.include_router(v1)
    openai_images.add_routes(app, edge)  # /openai/v1
    if args.jobs.enabled:
        replicate.add_routes(app, edge)  # /replicate/v1

    @app.get("/healthz", response_model=Health, summary="Liveness: the Ingress answers")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz", response_model=Readiness, responses={503: {"model": Readiness}},
             summary="Readiness: FaceAnalyzer and Generator have replicas with their models loaded")
    async def readyz():
        state = await service.live_readiness()
        return JSONResponse(state, status_code=200 if state["ready"] else 503)

    install_openapi(app, service.schemas)
    return app
