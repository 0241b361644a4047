"""Schemathesis against the live app's own OpenAPI (/openapi.json of the shared ``instantid`` app on
127.0.0.1): every operation, positive and negative examples (JSON and multipart bodies, path and query
parameters), bounded (max_examples per operation, no deadline, no shrinking).

Checks: not_a_server_error (no 5xx), status_code_conformance (the status is documented),
content_type_conformance, response_headers_conformance and response_schema_conformance (the body matches
the documented schema, error bodies included). Excluded, with the reason:
- positive_data_acceptance: a schema-valid request can still be refused by what a schema cannot say
  (base64 that is not an image -> 400, an identity id that does not exist -> 404, no face -> 422);
- negative_data_rejection: the multipart form treats an empty field as "not given" (documented), so some
  schema-invalid forms are accepted;
- max_response_time and the stateful checks (use_after_free, ensure_resource_availability,
  ignored_auth): not about conformance, or need links/auth the spec does not declare.
503/504 would only mean "overloaded/too slow": they are not expected here and would fail
not_a_server_error like any 5xx.
"""

from __future__ import annotations

import time

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.checks import (content_type_conformance, not_a_server_error, response_headers_conformance,
                                 response_schema_conformance, status_code_conformance)

pytestmark = pytest.mark.serve

MAX_EXAMPLES = 25
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
          response_schema_conformance]
COUNTS: dict[str, int] = {}


OPERATIONS = [("POST", "/v1/generate"), ("POST", "/v1/identities"), ("GET", "/v1/identities"),
              ("GET", "/v1/identities/{identity_id}"), ("DELETE", "/v1/identities/{identity_id}"),
              ("GET", "/v1/models"), ("GET", "/healthz"), ("GET", "/readyz"), ("POST", "/v1/faces:analyze"),
              ("POST", "/v1/jobs"), ("GET", "/v1/jobs/{job_id}"), ("POST", "/v1/jobs/{job_id}/cancel"),
              ("GET", "/v1/jobs/{job_id}/events")]
# The OpenAI and Replicate surfaces are left out of /openapi.json (their schemas are OpenAI's and Replicate's);
# tests/deployments/test_surfaces.py drives them with the real clients.


@pytest.fixture(scope="module")
def api_schema(serve_env):
    return schemathesis.openapi.from_url(f"{serve_env.base_url}/openapi.json")


def test_every_operation_is_fuzzed(api_schema):
    found = {(op.method.upper(), op.path) for op in (r.ok() for r in api_schema.get_all_operations())}
    assert found == set(OPERATIONS), found


# negative data only exists where the schema constrains something (bodies, the limit query parameter)
NEGATIVE = [("POST", "/v1/generate"), ("POST", "/v1/identities"), ("GET", "/v1/identities"),
            ("POST", "/v1/faces:analyze"), ("POST", "/v1/jobs")]
CASES = ([(m, p, schemathesis.GenerationMode.POSITIVE) for m, p in OPERATIONS]
         + [(m, p, schemathesis.GenerationMode.NEGATIVE) for m, p in NEGATIVE])


@pytest.mark.parametrize("method,path,mode", CASES, ids=[f"{m} {p} {g.value}" for m, p, g in CASES])
def test_api_conforms_and_never_5xx(api_schema, serve_env, method, path, mode):
    operation = api_schema[path][method]
    calls = []

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=MAX_EXAMPLES, deadline=None, phases=[Phase.generate], derandomize=True,
              database=None, suppress_health_check=list(HealthCheck))
    def fuzz(case):
        started = time.monotonic()
        response = case.call(base_url=serve_env.base_url, timeout=60)
        assert time.monotonic() - started < 60
        calls.append(response.status_code)
        case.validate_response(response, checks=CHECKS)

    fuzz()
    for status in calls:
        key = f"{method} {path} {mode.value} {status}"
        COUNTS[key] = COUNTS.get(key, 0) + 1
    assert calls


# The probe's hostile but valid JSON, which a schema-driven fuzzer does not produce: deep nesting, integers past
# Python's int-string limit, deep objects in a multipart field. Each must be a 4xx JSON answer.
HOSTILE_JSON = {
    "nested-100k": b"[" * 100_000 + b"]" * 100_000,
    "nested-object-field": b'{"prompt": ' + b'{"a":' * 50_000 + b"1" + b"}" * 50_001,
    "seed-5000-digits": b'{"seed": ' + b"9" * 5000 + b"}",
    "guidance-5000-digits": b'{"guidance_scale": ' + b"9" * 5000 + b"}",
    "width-negative-5000-digits": b'{"width": -' + b"9" * 5000 + b"}",
    "float-5000-digits": b'{"guidance_scale": 1.' + b"9" * 5000 + b"}",
    "exponent-huge": b'{"guidance_scale": 1e999999999}',
}


@pytest.mark.parametrize("path", ["/v1/generate", "/v1/identities"])
@pytest.mark.parametrize("name", sorted(HOSTILE_JSON))
def test_hostile_json_never_5xx(http, path, name):
    resp = http.post(path, content=HOSTILE_JSON[name], headers={"Content-Type": "application/json"})
    key = f"POST {path} hostile-json {resp.status_code}"
    COUNTS[key] = COUNTS.get(key, 0) + 1
    assert 400 <= resp.status_code < 500 and set(resp.json()) == {"error"}, resp.text[:300]


@pytest.mark.parametrize("loras", ['{"a":' * 50_000 + "1" + "}" * 50_000, "[" * 100_000, "9" * 5000])
def test_hostile_multipart_loras_never_5xx(http, loras):
    from serve_helpers import png_bytes

    resp = http.post("/v1/generate", files=[("face_images", ("a.png", png_bytes(), "image/png"))],
                     data={"loras": loras, "width": "64", "height": "64", "steps": "2"})
    key = f"POST /v1/generate multipart-loras {resp.status_code}"
    COUNTS[key] = COUNTS.get(key, 0) + 1
    assert resp.status_code == 422 and resp.json()["error"]["field"] == "loras", resp.text[:300]


def test_fuzz_summary():
    """Prints what the fuzzing above produced (status split per operation), for docs/reliability.md."""
    if COUNTS:
        print("\nfuzz responses:\n  " + "\n  ".join(f"{k}: {v}" for k, v in sorted(COUNTS.items())),
              f"\n  total {sum(COUNTS.values())}")
        assert not [k for k in COUNTS if k.rsplit(" ", 1)[1].startswith("5")]
