"""Security properties: auth answers leak nothing, logs never carry keys, images or embeddings, ids stay
inside their prefix, and the API has no URL inputs (the service never fetches an address it is given)."""

from __future__ import annotations

import hashlib
import logging
import secrets
from pathlib import Path

import pytest

from deployments.ingress.identities import DirectoryStore, S3Store
from deployments.ingress.schemas import GenerateRequest, IdentityCreateRequest
from serve_helpers import assert_error, b64, png_bytes
from fakes import FakeGenerator, generate_request, make_client

KEY = "sk-live-" + "7" * 40  # a recognisable secret: it must never appear in any log


@pytest.fixture()
def auth_client(tmp_path, monkeypatch):
    monkeypatch.setenv("SEC_TEST_KEYS", "alice:" + hashlib.sha256(KEY.encode()).hexdigest())
    return make_client(tmp_path, auth={"enabled": True, "key_hashes_env": "SEC_TEST_KEYS", "rate_per_s": 100,
                                       "burst": 100})


@pytest.mark.parametrize("header", [None, "", "Bearer", "Bearer ", "Basic YWxpY2U6cHc=", "Bearer wrong-key",
                                    "Bearer " + KEY[:-1], "bearer " + KEY + "x", "Token " + KEY])
def test_bad_credentials_are_401_without_detail(auth_client, header):
    headers = {"Authorization": header} if header is not None else {}
    resp = auth_client.post("/v1/generate", json=generate_request(), headers=headers)
    err = assert_error(resp, 401, "unauthorized")
    assert resp.headers["www-authenticate"] == "Bearer"
    # no key names, hashes, env var names or what the server expected beyond the scheme
    for leak in ("alice", "SEC_TEST_KEYS", hashlib.sha256(KEY.encode()).hexdigest()[:12], KEY[:12]):
        assert leak not in resp.text
    assert err["message"] in ("missing API key: send 'Authorization: Bearer <key>'", "invalid API key")


def test_a_wrong_key_and_an_unknown_key_get_the_same_answer(auth_client):
    a = auth_client.get("/v1/models", headers={"Authorization": "Bearer " + "x" * len(KEY)})
    b = auth_client.get("/v1/models", headers={"Authorization": "Bearer " + KEY[:-1] + "8"})
    assert a.status_code == b.status_code == 401 and a.json() == b.json()


def test_valid_key_passes_and_case_insensitive_scheme(auth_client):
    assert auth_client.get("/v1/models", headers={"Authorization": "Bearer " + KEY}).status_code == 200
    assert auth_client.get("/v1/models", headers={"Authorization": "bearer " + KEY}).status_code == 200


def test_logs_never_carry_keys_images_or_embeddings(tmp_path, monkeypatch, caplog):
    """Every log record of the Ingress, on success, on 4xx and on an unexpected 500, free of secrets/data."""
    monkeypatch.setenv("SEC_TEST_KEYS", "alice:" + hashlib.sha256(KEY.encode()).hexdigest() + ",junk-entry")
    image = b64(png_bytes(color=(1, 2, 3)))
    caplog.set_level(logging.DEBUG)
    ok = make_client(tmp_path / "a", auth={"enabled": True, "key_hashes_env": "SEC_TEST_KEYS"})
    crash = make_client(tmp_path / "b", generator=FakeGenerator(fail=RuntimeError("boom in the pipeline")),
                        auth={"enabled": True, "key_hashes_env": "SEC_TEST_KEYS"})
    good = {"Authorization": "Bearer " + KEY}
    assert ok.post("/v1/generate", json=generate_request(face_images=[image]), headers=good).status_code == 200
    created = ok.post("/v1/identities", json={"face_images": [image]}, headers=good)
    assert created.status_code == 201
    assert ok.post("/v1/generate", json=generate_request(face_images=[image]),
                   headers={"Authorization": "Bearer " + KEY + "-wrong"}).status_code == 401
    assert ok.post("/v1/generate", json=generate_request(face_images=[image], steps=-1), headers=good).status_code == 422
    assert crash.post("/v1/generate", json=generate_request(face_images=[image]), headers=good).status_code == 500
    text = "\n".join(f"{r.getMessage()} {r.exc_text or ''}" for r in caplog.records)
    assert "unexpected error" in text  # the 500 was logged (with its request id) ...
    assert KEY not in text and KEY[:16] not in text  # ... but no key
    assert image[:40] not in text and image[-40:] not in text  # no base64 image
    from deployments.ingress.identities import encode_embedding
    import numpy as np

    assert encode_embedding(np.ones(512, np.float32))[:32] not in text  # no embedding
    assert "ignoring a malformed API key entry" in text and "junk-entry" not in text


