"""Identities are scoped to the API key that created them: another key gets 404 on every identity route (as if
the identity did not exist) and lists only its own; ``auth.admin_keys`` see and manage all; auth off is unscoped."""

from __future__ import annotations

import hashlib

import pytest

from deployments.ingress.identities import DirectoryStore, make_record, new_identity_id
from serve_helpers import assert_error, b64, png_bytes
from fakes import make_client

KEYS = {"alice": "sk-alice-" + "1" * 32, "bob": "sk-bob-" + "2" * 32, "ops": "sk-ops-" + "3" * 32}


def _as(name: str) -> dict:
    return {"Authorization": "Bearer " + KEYS[name]}


@pytest.fixture()
def client(tmp_path, monkeypatch):
    monkeypatch.setenv("SCOPE_TEST_KEYS", ",".join(f"{n}:{hashlib.sha256(k.encode()).hexdigest()}"
                                                   for n, k in KEYS.items()))
    return make_client(tmp_path, auth={"enabled": True, "key_hashes_env": "SCOPE_TEST_KEYS", "rate_per_s": 100,
                                       "burst": 100, "admin_keys": ["ops"]})


def _create(client, who: str) -> str:
    resp = client.post("/v1/identities", json={"face_images": [b64(png_bytes())]}, headers=_as(who))
    assert resp.status_code == 201, resp.text
    return resp.json()["identity_id"]


def _listed(client, who: str) -> set[str]:
    resp = client.get("/v1/identities", headers=_as(who))
    assert resp.status_code == 200, resp.text
    return {i["identity_id"] for i in resp.json()["identities"]}


def _generate(client, who: str, identity_id: str):
    return client.post("/v1/generate", headers=_as(who),
                       json={"identity_id": identity_id, "width": 64, "height": 64, "steps": 1})


def test_records_carry_their_owner(client, tmp_path):
    identity_id = _create(client, "alice")
    assert DirectoryStore(tmp_path / "ids").get(identity_id)["owner"] == "alice"


def test_another_key_gets_404_on_every_identity_route(client):
    alices = _create(client, "alice")
    bobs = _create(client, "bob")
    missing = new_identity_id()
    # read, generate, delete: the same 404 as for an identity that does not exist (nothing leaks)
    other, absent = client.get(f"/v1/identities/{alices}", headers=_as("bob")), \
        client.get(f"/v1/identities/{missing}", headers=_as("bob"))
    assert_error(other, 404, "not_found") and assert_error(absent, 404, "not_found")
    assert other.json()["error"]["message"].replace(alices, "X") == absent.json()["error"]["message"].replace(
        missing, "X")
    assert "thumbnail" not in other.text
    assert_error(_generate(client, "bob", alices), 404, "not_found", field="identity_id")
    assert_error(client.delete(f"/v1/identities/{alices}", headers=_as("bob")), 404, "not_found")
    # list: only one's own
    assert _listed(client, "bob") == {bobs}
    assert _listed(client, "alice") == {alices}
    # alice's identity survived bob's attempts and still works for her
    assert client.get(f"/v1/identities/{alices}", headers=_as("alice")).status_code == 200
    assert _generate(client, "alice", alices).status_code == 200
    assert client.delete(f"/v1/identities/{alices}", headers=_as("alice")).status_code == 204
    assert_error(client.get(f"/v1/identities/{alices}", headers=_as("alice")), 404, "not_found")


def test_admin_keys_see_and_manage_every_identity(client):
    alices, bobs = _create(client, "alice"), _create(client, "bob")
    assert _listed(client, "ops") >= {alices, bobs}
    assert client.get(f"/v1/identities/{alices}", headers=_as("ops")).status_code == 200
    assert _generate(client, "ops", bobs).status_code == 200
    assert client.delete(f"/v1/identities/{bobs}", headers=_as("ops")).status_code == 204
    assert _listed(client, "bob") == set()


def test_unowned_records_are_for_admins_only(client, tmp_path):
    """A record made before scoping (or through the trusted handle API) has no owner: no ordinary key sees it."""
    record = make_record(new_identity_id(), embedding=[0.1] * 512, pose_kps=[[1, 1]] * 5, pose_canvas=(64, 64),
                         faces=[{"source": "face_images[0]", "bbox": [1, 2, 3, 4], "score": 0.9,
                                 "kps": [[1, 1]] * 5, "image_size": [64, 64]}], thumbnail=None)
    DirectoryStore(tmp_path / "ids").put(record)
    identity_id = record["identity_id"]
    assert_error(client.get(f"/v1/identities/{identity_id}", headers=_as("alice")), 404, "not_found")
    assert identity_id not in _listed(client, "alice")
    assert client.get(f"/v1/identities/{identity_id}", headers=_as("ops")).status_code == 200


def test_scoped_list_fills_its_limit_past_other_keys_identities(client):
    mine = [_create(client, "alice") for _ in range(2)]
    for _ in range(3):
        _create(client, "bob")
    resp = client.get("/v1/identities?limit=2", headers=_as("alice"))
    assert {i["identity_id"] for i in resp.json()["identities"]} == set(mine)


def test_auth_off_is_unscoped(tmp_path):
    client = make_client(tmp_path)
    identity_id = client.post("/v1/identities", json={"face_images": [b64(png_bytes())]}).json()["identity_id"]
    assert DirectoryStore(tmp_path / "ids").get(identity_id)["owner"] is None
    assert identity_id in {i["identity_id"] for i in client.get("/v1/identities").json()["identities"]}
    assert client.get(f"/v1/identities/{identity_id}").status_code == 200
    assert client.delete(f"/v1/identities/{identity_id}").status_code == 204


def test_every_place_a_stored_identity_is_used_is_scoped(client):
    """Issue 30: not only the identity routes and /v1/generate. A person of a group picture, an async job and the
    OpenAI surface take an identity_id too: another key's is the 404 of a missing one, naming the field."""
    alices = _create(client, "alice")
    people = {"people": [{"identity_id": alices, "keypoints": [[16, 20], [28, 20], [22, 26], [17, 32], [27, 32]]},
                         {"face_images": [b64(png_bytes())],
                          "keypoints": [[76, 20], [88, 20], [82, 26], [77, 32], [87, 32]]}],
              "width": 128, "height": 64, "steps": 1}
    assert_error(client.post("/v1/generate", headers=_as("bob"), json=people), 404, "not_found",
                 field="people[0].identity_id")
    assert client.post("/v1/generate", headers=_as("alice"), json=people).status_code == 200
    job = client.post("/v1/jobs", headers=_as("bob"), json={"identity_id": alices, "width": 64, "height": 64,
                                                             "steps": 1})
    assert_error(job, 404, "not_found", field="identity_id")
    resp = client.post("/openai/v1/images/generations", headers=_as("bob"),
                       json={"prompt": "a person", "identity_id": alices, "size": "64x64"})
    assert resp.status_code == 404 and alices not in resp.text.replace(f"identity {alices}", ""), resp.text
    ok = client.post("/openai/v1/images/generations", headers=_as("alice"),
                     json={"prompt": "a person", "identity_id": alices, "size": "64x64"})
    assert ok.status_code == 200, ok.text
    # an admin key may use anyone's
    assert client.post("/v1/generate", headers=_as("ops"), json=people).status_code == 200
