"""The playground in a real browser: headless Chromium (Debian's chromium + chromium-driver) driven by Selenium.

- against the tiny-profile Serve app of this session (through HAProxy, as shipped): upload insightface's t1.jpg
  (four times: the most photos a request takes), see the face box and keypoints, generate four images at the
  deployment's largest size with the spinner showing, enlarge, reuse the seed; the request options (img2img from
  a picture to restyle, the pose image shown, enhance face region, prompt weighting; "as photo" sends no size);
  bad input shown beside its field (width, picture to restyle, strength); a phone-width screen without sideways
  scrolling;
- against an in-process Ingress with fake backends and the default limits: the API-key box and the key only in
  the Authorization header, saving an identity, four 4096x4096 photos in and four 2048x2048 images out, a photo
  over the pixel limit refused beside it, Cancel.

Without the browser these tests skip, and say why. PLAYGROUND_SCREENSHOT=docs/playground.png writes the
screenshot the README shows.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
import time
import warnings
from pathlib import Path

import pytest

from serve_helpers import png_bytes

from deployments.ray_env import free_port

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
CHROMEDRIVER = shutil.which("chromedriver")
KEY = "sk-browser-" + "3" * 30


@pytest.fixture(scope="module")
def browser():
    if not (CHROMIUM and CHROMEDRIVER):
        reason = ("browser tests skipped: no chromium/chromedriver on PATH "
                  "(apt-get install -y chromium chromium-driver; .ci/run does)")
        warnings.warn(reason)  # shown in pytest's summary even without -rs
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1000",
                "--disable-gpu", "--no-first-run", "--disable-extensions"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    driver.set_script_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def _wait(driver, predicate, timeout=120, message=""):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(lambda d: predicate(d), message)


def _by_id(driver, element_id):
    return driver.find_element("id", element_id)


def _set(driver, element_id, value):
    """Set a range/number/select input as a user would (the page listens to input/change)."""
    driver.execute_script(
        "const el = document.getElementById(arguments[0]); el.value = arguments[1];"
        "el.dispatchEvent(new Event('input', {bubbles: true})); el.dispatchEvent(new Event('change', {bubbles: true}));",
        element_id, str(value))


def _text(driver, element_id) -> str:
    """An element's text, read in the page (cards are re-rendered: no stale references)."""
    return driver.execute_script("const el = document.getElementById(arguments[0]); return el ? el.textContent : ''",
                                 element_id)


def _open(driver, url):
    driver.get(url)
    driver.execute_script("sessionStorage.clear()")
    driver.get(url)


# Keeps the JSON bodies the page sends to /v1/jobs (or /v1/generate) in window.sentBodies (the test's view of the
# request).
RECORD_BODIES = ("window.sentBodies = []; const send = window.fetch; window.fetch = (url, init) => {"
                 " if (/\\/v1\\/(jobs|generate)$/.test(String(url))) window.sentBodies.push(JSON.parse(init.body));"
                 " return send(url, init); };")


def _image_sizes(driver, selector) -> list[list[int]]:
    """[width, height] of each image matching ``selector``, once all have decoded."""
    script = ("return [...document.querySelectorAll(arguments[0])].map(i => i.complete && i.naturalWidth ? "
              "[i.naturalWidth, i.naturalHeight] : null)")
    _wait(driver, lambda d: None not in d.execute_script(script, selector), 20, "images not decoded")
    return driver.execute_script(script, selector)


def _photos(tmp_path, face_photo, n) -> list[str]:
    paths = []
    for i in range(n):
        path = tmp_path / f"face{i}.jpg"
        shutil.copy(face_photo, path)
        paths.append(str(path))
    return paths


