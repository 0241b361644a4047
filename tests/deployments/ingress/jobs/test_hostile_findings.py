"""Bugs found by a hostile client on the new surfaces (jobs, OpenAI Images, Replicate): each test fails until fixed.
In-process only: the Ingress app with fake backends (no Ray, no Serve)."""

from __future__ import annotations

import json

import pytest
from serve_helpers import b64, png_bytes
from starlette.testclient import TestClient
from fakes import CountingGenerator, GroupFace, job_request, photo
from test_jobs import client_for, wait_status

from deployments.config import AppArgs
from deployments.ingress.http.app import build_http_app
from deployments.ingress.service import GenerationService

GENERATIONS = "/openai/v1/images/generations"


def _group_client(tmp_path):
    args = AppArgs.model_validate({"identity_store": str(tmp_path / "ids")})
    core = GenerationService(args, GroupFace(), CountingGenerator(),
                             status_fn=lambda: {"FaceAnalyzer": "HEALTHY", "Generator": "HEALTHY"})
    return TestClient(build_http_app(core), raise_server_exceptions=False)


def _two_people(**fields):
    return {"people": [{"face_images": [photo(10)], "face_index": 2}, {"face_images": [photo(200)], "face_index": 0}],
            "pose_image": photo(), "steps": 2, "identity_score": False, **fields}


# -- OpenAI Images ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("face_images", ["not-a-list", {"a": 1}])
def test_openai_generations_face_images_not_a_list_beside_image_is_a_4xx_not_a_500(tmp_path, face_images):
    """POST /openai/v1/images/generations {"face_images": "<str>", "image": "<b64>"}: translate() calls .extend on
    the str/dict -> AttributeError -> 500 internal. Bad input must be a 4xx naming the field."""
    client, _ = client_for(tmp_path, CountingGenerator())
    with client:
        resp = client.post(GENERATIONS, json={"prompt": "x", "size": "64x64", "steps": 2,
                                              "face_images": face_images, "image": b64(png_bytes())})
    assert 400 <= resp.status_code < 500, resp.text
    error = resp.json()["error"]
    assert error["param"] in ("image", "face_images"), error


@pytest.mark.parametrize("param", ["stream", "response_format", "n"])
def test_openai_nullable_parameters_sent_as_null_mean_the_default(tmp_path, param):
    """OpenAI's Images API documents `stream`, `response_format` and `n` as nullable (null = the default); the
    openai SDK sends an explicit None as null. Here `stream: null` is refused as 'streaming is not supported',
    `response_format: null` as 'b64_json or url', `n: null` as 'num_images: Input should be a valid integer'."""
    client, _ = client_for(tmp_path, CountingGenerator())
    with client:
        resp = client.post(GENERATIONS, json={"prompt": "x", "size": "64x64", "steps": 2,
                                              "face_images": [b64(png_bytes())], param: None})
    assert resp.status_code == 200, resp.text
    assert len(resp.json()["data"]) == 1


# -- Replicate -----------------------------------------------------------------------------------------------
def test_replicate_input_echo_replaces_the_photos_of_people(tmp_path):
    """docs/api.md: the prediction's `input` has its photos replaced by `<n images>`; summarize_input only looks at
    top-level keys, so every person's base64 `face_images` is echoed back in full in every poll."""
    with _group_client(tmp_path) as client:
        resp = client.post("/replicate/v1/predictions", json={"input": _two_people()}, headers={"Prefer": "wait=10"})
        assert resp.status_code == 201, resp.text
        echoed = resp.json()["input"]
    for person in echoed["people"]:
        assert person["face_images"] == "<1 image>", json.dumps(person)[:120]


# -- jobs ----------------------------------------------------------------------------------------------------
def test_a_people_job_result_counts_its_identities_as_generate_does(tmp_path):
    """docs/api.md: a job's `result` is the /v1/generate response, and `timings.identities` counts the identities
    of a `people` request. The job's result has no `identities` (nor decode_s / face_analysis_s) in its timings:
    the submit-time timings are dropped."""
    with _group_client(tmp_path) as client:
        direct = client.post("/v1/generate", json=_two_people(seed=5))
        assert direct.status_code == 200, direct.text
        assert direct.json()["timings"]["identities"] == 2
        submitted = client.post("/v1/jobs", json=_two_people(seed=5))
        assert submitted.status_code == 202, submitted.text
        job = wait_status(client, submitted.json()["id"])
    assert job["status"] == "succeeded", job
    assert job["result"]["timings"].get("identities") == 2, job["result"]["timings"]
    assert set(direct.json()["timings"]) <= set(job["result"]["timings"]), job["result"]["timings"]


def test_request_fixture_sanity(tmp_path):
    """The plain job path works (so the failures above are the bugs, not the fixtures)."""
    client, _ = client_for(tmp_path, CountingGenerator())
    with client:
        job = wait_status(client, client.post("/v1/jobs", json=job_request()).json()["id"])
    assert job["status"] == "succeeded"


