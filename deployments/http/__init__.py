"""The HTTP edge of the Ingress: thin modules around ``GenerationService`` (deployments/service.py).

app.py        the FastAPI app factory: probes (/healthz, /readyz), the /v1 router with auth, the surfaces
readers.py    bounded body reads, JSON / multipart / base64 decoding, image header checks
auth.py       API keys and per-key / per-address rate limits
observe.py    the metrics middleware (per-route counts and latencies; a JSON 500 for anything unhandled)
delivery.py   image encoding and S3 upload with presigned URLs
openapi.py    the OpenAPI document: request bodies in JSON and multipart, bounds from this deployment's limits
surfaces/     one module per API surface, translating its shapes to and from the service (native.py: /v1)
"""