@pytest.mark.serve
def test_upload_generate_and_see_the_results(browser, serve_env, face_photo, tmp_path):
    d = browser
    _open(d, serve_env.base_url + "/")
    _wait(d, lambda d: _by_id(d, "tiny-notice").is_displayed(), 60, "tiny-profile notice not shown")
    assert "random weights" in _by_id(d, "tiny-notice").text
    assert d.find_elements("css selector", "#styles input[type=radio]"), "style gallery from /v1/models is empty"
    assert _by_id(d, "steps").get_attribute("max") == "50"  # the deployment's bound, from its OpenAPI schema
    unlabelled = d.execute_script(
        "return [...document.querySelectorAll('input, select, textarea, button')].filter(e => !(e.labels && "
        "e.labels.length) && !e.getAttribute('aria-label') && !e.textContent.trim()).map(e => e.id || e.outerHTML)")
    assert unlabelled == [], unlabelled  # every control has an accessible name (LoRA controls included)
    assert d.find_elements("css selector", "#loras input[type=range]")

    _by_id(d, "face-input").send_keys("\n".join(_photos(tmp_path, face_photo, 4)))
    cards = "#face-list .photo"
    _wait(d, lambda d: len(d.find_elements("css selector", f"{cards} svg.overlay")) == 4, 60,
          "face boxes not drawn on the four photos")
    overlay = d.find_element("css selector", f"{cards} svg.overlay")
    assert len(overlay.find_elements("css selector", "rect.box")) == 1
    assert len(overlay.find_elements("css selector", "circle.kp")) == 5
    assert "face" in d.find_element("css selector", f"{cards} .caption").text

    # the largest output this deployment allows (max_side 512, "as photo" keeps t1.jpg's shape), four images
    _set(d, "steps", 2)
    _set(d, "num_images", 4)
    _set(d, "seed", 1234)
    d.execute_script(RECORD_BODIES)
    _by_id(d, "generate").click()
    _wait(d, lambda d: _by_id(d, "progress").is_displayed(), 10, "no progress shown while generating")
    assert _by_id(d, "status").text.startswith(("Queued", "Starting", "Step"))  # a job: queued, then its steps
    assert not _by_id(d, "generate").is_enabled()
    _wait(d, lambda d: len(d.find_elements("css selector", "#results .result img")) == 4
          or _text(d, "status") == "Failed.", 300, "four result images did not appear")
    assert _text(d, "status").startswith("Done"), _text(d, "err-request")
    assert not _by_id(d, "progress").is_displayed()
    sizes = d.execute_script("return [...document.querySelectorAll('#results .result img')]"
                             ".map(i => [i.naturalWidth, i.naturalHeight])")
    assert all(max(s) == 512 and min(s) >= 256 and s[0] > s[1] for s in sizes), sizes  # t1.jpg is landscape
    sent = d.execute_script("return window.sentBodies")[0]
    assert "width" not in sent and "height" not in sent  # "as photo": the server sizes it
    assert sent["enhance_face_region"] is True and sent["prompt_weighting"] == "lpw"  # the API's defaults
    assert not {"init_image", "strength", "return_pose_image"} & set(sent)
    assert "seed 1234" in d.find_element("css selector", "#results .meta").text
    assert _by_id(d, "status").text.startswith("Done")
    link = d.find_element("css selector", "#results .result a[download]")
    assert link.get_attribute("download") == "instantid-1234-1.png"
    assert link.get_attribute("href").startswith("data:image/png;base64,")

    # "use this seed" after a random one, enlarge next to the reference photo
    _by_id(d, "dice").click()
    assert _by_id(d, "seed").get_attribute("value") not in ("", "1234")
    d.find_element("css selector", "#results .use-seed").click()
    assert _by_id(d, "seed").get_attribute("value") == "1234"
    d.find_element("css selector", "#results .thumb").click()
    _wait(d, lambda d: _by_id(d, "viewer").is_displayed(), 5)
    assert _by_id(d, "viewer-ref").get_attribute("src").startswith("data:image/jpeg")
    assert _by_id(d, "viewer-img").get_attribute("src").startswith("data:image/png")
    _by_id(d, "viewer-close").click()

    shot = os.environ.get("PLAYGROUND_SCREENSHOT")
    if shot:
        d.set_window_size(1280, 1200)
        d.execute_script("window.scrollTo(0, 0)")
        Path(shot).parent.mkdir(parents=True, exist_ok=True)
        d.save_screenshot(shot)
    d.save_screenshot(str(tmp_path / "playground.png"))

    # results are kept for the tab's session
    d.refresh()
    _wait(d, lambda d: len(d.find_elements("css selector", "#results .result img")) == 4, 20, "results lost on reload")


