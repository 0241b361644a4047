"""Identity store: what a face looks like to InstantID, kept so later requests can name it by id.

A record is ONE JSON document: the mean raw embedding (float32, base64), the pose keypoints with the
canvas they were measured on, the faces found (in photo coordinates) and a JPEG thumbnail. One document
means one commit point:

- directory backend: written to a temporary file in the same directory, fsynced, then ``os.replace``d onto
  ``<id>.json`` (atomic on POSIX), and the directory fsynced. A reader sees the old state or the whole
  record, never a partial one; a crash leaves at most a ``.tmp`` file that is never read.
- S3 backend (``s3://bucket/prefix``): a single PutObject of the whole document, which S3 makes visible all
  at once (the PUT is the commit: there is no multi-object record that could be half written). A PUT that
  fails (S3 down) leaves nothing; the client gets 503 storage_unavailable and no id, so nothing reported
  created is ever lost.

With auth on, a record carries ``owner``, the name of the API key that created it (None when auth is off or
it came through the trusted handle API); ``visible_to`` is the one rule of who may see, use or delete it.

Ids are ``id_`` + 32 hex digits, generated here and checked against that pattern before any path or key
is built from them, so a request can never reach outside the store (no path traversal, no key injection).
"""

from __future__ import annotations

import base64
import json
import os
import re
import secrets
import tempfile
import time
from pathlib import Path

import numpy as np

from deployments.errors import NOT_FOUND

ID_PATTERN = r"^id_[0-9a-f]{32}$"  # also the request schema's pattern for identity_id
ID_RE = re.compile(ID_PATTERN)
RECORD_VERSION = 1


def new_identity_id() -> str:
    return "id_" + secrets.token_hex(16)


def valid_identity_id(identity_id: str) -> bool:
    return isinstance(identity_id, str) and ID_RE.fullmatch(identity_id) is not None


def _check(identity_id: str) -> str:
    if not valid_identity_id(identity_id):
        raise ValueError(f"malformed identity id {identity_id!r}")
    return identity_id


def encode_embedding(embedding: np.ndarray) -> str:
    return base64.b64encode(np.asarray(embedding, dtype="<f4").tobytes()).decode("ascii")


def visible_to(record: dict, scope: str | None) -> bool:
    """Whether a caller whose scope is ``scope`` (an API key name; None: every identity, i.e. auth off, an admin
    key or the handle API) may see, use or delete ``record``. Records made before scoping have no owner and are
    visible to unscoped callers only."""
    return scope is None or record.get("owner") == scope


def require_visible(record: dict | None, scope: str | None, identity_id: str | None = None,
                    field: str | None = None) -> dict:
    """The record, or the 404 of an identity that is absent or another key's (as if absent: no probing). The
    message names ``identity_id`` only where the caller gave a validated one (never echo a raw path)."""
    if record is None or not visible_to(record, scope):
        message = "identity not found" if identity_id is None else f"identity {identity_id} not found"
        raise NOT_FOUND(message, field=field)
    return record


def decode_embedding(text: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), dtype="<f4").astype(np.float32)


def make_record(identity_id: str, *, embedding: np.ndarray, pose_kps, pose_canvas, faces: list[dict],
                thumbnail: bytes | None, owner: str | None = None) -> dict:
    return {
        "version": RECORD_VERSION,
        "identity_id": _check(identity_id),
        "owner": owner,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "num_photos": len(faces),
        "embedding_dim": int(np.asarray(embedding).size),
        "embedding": encode_embedding(embedding),
        "pose": {"kps": np.asarray(pose_kps, dtype=float).tolist(), "canvas": [int(v) for v in pose_canvas]},
        "faces": faces,
        "thumbnail": base64.b64encode(thumbnail).decode("ascii") if thumbnail else None,
    }


