"""Every error the issue lists, over HTTP on the local cluster: a 4xx/5xx JSON body, never a traceback."""

from __future__ import annotations

import base64
import concurrent.futures as cf

import pytest

from serve_helpers import b64, png_bytes

pytestmark = pytest.mark.serve


# -- 400: invalid base64, non-images, bad JSON ------------------------------------------------------------
def test_invalid_base64_is_400(http, tiny_request, check_error):
    resp = http.post("/v1/generate", json=tiny_request(face_images=["not base64 !!!"]))
    check_error(resp, 400, "invalid_base64", "face_images[0]")


def test_non_image_is_400(http, face_b64, tiny_request, check_error):
    text = base64.b64encode(b"hello, I am not an image").decode()
    resp = http.post("/v1/generate", json=tiny_request(face_images=[face_b64, text]))
    check_error(resp, 400, "invalid_image", "face_images[1]")


def test_unsupported_image_format_is_400(http, tiny_request, check_error):
    gif = b64(png_bytes(fmt="GIF"))
    check_error(http.post("/v1/generate", json=tiny_request(face_images=[gif])), 400, "invalid_image",
                "face_images[0]")


def test_truncated_image_is_400(http, face_photo, tiny_request, check_error):
    cut = b64(face_photo.read_bytes()[:3000])
    check_error(http.post("/v1/generate", json=tiny_request(face_images=[cut])), 400, "invalid_image")


def test_invalid_json_is_400(http, check_error):
    resp = http.post("/v1/generate", content=b"{not json", headers={"content-type": "application/json"})
    check_error(resp, 400, "invalid_json")


def test_invalid_base64_on_identities_is_400(http, check_error):
    check_error(http.post("/v1/identities", json={"face_images": ["%%%"]}), 400, "invalid_base64",
                "face_images[0]")


# -- 413: sizes -----------------------------------------------------------------------------------------
def test_body_too_large_is_413(http, check_error):
    resp = http.post("/v1/generate", json={"face_images": ["A" * 1_600_000]})
    check_error(resp, 413, "body_too_large")


def test_too_many_pixels_is_413(http, tiny_request, check_error):
    big = b64(png_bytes(size=(1600, 1600)))
    check_error(http.post("/v1/generate", json=tiny_request(face_images=[big])), 413, "image_too_large",
                "face_images[0]")


# -- 422: no face (which image), out-of-range parameters (which field) -----------------------------------
def test_no_face_names_the_image(http, face_b64, blank_b64, tiny_request, check_error):
    resp = http.post("/v1/generate", json=tiny_request(face_images=[face_b64, blank_b64]))
    err = check_error(resp, 422, "no_face", "face_images[1]")
    assert "face_images[1]" in err["message"]


def test_no_face_in_pose_image(http, face_b64, blank_b64, tiny_request, check_error):
    resp = http.post("/v1/generate", json=tiny_request(face_images=[face_b64], pose_image=blank_b64))
    check_error(resp, 422, "no_face", "pose_image")


def test_no_face_on_identity_creation(http, blank_b64, check_error):
    check_error(http.post("/v1/identities", json={"face_images": [blank_b64]}), 422, "no_face", "face_images[0]")


@pytest.mark.parametrize("field,value", [
    ("steps", 1000), ("steps", 0), ("width", 65), ("width", 8192), ("height", 32), ("num_images", 99),
    ("guidance_scale", -1), ("ip_adapter_scale", 5), ("seed", -3), ("scheduler", "nope"),
    ("base_model", "unknown-model"), ("output_format", "bmp"), ("delivery", "fax"), ("style", "no-such-style"),
    ("prompt", "x" * 2001), ("timeout_s", 0), ("unexpected_field", 1),
])
def test_out_of_range_parameter_is_422_with_field(http, face_b64, tiny_request, check_error, field, value):
    resp = http.post("/v1/generate", json=tiny_request(face_images=[face_b64], **{field: value}))
    err = check_error(resp, 422, "invalid_parameter", field)
    assert field in err["message"]


def test_too_many_face_images_is_422(http, face_b64, tiny_request, check_error):
    check_error(http.post("/v1/generate", json=tiny_request(face_images=[face_b64] * 5)), 422, "invalid_parameter",
                "face_images")


def test_unknown_lora_is_422(http, face_b64, tiny_request, check_error):
    resp = http.post("/v1/generate", json=tiny_request(face_images=[face_b64], loras={"nope": 1.0}))
    check_error(resp, 422, "invalid_parameter", "loras")
    # a LoRA of another model is unknown to this one
    resp = http.post("/v1/generate", json=tiny_request(face_images=[face_b64], base_model="tiny-b",
                                                       loras={"tiny-lora": 1.0}))
    check_error(resp, 422, "invalid_parameter", "loras")


def test_face_source_required_and_exclusive(http, face_b64, tiny_request, check_error):
    check_error(http.post("/v1/generate", json=tiny_request()), 422, "invalid_parameter", "face_images")
    both = tiny_request(face_images=[face_b64], identity_id="id_" + "0" * 32)
    check_error(http.post("/v1/generate", json=both), 422, "invalid_parameter")


def test_malformed_identity_id_in_generate_is_422(http, tiny_request, check_error):
    check_error(http.post("/v1/generate", json=tiny_request(identity_id="../../etc/passwd")), 422,
                "invalid_parameter", "identity_id")


# -- 404: unknown identity ---------------------------------------------------------------------------------
def test_unknown_identity_is_404(http, tiny_request, check_error):
    missing = "id_" + "f" * 32
    check_error(http.get(f"/v1/identities/{missing}"), 404, "not_found")
    check_error(http.delete(f"/v1/identities/{missing}"), 404, "not_found")
    check_error(http.post("/v1/generate", json=tiny_request(identity_id=missing)), 404, "not_found", "identity_id")
    check_error(http.get("/v1/identities/not-an-id"), 404, "not_found")
    check_error(http.get("/v1/identities/..%2F..%2Fetc%2Fpasswd"), 404, "not_found")


def test_unknown_route_and_method_are_json(http, check_error):
    check_error(http.get("/v1/nothing-here"), 404, "not_found")
    check_error(http.put("/v1/generate", json={}), 405, "method_not_allowed")


# -- 503: Generator queue full ---------------------------------------------------------------------------
def test_generator_queue_full_is_503_with_retry_after(http, identity_id, tiny_request, check_error):
    # The test app's Generator admits 4 ongoing + 6 queued requests; 24 at once must overflow.
    body = tiny_request(identity_id=identity_id, steps=8)
    with cf.ThreadPoolExecutor(24) as pool:
        responses = list(pool.map(lambda _: http.post("/v1/generate", json=body), range(24)))
    statuses = sorted(r.status_code for r in responses)
    assert set(statuses) <= {200, 503}, statuses
    rejected = [r for r in responses if r.status_code == 503]
    assert rejected, statuses
    assert statuses.count(200) >= 4, statuses
    for resp in rejected:
        check_error(resp, 503, "queue_full")
        assert int(resp.headers["retry-after"]) >= 1


# -- 504: past the request's timeout ----------------------------------------------------------------------
def test_request_past_its_timeout_is_504(http, face_b64, tiny_request, check_error):
    resp = http.post("/v1/generate", json=tiny_request(face_images=[face_b64], timeout_s=0.01, steps=20))
    check_error(resp, 504, "timeout")
    # the service keeps working afterwards
    ok = http.post("/v1/generate", json=tiny_request(face_images=[face_b64]))
    assert ok.status_code == 200, ok.text