@pytest.mark.serve
def test_request_options_img2img_and_the_pose_image(browser, serve_env, face_photo, tmp_path):
    """Each API option from its control: img2img restyles a portrait picture (the output takes its shape: "as
    photo" leaves the size to the server), the keypoint image IdentityNet got is shown beside the result."""
    from PIL import Image

    d = browser
    _open(d, serve_env.base_url + "/")
    _wait(d, lambda d: d.find_elements("css selector", "#base_model option"), 60)
    d.execute_script(RECORD_BODIES)
    _by_id(d, "face-input").send_keys(str(face_photo))
    _wait(d, lambda d: d.find_elements("css selector", "#face-list svg.overlay"), 60, "face not analysed")
    portrait = tmp_path / "restyle.png"  # t1.jpg is landscape: a portrait output can only come from this one
    Image.new("RGB", (600, 900), (170, 120, 90)).save(portrait)
    _by_id(d, "init-input").send_keys(str(portrait))
    _wait(d, lambda d: d.find_elements("css selector", "#init-list .photo img"), 10, "picture to restyle not shown")
    assert "restyled" in d.find_element("css selector", "#init-list .caption").text
    assert _by_id(d, "strength").get_attribute("value") == "0.8"  # the API's default, from its schema
    _set(d, "strength", 0.5)
    _by_id(d, "enhance_face_region").click()
    _set(d, "prompt_weighting", "none")
    _by_id(d, "return_pose_image").click()
    _set(d, "steps", 4)
    _set(d, "seed", 7)
    _by_id(d, "generate").click()
    _wait(d, lambda d: _text(d, "status").startswith(("Done", "Failed")), 300, "no answer")
    errors = d.execute_script("return [...document.querySelectorAll('.error')].map(e => e.textContent).join('')")
    assert _text(d, "status").startswith("Done") and errors == "", (_text(d, "status"), errors)
    assert d.find_elements("css selector", "#results .pose-result img"), "no pose image shown"
    sent = d.execute_script("return window.sentBodies")
    assert len(sent) == 1
    assert sent[0]["init_image"].startswith("data:image/png;base64,") and sent[0]["strength"] == 0.5
    assert sent[0]["enhance_face_region"] is False and sent[0]["prompt_weighting"] == "none"
    assert sent[0]["return_pose_image"] is True and "width" not in sent[0] and "height" not in sent[0]
    images = _image_sizes(d, "#results .result:not(.pose-result) img")
    assert len(images) == 1 and images[0][1] == 512 and images[0][0] < 512, images  # the picture's shape
    assert _image_sizes(d, "#results .pose-result img") == images  # the keypoint image at the output size
    card = d.find_element("css selector", "#results .result .settings").text
    assert "restyled, strength 0.5" in card and "plain CLIP prompt" in card, card
    link = d.find_element("css selector", "#results .pose-result a[download]")
    assert link.get_attribute("download") == "instantid-7-pose.png"
    assert link.get_attribute("href").startswith("data:image/png;base64,")