@pytest.mark.serve
def test_cluster_logs_never_carry_keys_or_images(http, face_b64, tiny_request, serve_env):
    """Requests carrying a known secret, images and prompts (one past CLIP's 77 tokens, which diffusers reports)
    through the live app; then grep every Ray/Serve log file of the session (controller, proxy, replicas,
    access logs) for them."""
    import ray

    secret = "sk-probe-" + secrets.token_hex(16)
    marker_image = b64(png_bytes(color=(3, 141, 59)))  # a uniform image: 422 no_face, after a full analysis
    prompt_word, negative_word = "qx" + secrets.token_hex(6), "qz" + secrets.token_hex(6)
    long_prompt = " ".join(["portrait"] * 90 + [prompt_word] * 5)
    headers = {"Authorization": f"Bearer {secret}", "X-Api-Key": secret}
    assert http.post("/v1/generate", json=tiny_request(face_images=[face_b64], prompt=long_prompt,
                                                       negative_prompt=negative_word),
                     headers=headers).status_code == 200
    resp = http.post("/v1/generate", json=tiny_request(face_images=[marker_image]), headers=headers)
    assert resp.status_code == 422
    assert http.post("/v1/identities", json={"face_images": [face_b64]}, headers=headers).status_code == 201
    logs_dir = Path(ray._private.worker.global_worker.node.get_logs_dir_path())
    files = [p for p in logs_dir.rglob("*") if p.is_file() and p.stat().st_size < 200_000_000]
    assert any("serve" in str(p) for p in files)
    needles = [secret.encode(), face_b64[1000:1060].encode(), marker_image[20:80].encode(), prompt_word.encode(),
               negative_word.encode()]
    for path in files:
        data = path.read_bytes()
        for needle in needles:
            assert needle not in data, f"{needle[:20]!r}... found in {path}"


@pytest.mark.parametrize("bad", ["../x", "..%2Fx", "id_" + "0" * 32 + "/../../etc", "/etc/passwd",
                                 "id_" + "0" * 31 + "/", "ID_" + "A" * 32, "id_" + "0" * 32 + ".json", "",
                                 "id_" + "0" * 32 + "\x00", "\\..\\x", "id_" + "g" * 32])
def test_ids_never_escape_the_store_prefix(tmp_path, bad):
    store = DirectoryStore(tmp_path / "ids")
    assert store.get(bad) is None and store.delete(bad) is False
    with pytest.raises(ValueError):
        store._path(bad)
    s3 = S3Store("s3://bucket/prefix", client=object())  # never called: the id is refused first
    assert s3.get(bad) is None and s3.delete(bad) is False
    with pytest.raises(ValueError):
        s3._key(bad)


def test_no_url_inputs_in_the_api():
    """No request field takes a URL: images are inline base64 (or multipart files); identities are ids."""
    import json

    for model in (GenerateRequest, IdentityCreateRequest):
        schema = model.model_json_schema()
        assert not [name for name in schema["properties"] if "url" in name.lower() or "uri" in name.lower()]
        assert '"format": "uri"' not in json.dumps(schema) and '"format": "url"' not in json.dumps(schema)


def test_secrets_come_from_the_environment_not_the_config():
    from deployments.config import AuthConfig

    # admin_keys holds key *names* (as in the env var), never keys or hashes
    assert set(AuthConfig.model_fields) == {"enabled", "key_hashes_env", "rate_per_s", "burst", "max_in_flight",
                                            "admin_keys"}
