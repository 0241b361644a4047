"""Schemathesis against the live app's own OpenAPI (/openapi.json of the shared ``instantid`` app on
127.0.0.1), through its CLI: every operation, every phase (coverage, fuzzing, stateful; examples when the
schema has some) and every check (``--checks all``: server errors, status codes, content types, headers and
bodies against the schema, negative data rejected, positive data accepted, missing headers, unsupported
methods and their ``Allow`` headers, use after delete, resource availability, auth...). Bounded: 25 examples
per operation, one worker, fixed seed (``INSTANTID_FUZZ_SEED`` to vary it), no shrinking; about 30 s on 2 cores.

Two stock checks run in a form that knows what a schema cannot say (tests/deployments/schemathesis_hooks.py):
``positive_data_acceptance`` excuses refusals of an image's content (not decodable, too many pixels, no face)
and of work past the deadline; ``not_a_server_error`` excuses the 504 of a request that set its own
``timeout_s``. The hooks also give the face operations a real face photo, so identities get stored and the
stateful phase follows the links from them (get, delete, use after delete).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import schemathesis

pytestmark = pytest.mark.serve

MAX_EXAMPLES = 25
COUNTS: dict[str, int] = {}

OPERATIONS = [("POST", "/v1/generate"), ("POST", "/v1/identities"), ("GET", "/v1/identities"),
              ("GET", "/v1/identities/{identity_id}"), ("DELETE", "/v1/identities/{identity_id}"),
              ("GET", "/v1/models"), ("GET", "/healthz"), ("GET", "/readyz"), ("POST", "/v1/faces:analyze"),
              ("POST", "/v1/jobs"), ("GET", "/v1/jobs"), ("GET", "/v1/jobs/{job_id}"), ("POST", "/v1/jobs/{job_id}/cancel"),
              ("GET", "/v1/jobs/{job_id}/events")]
# The OpenAI and Replicate surfaces are left out of /openapi.json (their schemas are OpenAI's and Replicate's);
# tests/deployments/ingress/http/test_surfaces.py drives them with the real clients.


@pytest.fixture(scope="module")
def api_schema(serve_env):
    return schemathesis.openapi.from_url(f"{serve_env.base_url}/openapi.json")


def test_every_operation_is_fuzzed(api_schema):
    found = {(op.method.upper(), op.path) for op in (r.ok() for r in api_schema.get_all_operations())}
    assert found == set(OPERATIONS), found


def _failures(output: str) -> str:
    """The report's failures and summary, without the (huge) curl lines."""
    return "\n".join(line[:500] for line in output.partition("= FAILURES =")[2].splitlines()
                     if not line.lstrip().startswith("curl "))[-20000:] or output[-5000:]


def test_schemathesis_all_checks_all_phases(serve_env, tmp_path):
    counts = tmp_path / "statuses.txt"
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "schemathesis_hooks", "INSTANTID_FUZZ_COUNTS": str(counts),
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), str(Path(__file__).parents[2]),
                                          os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "schemathesis.cli", "run", f"{serve_env.base_url}/openapi.json",
           "--phases", "examples,coverage,fuzzing,stateful",
           "--checks", "all", "--exclude-checks", "positive_data_acceptance,not_a_server_error",  # hooks' forms
           "--max-examples", str(MAX_EXAMPLES), "--seed", os.environ.get("INSTANTID_FUZZ_SEED", "1"),
           "--workers", "1", "--no-shrink", "--generation-database", "none", "--request-timeout", "60",
           "--continue-on-failure", "--no-color", "--output-truncate", "false", "--report", "junit",
           "--report-dir", str(tmp_path)]
    started = time.monotonic()
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=400, cwd=tmp_path)  # its cache too
    (tmp_path / "schemathesis.txt").write_text(run.stdout + run.stderr)
    print(f"\nschemathesis: {time.monotonic() - started:.0f} s, output in {tmp_path / 'schemathesis.txt'}")
    lines = counts.read_text().splitlines() if counts.exists() else []
    for line in lines:
        key = line.replace("  ", " ")
        COUNTS[key] = COUNTS.get(key, 0) + 1
    assert run.returncode == 0, _failures(run.stdout + run.stderr)
    called = {tuple(line.split()[:2]) for line in lines}
    assert set(OPERATIONS) <= called, set(OPERATIONS) - called
    links = re.search(r"API Links:\s+(\d+) covered / (\d+) selected", run.stdout)
    # the stateful phase followed the identity links (create -> get, delete, use after delete); the jobs' links
    # are inferred too but rarely reached within 25 examples
    assert links and int(links.group(1)) >= 3, run.stdout[-3000:]
    assert "201" in {line.split()[-1] for line in lines if line.startswith("POST /v1/identities ")}


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
    """Prints what the fuzzing above produced (status split per operation), for docs/reliability.md, and fails
    on any 5xx among them but the 504 of a request that set its own deadline (excused by the hooks)."""
    if not COUNTS:
        pytest.skip("no fuzzing ran in this session (run the whole file)")
    print("\nfuzz responses:\n  " + "\n  ".join(f"{k}: {v}" for k, v in sorted(COUNTS.items())),
          f"\n  total {sum(COUNTS.values())}")
    server_errors = [k for k in COUNTS if k.rsplit(" ", 1)[1].startswith("5") and not k.endswith(" 504")]
    assert not server_errors, server_errors