@pytest.mark.serve
def test_bad_input_is_shown_beside_its_field(browser, serve_env, face_photo, tmp_path):
    d = browser
    _open(d, serve_env.base_url + "/")
    _wait(d, lambda d: d.find_elements("css selector", "#base_model option"), 60)
    blank = tmp_path / "blank.png"
    blank.write_bytes(png_bytes())
    _by_id(d, "face-input").send_keys("\n".join([str(face_photo), str(blank)]))
    # the photo without a face is flagged beside that photo, as soon as it is picked
    _wait(d, lambda d: _text(d, "err-face-1") and "face" in _text(d, "face-list"), 60,
          "no error beside the faceless photo")
    assert _text(d, "err-face-1") == "No face found in this photo."
    assert _text(d, "err-face-0") == ""
    # the server's own validation (width not a multiple of 8) beside the width field; nothing else flagged
    d.find_element("css selector", "#face-list .photo:nth-child(2) button").click()
    _wait(d, lambda d: len(d.find_elements("css selector", "#face-list .photo")) == 1, 5)
    _set(d, "size", "custom")
    _set(d, "width", 100)
    _set(d, "steps", 2)
    _by_id(d, "generate").click()
    _wait(d, lambda d: _text(d, "err-width"), 60, "no error beside the width field")
    assert "multiple of 8" in _text(d, "err-width")
    assert _by_id(d, "width").get_attribute("aria-invalid") == "true"
    assert _by_id(d, "err-request").text == "" and "{" not in d.find_element("tag name", "body").text
    assert d.find_elements("css selector", "#results .result") == []

    # a picture to restyle that is no image: beside that picture
    _set(d, "size", "photo")
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not a picture at all")
    _by_id(d, "init-input").send_keys(str(junk))
    _wait(d, lambda d: d.find_elements("css selector", "#init-list .photo"), 10)
    _by_id(d, "generate").click()
    _wait(d, lambda d: _text(d, "err-init"), 60, "no error beside the picture to restyle")
    assert "not a readable image" in _text(d, "err-init")
    assert _text(d, "err-width") == "" and _text(d, "err-request") == ""
    # a strength the API refuses (the slider stops at its minimum: forced here), beside the slider
    d.find_element("css selector", "#init-list .photo button").click()
    _by_id(d, "init-input").send_keys(str(face_photo))
    _wait(d, lambda d: d.find_elements("css selector", "#init-list .photo"), 10)
    d.execute_script("const s = document.getElementById('strength'); s.min = 0; s.value = 0;")
    _by_id(d, "generate").click()
    _wait(d, lambda d: _text(d, "err-strength"), 60, "no error beside the strength slider")
    assert "greater than 0" in _text(d, "err-strength")
    assert _by_id(d, "strength").get_attribute("aria-invalid") == "true"
    assert _text(d, "err-init") == "" and _text(d, "err-request") == ""
    assert d.find_elements("css selector", "#results .result") == []


@pytest.mark.serve
def test_phone_width_needs_no_sideways_scrolling(browser, serve_env):
    d = browser
    try:  # a phone's viewport (headless Chromium keeps windows at least 500 px wide: emulate the device)
        d.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                          {"width": 390, "height": 844, "deviceScaleFactor": 2, "mobile": True})
        _open(d, serve_env.base_url + "/")
        assert d.execute_script("return window.innerWidth") == 390
        _wait(d, lambda d: d.find_elements("css selector", "#base_model option"), 60)
        assert d.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")
        generate = _by_id(d, "generate")
        d.execute_script("arguments[0].scrollIntoView()", generate)
        assert generate.is_displayed() and generate.rect["x"] + generate.rect["width"] <= 390
    finally:
        d.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})


# -- an in-process Ingress with fake backends (default limits), served by uvicorn on the loopback ----------
def slow_generator(step_s: float):
    """A Generator whose jobs take ``step_s`` a denoising step (fakes.StreamingGenerator)."""
    from fakes import StreamingGenerator

    return StreamingGenerator(step_s=step_s)


@pytest.fixture()
def fake_server(tmp_path, monkeypatch):
    """start(auth=False, generator=None) -> (base URL, [(path, query, authorization) of every request])."""
    from deployments.config import AppArgs
    from deployments.ingress.http.app import build_http_app
    from deployments.ingress.service import GenerationService
    from fakes import FakeFace, FakeGenerator

    servers = []

    def start(auth: bool = False, generator=None):
        monkeypatch.setenv("PG_BROWSER_KEYS", "pg:" + hashlib.sha256(KEY.encode()).hexdigest())
        args = AppArgs.model_validate({"identity_store": str(tmp_path / "ids"),
                                       "auth": {"enabled": auth, "key_hashes_env": "PG_BROWSER_KEYS"}})
        core = GenerationService(args, FakeFace(), generator or FakeGenerator(),
                                 status_fn=lambda: {"FaceAnalyzer": "HEALTHY", "Generator": "HEALTHY"})
        return _serve(build_http_app(core), servers)

    yield start
    for server, thread in servers:
        server.should_exit = True
        thread.join(10)


