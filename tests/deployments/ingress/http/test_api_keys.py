"""API-key rotation reaches running replicas: hashes read from a mounted Secret file are re-read, so an added
key works and a revoked key stops working without a restart (the chart mounts the Secret as that file)."""

from __future__ import annotations

import hashlib
import logging

import pytest

from deployments.ingress.http import api_keys
from deployments.ingress.http.api_keys import KeyHashSource, parse_key_hashes
from fakes import generate_request, make_client

OLD, NEW = "sk-old-" + "1" * 30, "sk-new-" + "2" * 30


def entry(name: str, key: str) -> str:
    return f"{name}:{hashlib.sha256(key.encode()).hexdigest()}"


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_env_var_without_a_file_is_read_once(monkeypatch):
    monkeypatch.setenv("K", entry("a", OLD))
    monkeypatch.delenv("K_FILE", raising=False)
    source = KeyHashSource("K")
    monkeypatch.setenv("K", entry("b", NEW))
    assert list(source.current().values()) == ["a"]


def test_file_is_reread_after_the_interval_and_only_then(tmp_path, monkeypatch):
    path = tmp_path / "hashes"
    path.write_text(entry("a", OLD))
    monkeypatch.setenv("K_FILE", str(path))
    monkeypatch.setenv("K", entry("ignored", NEW))  # the file wins
    clock = Clock()
    source = KeyHashSource("K", reload_interval_s=5, clock=clock)
    assert list(source.current().values()) == ["a"]
    path.write_text(entry("a", OLD) + "," + entry("b", NEW))
    clock.now = 4.9
    assert list(source.current().values()) == ["a"]
    clock.now = 5.0
    assert sorted(source.current().values()) == ["a", "b"]


def test_unreadable_file_keeps_the_last_keys(tmp_path, monkeypatch, caplog):
    path = tmp_path / "hashes"
    path.write_text(entry("a", OLD))
    monkeypatch.setenv("K_FILE", str(path))
    clock = Clock()
    source = KeyHashSource("K", reload_interval_s=1, clock=clock)
    path.unlink()  # a Secret volume swaps its files through a symlink: a read may miss
    clock.now = 2
    with caplog.at_level(logging.WARNING, logger="instantid.auth"):
        assert list(source.current().values()) == ["a"]
    assert "keeping the 1 loaded" in caplog.text and OLD not in caplog.text


def test_newlines_and_malformed_entries():
    text = entry("a", OLD) + "\n" + entry("b", NEW) + "\nnot-an-entry\n"
    assert sorted(parse_key_hashes(text, "x").values()) == ["a", "b"]


def test_rotation_reaches_a_running_ingress(tmp_path, monkeypatch):
    """The whole path: a running app accepts the new key and refuses the revoked one after the Secret changes."""
    monkeypatch.setattr(api_keys, "RELOAD_INTERVAL_S", 0.0)
    path = tmp_path / "api-keys" / "hashes"
    path.parent.mkdir()
    path.write_text(entry("team-a", OLD))
    monkeypatch.setenv("ROT_KEYS_FILE", str(path))
    client = make_client(tmp_path, auth={"enabled": True, "key_hashes_env": "ROT_KEYS", "rate_per_s": 100, "burst": 100})
    bearer = lambda key: {"Authorization": f"Bearer {key}"}  # noqa: E731
    assert client.post("/v1/generate", json=generate_request(), headers=bearer(OLD)).status_code == 200
    assert client.post("/v1/generate", json=generate_request(), headers=bearer(NEW)).status_code == 401
    path.write_text(entry("team-a", NEW))  # rotate: new key in, old key out
    assert client.post("/v1/generate", json=generate_request(), headers=bearer(NEW)).status_code == 200
    assert client.post("/v1/generate", json=generate_request(), headers=bearer(OLD)).status_code == 401


@pytest.fixture(autouse=True)
def _no_stray_file_env(monkeypatch):
    for name in ("K_FILE", "ROT_KEYS_FILE"):
        monkeypatch.delenv(name, raising=False)
