"""The playground's server side without a cluster: the page and its files at /, POST /v1/faces:analyze (auth,
limits, errors, OpenAPI), the profile in /v1/models, and the static files shipped in the wheel."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from deployments.ingress.http.playground import STATIC_DIR, STATIC_FILES
from serve_helpers import assert_error, b64, png_bytes
from fakes import make_client

ROOT = Path(__file__).resolve().parents[4]
KEY = "sk-playground-" + "5" * 30


@pytest.fixture()
def auth_client(tmp_path, monkeypatch):
    monkeypatch.setenv("PG_TEST_KEYS", "pg:" + hashlib.sha256(KEY.encode()).hexdigest())
    return make_client(tmp_path, auth={"enabled": True, "key_hashes_env": "PG_TEST_KEYS", "rate_per_s": 100,
                                       "burst": 100})


def test_page_and_assets_are_served_open_with_a_strict_policy(auth_client):
    page = auth_client.get("/")  # open like /docs, even with auth on: the page holds no data
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'src="playground/app.js"' in page.text and 'href="playground/style.css"' in page.text
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "connect-src 'self'" in csp and "unsafe-inline" not in csp
    for name, ctype in STATIC_FILES.items():
        resp = auth_client.get(f"/playground/{name}")
        assert resp.status_code == 200 and resp.headers["content-type"].startswith(ctype)
        assert resp.content == (STATIC_DIR / name).read_bytes()
    # nothing but the listed files: no traversal, no directory listing
    for path in ("/playground/..%2F__init__.py", "/playground/%2E%2E%2Fapp.js", "/playground/",
                 "/playground/__init__.py"):
        assert auth_client.get(path).status_code == 404, path


def test_page_loads_nothing_from_elsewhere():
    """Self-contained: no CDN, no remote font or script (it must work in an offline cluster)."""
    for path in STATIC_DIR.iterdir():
        text = path.read_text()
        for remote in ("http://", "https://", "//cdn", "@import"):
            assert remote not in text.replace("http://www.w3.org/2000/svg", ""), (path.name, remote)


def test_analyze_returns_each_photos_face_and_stores_nothing(tmp_path):
    client = make_client(tmp_path)  # fake backends: the face analyser's canvas sets the photo's shape
    photos = [b64(png_bytes()), b64(png_bytes(color=(9, 9, 9)))]
    resp = client.post("/v1/faces:analyze", json={"face_images": photos})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert set(body) == {"faces", "timings"} and len(body["faces"]) == 2
    face = body["faces"][0]
    assert len(face["bbox"]) == 4 and len(face["kps"]) == 5 and face["image_size"] == [256, 256]
    assert "embedding" not in resp.text
    assert body["timings"]["total_s"] >= body["timings"]["face_analysis_s"] >= 0
    assert client.get("/v1/identities").json() == {"identities": []}


def test_analyze_needs_the_key_and_checks_inputs_like_identities(auth_client):
    photo = b64(png_bytes())
    assert_error(auth_client.post("/v1/faces:analyze", json={"face_images": [photo]}), 401, "unauthorized")
    good = {"Authorization": "Bearer " + KEY}
    assert auth_client.post("/v1/faces:analyze", json={"face_images": [photo]}, headers=good).status_code == 200
    assert_error(auth_client.post("/v1/faces:analyze", json={"face_images": [photo, "!!"]}, headers=good),
                 400, "invalid_base64", "face_images[1]")
    assert_error(auth_client.post("/v1/faces:analyze", json={"face_images": [b64(b"not an image")]}, headers=good),
                 400, "invalid_image", "face_images[0]")
    assert_error(auth_client.post("/v1/faces:analyze", json={"face_images": [photo] * 5}, headers=good),
                 422, "invalid_parameter", "face_images")
    assert_error(auth_client.post("/v1/faces:analyze", json={"face_images": [photo], "x": 1}, headers=good),
                 422, "invalid_parameter", "x")
    files = [("face_images", ("a.png", png_bytes(), "image/png"))]
    multipart = auth_client.post("/v1/faces:analyze", files=files, headers=good)
    assert multipart.status_code == 200 and len(multipart.json()["faces"]) == 1


def test_analyze_and_profile_are_in_the_openapi_schema(tmp_path):
    client = make_client(tmp_path, profile="tiny")
    schema = client.get("/openapi.json").json()
    route = schema["paths"]["/v1/faces:analyze"]["post"]
    assert "multipart/form-data" in route["requestBody"]["content"]
    assert route["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/FaceAnalysis")
    assert "profile" in schema["components"]["schemas"]["ModelList"]["properties"]
    assert "/" not in schema["paths"]  # the page is not part of the API
    assert client.get("/v1/models").json()["profile"] == "tiny"
    assert make_client(tmp_path / "real").get("/v1/models").json()["profile"] == "real"


def test_static_files_ship_in_the_wheel(tmp_path):
    """Package data: a wheel built from this tree carries the page (a cluster installs the wheel, not the repo)."""
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(ROOT)], check=True, capture_output=True, timeout=300)
    wheel = next(tmp_path.glob("instantid_serve-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in ["index.html", *STATIC_FILES]:
        assert f"deployments/ingress/http/playground/static/{name}" in names, sorted(n for n in names if "playground" in n)


@pytest.mark.serve
def test_page_behind_a_route_prefix(serve_env):
    """The second test app is served at /s3: its page lives at /s3/ and talks to /s3/v1/... (relative URLs)."""
    import httpx

    with httpx.Client(timeout=60) as client:
        bare = client.get(serve_env.s3_base_url)
        # <prefix> without the slash is redirected to <prefix>/, where the page's relative URLs resolve right
        assert bare.status_code in (307, 308) and bare.headers["location"].endswith("/s3/"), bare.headers
        page = client.get(serve_env.s3_base_url + "/")
        assert page.status_code == 200 and 'src="playground/app.js"' in page.text
        assert client.get(serve_env.s3_base_url + "/playground/app.js").status_code == 200
        assert client.get(serve_env.s3_base_url + "/v1/models").json()["profile"] == "tiny"


def test_as_photo_request_without_a_size_gets_the_photos_shape(tmp_path):
    """What the playground sends for "as photo": no width/height (and img2img: the picture's shape). The Ingress
    once multiplied the absent width to size the Generator's answer: a 500 for every such request."""
    from PIL import Image
    import base64
    import io

    client = make_client(tmp_path)  # fake backends: the face analyser's canvas sets the photo's shape
    landscape = client.post("/v1/generate", json={"face_images": [b64(png_bytes((1280, 886)))], "steps": 2})
    assert landscape.status_code == 200, landscape.text
    body = landscape.json()
    assert Image.open(io.BytesIO(base64.b64decode(body["images"][0]))).size == (body["width"], body["height"])
    restyled = client.post("/v1/generate", json={"face_images": [b64(png_bytes((1280, 886)))], "steps": 2,
                                                 "init_image": b64(png_bytes((600, 900))), "strength": 0.5})
    assert restyled.status_code == 200, restyled.text
    assert restyled.json()["height"] > restyled.json()["width"]  # the picture to restyle's portrait shape


def test_styles_offer_one_no_style_choice():
    """The style chips once listed "none" (no style: the request leaves ``style`` out) and the demo's "(No style)"
    preset side by side. Runs the page's own ``styleChoices`` in Node on the service's style list."""
    import json
    import re
    import shutil

    from instantid.styles import presets

    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    source = (STATIC_DIR / "app.js").read_text()
    match = re.search(r"^function styleChoices\(styles\) \{\n.*?^\}\n", source, re.S | re.M)
    assert match, "app.js has no styleChoices(styles) function"
    styles = sorted(presets())
    assert "(No style)" in styles  # the demo's preset, still an API style
    script = match.group(0) + f"console.log(JSON.stringify(styleChoices({json.dumps(styles)})));"
    choices = json.loads(subprocess.run([node, "-e", script], capture_output=True, text=True, check=True).stdout)
    labels = [label for _, label in choices]
    assert choices[0] == ["", "none"]  # no style: nothing sent, the prompts pass unchanged
    assert len([label for label in labels if "no style" in label.lower() or label == "none"]) == 1, labels
    assert [value for value, _ in choices[1:]] == [s for s in styles if s != "(No style)"]