def _serve(app, servers):
    import uvicorn

    seen: list[tuple[str, str, str]] = []  # (path, query, authorization) of every request the page made

    async def recorder(scope, receive, send):
        if scope["type"] == "http":
            headers = dict(scope["headers"])
            seen.append((scope["path"], scope["query_string"].decode(), headers.get(b"authorization", b"").decode()))
        await app(scope, receive, send)

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(recorder, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    servers.append((server, thread))
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    return f"http://127.0.0.1:{port}", seen


def test_api_key_box_and_the_key_only_in_the_header(browser, fake_server, face_photo):
    d = browser
    url, seen = fake_server(auth=True)
    _open(d, url + "/")
    _wait(d, lambda d: _text(d, "err-api_key"), 30, "no API-key prompt on 401")
    assert "API key" in _by_id(d, "err-api_key").text
    assert _by_id(d, "tiny-notice").is_displayed() is False  # a real-profile server: no notice
    _by_id(d, "api-key").send_keys(KEY)
    d.find_element("css selector", "#key-form button[type=submit]").click()
    _wait(d, lambda d: d.find_elements("css selector", "#base_model option"), 30, "models not loaded with the key")
    assert _by_id(d, "err-api_key").text == ""
    _by_id(d, "face-input").send_keys(str(face_photo))
    _wait(d, lambda d: d.find_elements("css selector", "#face-list svg.overlay"), 30)
    _set(d, "size", "custom")
    _set(d, "width", 64)
    _set(d, "height", 64)
    _by_id(d, "generate").click()
    _wait(d, lambda d: d.find_elements("css selector", "#results .result img"), 30, "no result with the key")
    # store the photos as an identity, then generate from it
    _by_id(d, "save-identity").click()
    _wait(d, lambda d: d.execute_script("return document.getElementById('identity').value"), 30, "identity not saved")
    assert _by_id(d, "identity-panel").is_displayed() and not _by_id(d, "photos-panel").is_displayed()
    _by_id(d, "generate").click()
    _wait(d, lambda d: len(d.find_elements("css selector", "#results .result img")) == 2, 30, "no identity result")
    api_calls = [s for s in seen if s[0].startswith("/v1/")]
    assert {p for p, _, _ in api_calls} >= {"/v1/models", "/v1/faces:analyze", "/v1/jobs", "/v1/identities"}
    assert any(p.startswith("/v1/jobs/job_") and p.endswith("/events") for p, _, _ in api_calls)  # with the key
    assert all(auth == "Bearer " + KEY for p, _, auth in api_calls if p != "/v1/models" or auth), api_calls
    assert not any(KEY in path or KEY in query for path, query, _ in seen)
    assert KEY not in d.current_url
    # kept for this tab only (sessionStorage), and "Forget" drops it
    assert d.execute_script("return sessionStorage.getItem('instantid.apiKey')") == KEY
    _by_id(d, "key-forget").click()
    assert d.execute_script("return sessionStorage.getItem('instantid.apiKey')") is None


def _big_photo(path: Path, side: int) -> str:
    """A side x side JPEG (smooth, so it stays a few MB like a phone photo, not a noise-sized one)."""
    import numpy as np
    from PIL import Image

    ramp = np.linspace(0, 255, side, dtype=np.float32)
    rgb = np.stack([ramp[None, :].repeat(side, 0), ramp[:, None].repeat(side, 1),
                    np.full((side, side), 128, np.float32)], axis=-1).astype(np.uint8)
    Image.fromarray(rgb).save(path, quality=90)
    return str(path)


def test_the_documented_limits_end_to_end(browser, fake_server, tmp_path):
    """Default limits: four photos at max_image_pixels (4096x4096) go up, four 2048x2048 images come back and
    are kept for the tab; a photo one pixel over the limit is refused beside that photo."""
    d = browser
    url, seen = fake_server()
    _open(d, url + "/")
    _wait(d, lambda d: d.find_elements("css selector", "#base_model option"), 30)
    photos = [_big_photo(tmp_path / f"big{i}.jpg", 4096) for i in range(4)]
    _by_id(d, "face-input").send_keys("\n".join(photos))
    _wait(d, lambda d: len(d.find_elements("css selector", "#face-list svg.overlay")) == 4, 60, "big photos not analysed")
    _set(d, "size", "custom")
    _set(d, "width", 2048)
    _set(d, "height", 2048)
    _set(d, "num_images", 4)
    _by_id(d, "generate").click()
    _wait(d, lambda d: len(d.find_elements("css selector", "#results .result img")) == 4, 60, "no 2048 px results")
    sizes = d.execute_script("return [...document.querySelectorAll('#results .result img')]"
                             ".map(i => [i.naturalWidth, i.naturalHeight])")
    assert sizes == [[2048, 2048]] * 4
    d.refresh()
    _wait(d, lambda d: len(d.find_elements("css selector", "#results .result img")) == 4, 20, "results not kept")

    assert d.find_elements("css selector", "#face-list .photo") == []  # photos are not kept, results are
    _by_id(d, "face-input").send_keys(_big_photo(tmp_path / "over.jpg", 4097))
    _wait(d, lambda d: _text(d, "err-face-0"), 60, "no error beside the oversized photo")
    assert _text(d, "err-face-0") == "This image is too large for the server."


def test_job_progress_then_cancel_stops_it_on_the_server(browser, fake_server, face_photo):
    """The page runs a job: the bar follows its steps from the event stream; Cancel cancels the job on the server
    (its status there is canceled, the Generator's stream was cancelled), and no result arrives late."""
    import httpx

    d = browser
    slow = slow_generator(step_s=0.3)
    url, seen = fake_server(generator=slow)
    _open(d, url + "/")
    _wait(d, lambda d: d.find_elements("css selector", "#base_model option"), 30)
    _by_id(d, "face-input").send_keys(str(face_photo))
    _wait(d, lambda d: d.find_elements("css selector", "#face-list svg.overlay"), 30)
    _set(d, "size", "custom")
    _set(d, "width", 64)
    _set(d, "height", 64)
    _set(d, "steps", 20)  # 6 s of steps
    _by_id(d, "generate").click()
    _wait(d, lambda d: _text(d, "status").startswith("Step"), 15, "no step progress shown")
    _wait(d, lambda d: (d.execute_script("return document.getElementById('progress').value") or 0) >= 2 / 20, 10,
          "the bar does not follow the steps")
    step = int(_text(d, "status").split()[1])
    assert 1 <= step < 20 and _text(d, "status").startswith(f"Step {step} of 20")
    job_id = d.execute_script("return state.jobId")
    assert job_id and job_id.startswith("job_")
    _by_id(d, "cancel").click()
    _wait(d, lambda d: _text(d, "status") == "Cancelled.", 10)
    assert _by_id(d, "generate").is_enabled() and not _by_id(d, "progress").is_displayed()
    assert (f"/v1/jobs/{job_id}/cancel", "", "") in seen  # the page told the server
    job = httpx.get(f"{url}/v1/jobs/{job_id}", timeout=10).json()
    assert job["status"] == "canceled" and job["progress"]["step"] < 20
    assert slow.streams and slow.streams[0].cancelled  # the Generator's stream was cancelled
    time.sleep(1)
    assert d.find_elements("css selector", "#results .result") == []
    assert _text(d, "err-request") == ""


def test_cancel_stops_waiting(browser, fake_server, face_photo):
    d = browser
    slow = slow_generator(step_s=0.15)  # 20 default steps: 3 s
    url, _ = fake_server(generator=slow)
    _open(d, url + "/")
    _wait(d, lambda d: d.find_elements("css selector", "#base_model option"), 30)
    _by_id(d, "face-input").send_keys(str(face_photo))
    _wait(d, lambda d: d.find_elements("css selector", "#face-list svg.overlay"), 30)
    _set(d, "size", "custom")
    _set(d, "width", 64)
    _set(d, "height", 64)
    _by_id(d, "generate").click()
    _wait(d, lambda d: _by_id(d, "cancel").is_displayed(), 10, "no cancel button while generating")
    _by_id(d, "cancel").click()
    _wait(d, lambda d: _text(d, "status") == "Cancelled.", 10)
    assert _by_id(d, "generate").is_enabled() and not _by_id(d, "progress").is_displayed()
    time.sleep(3.5)  # past the generator's time: the page dropped the request, so no result arrives late
    assert d.find_elements("css selector", "#results .result") == []
    assert _text(d, "err-request") == ""
