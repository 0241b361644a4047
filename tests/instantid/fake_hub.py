"""A Hugging Face hub endpoint on loopback, for download tests (point HF_ENDPOINT at ``FakeHub.url``).

It speaks the part of the hub's HTTP API that ``huggingface_hub.snapshot_download`` uses: repo info
(``/api/models/<repo>/revision/<rev>``), the recursive tree listing, and ``HEAD``/``GET`` of
``/<repo>/resolve/<rev>/<path>`` with the hub's headers (``X-Repo-Commit``, ``ETag``/``X-Linked-Etag`` = the git
blob id or, for LFS files, the sha256; ``X-Linked-Size``) and byte ranges. Files with a weight suffix are served
as LFS files, the rest as plain git files, as the real hub does.

Faults to test the client against: ``truncate_once[path] = n`` sends only the first n bytes of the next full GET
of that file and drops the connection; ``corrupt.add(path)`` serves the file with one byte flipped (same size).
Every request is recorded in ``requests`` as (method, path, Range header).
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

LFS_SUFFIXES = (".safetensors", ".bin", ".onnx", ".zip")


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class FakeHub:
    def __init__(self):
        self.repos: dict[str, dict[str, bytes]] = {}
        self.truncate_once: dict[str, int] = {}
        self.corrupt: set[str] = set()
        self.requests: list[tuple[str, str, str | None]] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    # -- content ---------------------------------------------------------------------------------------------
    def add_repo(self, repo_id: str, files: dict[str, bytes]) -> None:
        self.repos[repo_id] = dict(files)

    def add_directory(self, repo_id: str, root: Path, prefix: str = "") -> None:
        files = self.repos.setdefault(repo_id, {})
        for path in sorted(Path(root).rglob("*")):
            if path.is_file():
                files[prefix + path.relative_to(root).as_posix()] = path.read_bytes()

    def commit(self, repo_id: str) -> str:
        digest = hashlib.sha1(repo_id.encode())
        for name, data in sorted(self.repos[repo_id].items()):
            digest.update(name.encode() + b"\0" + hashlib.sha256(data).digest())
        return digest.hexdigest()

    @staticmethod
    def is_lfs(path: str) -> bool:
        return path.endswith(LFS_SUFFIXES)

    def etag(self, path: str, data: bytes) -> str:
        return hashlib.sha256(data).hexdigest() if self.is_lfs(path) else git_blob_id(data)

    def gets(self, suffix: str = "") -> list[str]:
        """Paths of files fetched with GET (whole or ranged), in order."""
        return [p for m, p, _ in self.requests if m == "GET" and "/resolve/" in p and p.endswith(suffix)]

    # -- server ----------------------------------------------------------------------------------------------
    def __enter__(self) -> "FakeHub":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _json(self, body, status=200, headers=None):
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(data)

            def _not_found(self, code: str, message: str):
                self._json({"error": message}, 404, {"X-Error-Code": code, "X-Error-Message": message})

            def _route(self, method: str):
                path = unquote(urlparse(self.path).path)
                with hub._lock:
                    hub.requests.append((method, path, self.headers.get("Range")))
                api = re.fullmatch(r"/api/models/([^/]+/[^/]+)/(revision|tree)/([^/]+)(?:/(.*))?", path)
                if api:
                    repo, kind, _rev, sub = api.groups()
                    if repo not in hub.repos:
                        return self._not_found("RepoNotFound", "Repository not found")
                    files = hub.repos[repo]
                    if kind == "revision":
                        return self._json({"id": repo, "modelId": repo, "sha": hub.commit(repo), "private": False,
                                           "siblings": [{"rfilename": name} for name in sorted(files)]})
                    entries = []
                    for name, data in sorted(files.items()):
                        if sub and not name.startswith(sub.rstrip("/") + "/"):
                            continue
                        entry = {"type": "file", "path": name, "size": len(data), "oid": git_blob_id(data)}
                        if hub.is_lfs(name):
                            entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data),
                                            "pointerSize": 134}
                        entries.append(entry)
                    return self._json(entries)
                resolve = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
                if not resolve:
                    return self._not_found("EntryNotFound", "not a hub route")
                repo, _rev, name = resolve.groups()
                if repo not in hub.repos:
                    return self._not_found("RepoNotFound", "Repository not found")
                if name not in hub.repos[repo]:
                    return self._not_found("EntryNotFound", "Entry not found")
                data = hub.repos[repo][name]
                etag = hub.etag(name, data)
                if name in hub.corrupt:
                    data = bytearray(data)
                    data[len(data) // 2] ^= 0xFF
                    data = bytes(data)
                headers = {"X-Repo-Commit": hub.commit(repo), "ETag": f'"{etag}"', "Accept-Ranges": "bytes"}
                if hub.is_lfs(name):
                    headers.update({"X-Linked-Etag": f'"{etag}"', "X-Linked-Size": str(len(data))})
                start, status = 0, 200
                match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
                if match and method == "GET":
                    start, status = int(match.group(1)), 206
                    headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
                body = data[start:]
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if method == "HEAD":
                    return
                cut = hub.truncate_once.pop(name, None) if start == 0 else None
                if cut is not None:  # a dropped connection mid-file
                    self.wfile.write(body[:cut])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

            def do_GET(self):
                self._route("GET")

            def do_HEAD(self):
                self._route("HEAD")

        return Handler
