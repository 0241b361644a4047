"""Identities: HTTP round trips on a directory store and on the loopback S3 server, and the store contract."""

from __future__ import annotations

import json
import os
import uuid

import boto3
import httpx
import numpy as np
import pytest

from deployments.ingress.identities import (
    DirectoryStore,
    S3Store,
    decode_embedding,
    make_record,
    make_store,
    new_identity_id,
    valid_identity_id,
)
from serve_helpers import IDENTITY_BUCKET


def _roundtrip(client: httpx.Client, face_b64: str, tiny_request) -> str:
    created = client.post("/v1/identities", json={"face_images": [face_b64, face_b64]})
    assert created.status_code == 201, created.text
    body = created.json()
    identity_id = body["identity_id"]
    assert valid_identity_id(identity_id)
    assert body["num_photos"] == 2 and len(body["faces"]) == 2 and body["embedding_dim"] == 512
    assert body["thumbnail"] and body["faces"][0]["source"] == "face_images[0]"

    fetched = client.get(f"/v1/identities/{identity_id}")
    assert fetched.status_code == 200
    assert fetched.json() == body
    assert "embedding" not in fetched.json()  # a biometric: stored, never served
    listed = client.get("/v1/identities").json()["identities"]
    assert identity_id in [i["identity_id"] for i in listed]
    return identity_id


@pytest.mark.serve
def test_identities_on_a_directory(http, serve_env, face_b64, tiny_request):
    identity_id = _roundtrip(http, face_b64, tiny_request)
    record_path = serve_env.identity_dir / f"{identity_id}.json"
    record = json.loads(record_path.read_text())
    assert decode_embedding(record["embedding"]).shape == (512,)
    assert not [p for p in os.listdir(serve_env.identity_dir) if p.endswith(".tmp")]

    generated = http.post("/v1/generate", json=tiny_request(identity_id=identity_id))
    assert generated.status_code == 200, generated.text

    assert http.delete(f"/v1/identities/{identity_id}").status_code == 204
    assert not record_path.exists()
    assert http.get(f"/v1/identities/{identity_id}").status_code == 404
    assert http.post("/v1/generate", json=tiny_request(identity_id=identity_id)).status_code == 404


@pytest.mark.serve
def test_identities_on_s3(serve_env, face_b64, tiny_request):
    with httpx.Client(base_url=serve_env.s3_base_url, timeout=120) as client:
        identity_id = _roundtrip(client, face_b64, tiny_request)
        key = f"identities/{identity_id}.json"
        record = json.loads(boto3.client("s3").get_object(Bucket=IDENTITY_BUCKET, Key=key)["Body"].read())
        assert record["identity_id"] == identity_id
        assert client.delete(f"/v1/identities/{identity_id}").status_code == 204
        assert client.get(f"/v1/identities/{identity_id}").status_code == 404
        assert client.delete(f"/v1/identities/{identity_id}").status_code == 404


# -- the store contract, both backends ----------------------------------------------------------------------
def _record(identity_id: str | None = None) -> dict:
    return make_record(identity_id or new_identity_id(), embedding=np.arange(512, dtype=np.float32) / 7,
                       pose_kps=np.ones((5, 2)), pose_canvas=(1024, 768),
                       faces=[{"source": "face_images[0]", "bbox": [1, 2, 3, 4], "score": 0.9,
                               "kps": [[1, 1]] * 5, "image_size": [640, 480]}],
                       thumbnail=b"\xff\xd8jpeg")


@pytest.fixture(params=["directory", "s3"])
def store(request, tmp_path):
    if request.param == "directory":
        return DirectoryStore(tmp_path / "ids")
    request.getfixturevalue("s3_server")
    bucket = f"store-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    return make_store(f"s3://{bucket}/some/prefix")


def test_store_contract(store):
    record = _record()
    identity_id = record["identity_id"]
    assert store.get(identity_id) is None
    store.put(record)
    got = store.get(identity_id)
    assert got == json.loads(json.dumps(record))
    np.testing.assert_array_equal(decode_embedding(got["embedding"]), np.arange(512, dtype=np.float32) / 7)
    assert [i["identity_id"] for i in store.list()] == [identity_id]
    assert store.delete(identity_id) is True
    assert store.delete(identity_id) is False
    assert store.get(identity_id) is None and store.list() == []


@pytest.mark.parametrize("bad", ["../x", "id_../../etc/passwd", "ID_" + "a" * 32, "id_" + "g" * 32, "", "id_"])
def test_malformed_ids_never_reach_the_backend(store, bad):
    assert not valid_identity_id(bad)
    assert store.get(bad) is None
    assert store.delete(bad) is False
    with pytest.raises(ValueError):
        make_record(bad, embedding=np.zeros(512), pose_kps=np.zeros((5, 2)), pose_canvas=(1, 1), faces=[],
                    thumbnail=None)


def test_directory_write_is_atomic(tmp_path, monkeypatch):
    store = DirectoryStore(tmp_path)
    record = _record()

    def crash(src, dst):
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        store.put(record)
    monkeypatch.undo()
    assert store.get(record["identity_id"]) is None
    assert list(tmp_path.iterdir()) == []  # no partial record, no temporary left behind
    store.put(record)
    assert store.get(record["identity_id"])["identity_id"] == record["identity_id"]


def test_s3_store_uses_one_object_per_record(s3_bucket):
    store = S3Store(f"s3://{s3_bucket}/p")
    record = _record()
    store.put(record)
    keys = [o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=s3_bucket)["Contents"]]
    assert keys == [f"p/{record['identity_id']}.json"]