def test_a_webhook_sends_the_job_with_the_urls_get_shows(tmp_path, monkeypatch):
    """docs/api.md: the webhook is one POST of the final job; GET /v1/jobs/{id} shows absolute `urls`
    (http://host/v1/jobs/...), the webhook body has bare paths ('/v1/jobs/job_...'), which a receiver cannot follow."""
    import threading
    import time
    from http.server import ThreadingHTTPServer

    from test_jobs import _Receiver

    monkeypatch.setenv("INSTANTID_WEBHOOK_SECRET", "s3cret")
    _Receiver.received, _Receiver.fail_first = [], 0
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        client, _ = client_for(tmp_path, CountingGenerator(),
                               webhooks={"allowed_hosts": [f"127.0.0.1:{server.server_port}"], "allow_http": True,
                                         "backoff_s": 0.1})
        with client:
            job = client.post("/v1/jobs", json=job_request(webhook=f"http://127.0.0.1:{server.server_port}/h")).json()
            shown = wait_status(client, job["id"])
            deadline = time.monotonic() + 10
            while not _Receiver.received and time.monotonic() < deadline:
                time.sleep(0.05)
    finally:
        server.shutdown()
    assert _Receiver.received
    sent = json.loads(_Receiver.received[0][1])
    assert sent["urls"]["get"] == shown["urls"]["get"], (sent["urls"], shown["urls"])


def test_the_in_memory_job_store_forgets_expired_jobs_nobody_asks_for(tmp_path):
    """docs/jobs.md: finished jobs, results included, expire `result_ttl_s` after they end. MemoryJobStore (the local
    profile's store) drops an expired record only when that id is looked up again: results of jobs nobody polls
    again stay in the Ingress replica's memory for ever (base64 images, MBs each)."""
    import time

    client, core = client_for(tmp_path, CountingGenerator())
    store = core.jobs.store
    with client:
        old = wait_status(client, client.post("/v1/jobs", json=job_request()).json()["id"])
        assert old["status"] == "succeeded"
        store.expires[old["id"]] = time.time() - 1  # its result_ttl_s has passed
        for _ in range(3):  # the replica goes on working
            assert wait_status(client, client.post("/v1/jobs", json=job_request()).json()["id"])["status"] == "succeeded"
    assert old["id"] not in store.jobs


@pytest.mark.parametrize("method, path, allowed", [
    ("PUT", "/replicate/v1/predictions", "POST"),
    ("DELETE", "/replicate/v1/predictions/job_" + "0" * 24, "GET"),
    ("GET", "/openai/v1/images/edits", "POST"),
])
def test_405_on_the_openai_and_replicate_surfaces_names_the_allowed_methods(tmp_path, method, path, allowed):
    """RFC 9110 (and /v1's own 405s): a 405 carries `Allow` with the path's methods. On /openai/v1 and /replicate/v1
    it is empty: allowed_methods() skips the surfaces' routes (include_router wraps them; no `.methods`)."""
    client, _ = client_for(tmp_path, CountingGenerator())
    with client:
        resp = client.request(method, path)
    assert resp.status_code == 405, resp.text
    assert allowed in resp.headers.get("allow", "").split(", "), repr(resp.headers.get("allow"))


@pytest.mark.parametrize("url", ["https://evil.example\\@hooks.example.com/x", "https://[::1]@hooks.example.com/x"])
def test_a_webhook_url_the_sender_cannot_parse_is_refused_at_submit(tmp_path, monkeypatch, url):
    """The allowlist check parses the URL with urllib (host: hooks.example.com, allowed) but aiohttp/yarl refuses it
    (backslash / '[' in the authority): the job is accepted (202) and its webhook can never be delivered (every
    attempt fails, silently for the client). A URL the sender cannot use must be the 422 `field: webhook` at
    submit, as 'not a valid URL' is."""
    import yarl

    with pytest.raises(ValueError):
        yarl.URL(url)  # what WebhookSender.deliver's aiohttp does with it
    monkeypatch.setenv("INSTANTID_WEBHOOK_SECRET", "s3cret")
    client, _ = client_for(tmp_path, CountingGenerator(), webhooks={"allowed_hosts": ["hooks.example.com"]})
    with client:
        resp = client.post("/v1/jobs", json=job_request(webhook=url))
    assert resp.status_code == 422, resp.text
    assert resp.json()["error"]["field"] == "webhook"


def test_a_job_with_a_corrupt_ready_control_map_is_refused_at_submit(tmp_path):
    """docs/jobs.md: 'Bad input never becomes a failed job' (POST /v1/jobs answers the /v1/generate 4xx at once).
    A ready `controls[i].map` is only header-checked at the Ingress; a truncated PNG passes, the job is accepted
    (202), and the Generator's decode_maps refuses it later (400 invalid_image naming controls[0].map): a failed
    job. (docs/api.md exempts only init_image from the Ingress decode.)"""
    import numpy as np

    from deployments.generator.controls import decode_maps
    from deployments.errors import ServiceError
    from deployments.messages import ControlMaps
    from fakes import FakeFace, FakeMethod

    truncated = png_bytes()[:60]
    with pytest.raises(ServiceError) as refused:  # what the Generator does with it
        decode_maps([{"name": "lineart", "map": truncated, "scale": 1.0, "start": 0.0, "end": 1.0}], 64, 64)
    assert refused.value.status == 400 and refused.value.field == "controls[0].map"

    face = FakeFace()

    async def control_maps(items):
        return ControlMaps([np.zeros((64, 64, 3), np.uint8) for _ in items], {"control_maps_s": 0.0})

    face.control_maps = FakeMethod(control_maps)
    args = AppArgs.model_validate({"identity_store": str(tmp_path / "ids"), "models": [
        {"name": "m", "base_model": "x", "controlnets": {"lineart": "l"}}]})
    core = GenerationService(args, face, CountingGenerator(),
                             status_fn=lambda: {"FaceAnalyzer": "HEALTHY", "Generator": "HEALTHY"})
    with TestClient(build_http_app(core), raise_server_exceptions=False) as client:
        resp = client.post("/v1/jobs", json=job_request(controls=[{"type": "lineart", "map": b64(truncated)}]))
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["field"] == "controls[0].map"