class IdentityStore:
    """put / get / delete / list of identity records (dicts as made by ``make_record``)."""

    location: str

    def put(self, record: dict) -> None:
        raise NotImplementedError

    def get(self, identity_id: str) -> dict | None:
        raise NotImplementedError

    def delete(self, identity_id: str) -> bool:
        raise NotImplementedError

    def entries(self) -> list[tuple[float, str]]:
        """(modification time, id) of every record, newest first."""
        raise NotImplementedError

    def list(self, limit: int = 100, owner: str | None = None) -> list[dict]:
        """The newest ``limit`` records visible to ``owner`` (see ``visible_to``), as id + creation time. Scoped
        listing reads records (newest first) until it has ``limit`` of them: its cost grows with the other
        keys' identities in between."""
        found = []
        for t, identity_id in self.entries():
            if len(found) >= limit:
                break
            if owner is not None:
                record = self.get(identity_id)
                if record is None or not visible_to(record, owner):
                    continue
            found.append({"identity_id": identity_id, "created_at": _iso(t)})
        return found


class DirectoryStore(IdentityStore):
    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser()
        self.location = str(self.root)
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, identity_id: str) -> Path:
        return self.root / f"{_check(identity_id)}.json"

    def put(self, record: dict) -> None:
        target = self._path(record["identity_id"])
        data = json.dumps(record, separators=(",", ":")).encode()
        fd, tmp = tempfile.mkstemp(prefix=f".{target.stem}.", suffix=".tmp", dir=self.root)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)  # the commit
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise
        try:  # make the rename itself durable
            dir_fd = os.open(self.root, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError:
            pass

    def get(self, identity_id: str) -> dict | None:
        if not valid_identity_id(identity_id):
            return None
        try:
            return json.loads(self._path(identity_id).read_bytes())
        except FileNotFoundError:
            return None

    def delete(self, identity_id: str) -> bool:
        if not valid_identity_id(identity_id):
            return False
        try:
            self._path(identity_id).unlink()
            return True
        except FileNotFoundError:
            return False

    def entries(self) -> list[tuple[float, str]]:
        entries = []
        for path in self.root.glob("id_*.json"):
            if valid_identity_id(path.stem):
                try:
                    entries.append((path.stat().st_mtime, path.stem))
                except FileNotFoundError:  # deleted meanwhile
                    continue
        return sorted(entries, reverse=True)


class S3Store(IdentityStore):
    def __init__(self, uri: str, client=None):
        from instantid.weights import split_s3

        self.bucket, prefix = split_s3(uri)
        self.prefix = f"{prefix}/" if prefix else ""
        self.location = uri
        self._client = client

    @property
    def client(self):
        if self._client is None:
            from instantid.weights import s3_client

            # bounded: an unreachable S3 fails the call within seconds (-> 503), it never hangs a request
            self._client = s3_client()
        return self._client

    def _key(self, identity_id: str) -> str:
        return f"{self.prefix}{_check(identity_id)}.json"

    @staticmethod
    def _missing(exc) -> bool:
        code = str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))
        return code in ("NoSuchKey", "404", "NotFound")

    def put(self, record: dict) -> None:
        data = json.dumps(record, separators=(",", ":")).encode()
        self.client.put_object(Bucket=self.bucket, Key=self._key(record["identity_id"]), Body=data,
                               ContentType="application/json")

    def get(self, identity_id: str) -> dict | None:
        from botocore.exceptions import ClientError

        if not valid_identity_id(identity_id):
            return None
        try:
            obj = self.client.get_object(Bucket=self.bucket, Key=self._key(identity_id))
        except ClientError as exc:
            if self._missing(exc):
                return None
            raise
        return json.loads(obj["Body"].read())

    def delete(self, identity_id: str) -> bool:
        from botocore.exceptions import ClientError

        if not valid_identity_id(identity_id):
            return False
        key = self._key(identity_id)
        try:
            self.client.head_object(Bucket=self.bucket, Key=key)
        except ClientError as exc:
            if self._missing(exc):
                return False
            raise
        self.client.delete_object(Bucket=self.bucket, Key=key)
        return True

    def entries(self) -> list[tuple[float, str]]:
        found = []
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix):
            for obj in page.get("Contents", []):
                name = obj["Key"][len(self.prefix):]
                stem = name[:-5] if name.endswith(".json") else ""
                if valid_identity_id(stem):
                    found.append((obj["LastModified"].timestamp(), stem))
        return sorted(found, reverse=True)


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def make_store(location: str) -> IdentityStore:
    """A DirectoryStore for a path, an S3Store for ``s3://bucket/prefix``."""
    if str(location).startswith("s3://"):
        return S3Store(location)
    return DirectoryStore(location)
