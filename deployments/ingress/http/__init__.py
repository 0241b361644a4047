"""The HTTP edge of the Ingress: thin modules around ``GenerationService`` (deployments/ingress/service.py).

app.py        the FastAPI app factory: probes (/healthz, /readyz), the /v1 router with auth, the surfaces
readers.py    bounded body reads, JSON and multipart forms (the fields' own checks: ../inputs.py)
auth.py       API keys (api_keys.py: the key hashes, re-read on rotation) and per-key / per-address rate limits
observe.py    the metrics middleware (per-route counts and latencies; a JSON 500 for anything unhandled)
openapi.py    the OpenAPI document: request bodies in JSON and multipart, bounds from this deployment's limits
surfaces/     one module per API surface, translating its shapes to and from the service (native.py: /v1)
playground/   the browser page at / and POST /v1/faces:analyze
"""
