"""The bad-input table: hostile or broken requests over HTTP on the local cluster.

Each row is one request and the exact status + error code (+ field) it must get. Image-size attacks are
refused from the header, before the image is decoded: a PNG whose IHDR claims 20000x20000 is a few dozen
bytes, and a zero-filled 3000x3000 PNG is a real decompression bomb (26 KB that inflate to 27 MB).
"""

from __future__ import annotations

import io
import json
import struct
import zlib

import pytest

from serve_helpers import assert_error, b64, png_bytes

pytestmark = pytest.mark.serve


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width`` x ``height`` (the pixel data is NOT there)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def png_bomb(side: int = 3000) -> bytes:
    """A real, valid, highly compressible PNG: small on the wire, side*side*3 bytes once decoded."""
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (side, side)).save(out, format="PNG", optimize=True)
    return out.getvalue()


def jpeg_claiming(width: int, height: int, face: bytes) -> bytes:
    """The face JPEG with its SOF0/SOF2 frame size rewritten (the header lies about the size)."""
    data = bytearray(face)
    i = 2
    while i < len(data) - 9:
        marker = data[i + 1]
        if data[i] == 0xFF and marker in (0xC0, 0xC1, 0xC2):
            struct.pack_into(">HH", data, i + 5, height, width)
            return bytes(data)
        i += 2 + struct.unpack(">H", data[i + 2:i + 4])[0]
    raise AssertionError("no SOF marker")


FACE = "<face>"  # placeholder replaced by the face photo's base64 in the test
BLANK = "<blank>"


def _img(data: bytes) -> str:
    return b64(data)


# (id, request fields or raw body, status, code, field)
ROWS = [
    # -- images -----------------------------------------------------------------------------------------
    ("truncated-jpeg", {"face_images": ["<truncated>"]}, 400, "invalid_image", None),
    ("png-claims-20000x20000", {"face_images": [_img(png_claiming(20000, 20000))]}, 413, "image_too_large",
     "face_images[0]"),
    ("png-claims-5000x5000", {"face_images": [_img(png_claiming(5000, 5000))]}, 413, "image_too_large",
     "face_images[0]"),
    ("png-bomb-3000x3000", {"face_images": [_img(png_bomb())]}, 413, "image_too_large", "face_images[0]"),
    ("png-claims-0x0", {"face_images": [_img(png_claiming(0, 0))]}, 400, "invalid_image", "face_images[0]"),
    ("jpeg-claims-0x0", {"face_images": ["<jpeg0>"]}, 400, "invalid_image", "face_images[0]"),
    ("jpeg-claims-20000x20000", {"face_images": ["<jpeg20000>"]}, 413, "image_too_large", "face_images[0]"),
    ("text-as-image", {"face_images": [_img(b"GIF89a? no, just some text pretending")]}, 400, "invalid_image",
     "face_images[0]"),
    ("svg-as-image", {"face_images": [_img(b'<svg xmlns="http://www.w3.org/2000/svg"/>')]}, 400, "invalid_image",
     "face_images[0]"),
    ("gif-format", {"face_images": [_img(png_bytes(fmt="GIF"))]}, 400, "invalid_image", "face_images[0]"),
    ("bmp-format", {"face_images": [_img(png_bytes(fmt="BMP"))]}, 400, "invalid_image", "face_images[0]"),
    ("bad-base64", {"face_images": ["@@@not base64@@@"]}, 400, "invalid_base64", "face_images[0]"),
    ("empty-base64", {"face_images": [""]}, 400, "invalid_image", "face_images[0]"),
    ("url-instead-of-image", {"face_images": ["http://169.254.169.254/latest/meta-data/"]}, 400, "invalid_base64",
     "face_images[0]"),
    ("pose-url", {"face_images": [FACE], "pose_image": "https://example.com/a.jpg"}, 400, "invalid_base64",
     "pose_image"),
    # -- faces --------------------------------------------------------------------------------------------
    ("empty-face-list", {"face_images": []}, 422, "invalid_parameter", "face_images"),
    ("five-faces", {"face_images": [FACE] * 5}, 422, "invalid_parameter", "face_images"),
    ("no-face", {"face_images": [BLANK]}, 422, "no_face", "face_images[0]"),
    ("no-face-second-image", {"face_images": [FACE, BLANK]}, 422, "no_face", "face_images[1]"),
    # -- wrong types --------------------------------------------------------------------------------------
    ("face-images-not-a-list", {"face_images": FACE}, 422, "invalid_parameter", "face_images"),
    ("face-image-not-a-string", {"face_images": [123]}, 422, "invalid_parameter", "face_images[0]"),
    ("width-string", {"face_images": [FACE], "width": "wide"}, 422, "invalid_parameter", "width"),
    ("steps-float", {"face_images": [FACE], "steps": 1.5}, 422, "invalid_parameter", "steps"),
    ("prompt-number", {"face_images": [FACE], "prompt": 42}, 422, "invalid_parameter", "prompt"),
    ("loras-list", {"face_images": [FACE], "loras": ["tiny-lora"]}, 422, "invalid_parameter", "loras"),
    ("body-is-a-list", b"[1, 2, 3]", 422, "invalid_parameter", None),
    ("body-is-a-string", b'"hello"', 422, "invalid_parameter", None),
    ("body-not-json", b"\xff\xfe garbage", 400, "invalid_json", None),
    ("body-empty", b"", 400, "invalid_json", None),
    # -- numbers ------------------------------------------------------------------------------------------
    ("negative-steps", {"face_images": [FACE], "steps": -1}, 422, "invalid_parameter", "steps"),
    ("huge-steps", {"face_images": [FACE], "steps": 10**12}, 422, "invalid_parameter", "steps"),
    ("huge-num-images", {"face_images": [FACE], "num_images": 10**30}, 422, "invalid_parameter", "num_images"),
    ("zero-num-images", {"face_images": [FACE], "num_images": 0}, 422, "invalid_parameter", "num_images"),
    ("negative-width", {"face_images": [FACE], "width": -64}, 422, "invalid_parameter", "width"),
    ("huge-height", {"face_images": [FACE], "height": 20000}, 422, "invalid_parameter", "height"),
    ("zero-size", {"face_images": [FACE], "width": 0, "height": 0}, 422, "invalid_parameter", "width"),
    ("seed-2^70", {"face_images": [FACE], "seed": 2**70}, 422, "invalid_parameter", "seed"),
    ("negative-scale", {"face_images": [FACE], "ip_adapter_scale": -0.5}, 422, "invalid_parameter",
     "ip_adapter_scale"),
    ("huge-lora-scale", {"face_images": [FACE], "loras": {"tiny-lora": 1e9}}, 422, "invalid_parameter",
     "loras.tiny-lora"),
    ("nan-guidance", b'{"face_images": ["<face>"], "guidance_scale": NaN}', 422, "invalid_parameter",
     "guidance_scale"),
    ("inf-controlnet-scale", b'{"face_images": ["<face>"], "controlnet_conditioning_scale": Infinity}', 422,
     "invalid_parameter", "controlnet_conditioning_scale"),
    ("minus-inf-timeout", b'{"face_images": ["<face>"], "timeout_s": -Infinity}', 422, "invalid_parameter",
     "timeout_s"),
    ("nan-width", b'{"face_images": ["<face>"], "width": NaN}', 422, "invalid_parameter", "width"),
    ("1e999-lora", b'{"face_images": ["<face>"], "loras": {"tiny-lora": 1e999}}', 422, "invalid_parameter",
     "loras.tiny-lora"),
    # -- prompts ------------------------------------------------------------------------------------------
    ("prompt-too-long", {"face_images": [FACE], "prompt": "x" * 2001}, 422, "invalid_parameter", "prompt"),
    ("unicode-prompt-too-long", {"face_images": [FACE], "prompt": "\U0001F600" * 2001}, 422, "invalid_parameter",
     "prompt"),
    ("negative-prompt-too-long", {"face_images": [FACE], "negative_prompt": "y" * 5000}, 422, "invalid_parameter",
     "negative_prompt"),
    # -- identity ids -------------------------------------------------------------------------------------
    ("identity-traversal", {"identity_id": "../../../etc/passwd"}, 422, "invalid_parameter", "identity_id"),
    ("identity-s3-key-escape", {"identity_id": "id_" + "0" * 32 + "/../x"}, 422, "invalid_parameter",
     "identity_id"),
    ("identity-unknown", {"identity_id": "id_" + "e" * 32}, 404, "not_found", "identity_id"),
]

# Inputs that are odd but legal: they must succeed (200), not crash the pipeline.
OK_ROWS = [
    ("unicode-prompt", {"prompt": "portrait of \u00e9l\u00e8ve \u65e5\u672c\u8a9e \U0001F469\u200d\U0001F52C "
                                  "\u202e\u0000 \ud7ff", "negative_prompt": "\U0001F4A9" * 300}),
    ("max-length-prompt", {"prompt": "a " * 1000}),
]


# The same for multipart/form-data bodies (a face file plus these text fields): (id, fields, status, code, field)
MULTIPART_ROWS = [
    ("multipart-loras-not-json", {"loras": "{tiny-lora: 1}"}, 422, "invalid_parameter", "loras"),
    ("multipart-loras-truncated-json", {"loras": '{"tiny-lora": 1'}, 422, "invalid_parameter", "loras"),
    ("multipart-loras-list", {"loras": '["tiny-lora"]'}, 422, "invalid_parameter", "loras"),
    ("multipart-loras-number", {"loras": "0.8"}, 422, "invalid_parameter", "loras"),
    ("multipart-loras-nan-scale", {"loras": '{"tiny-lora": NaN}'}, 422, "invalid_parameter", "loras.tiny-lora"),
    ("multipart-loras-unknown", {"loras": '{"nope": 1}'}, 422, "invalid_parameter", "loras"),
    ("multipart-steps-word", {"steps": "many"}, 422, "invalid_parameter", "steps"),
    ("multipart-width-float", {"width": "64.5"}, 422, "invalid_parameter", "width"),
]


@pytest.fixture(scope="module")
def substitutions(face_photo, face_b64, blank_b64) -> dict[str, str]:
    face = face_photo.read_bytes()
    return {"<face>": face_b64, "<blank>": blank_b64, "<truncated>": b64(face[:3000]),
            "<jpeg0>": b64(jpeg_claiming(0, 0, face)), "<jpeg20000>": b64(jpeg_claiming(20000, 20000, face))}


def _fill(value, subs):
    if isinstance(value, str):
        return subs.get(value, value)
    if isinstance(value, list):
        return [_fill(v, subs) for v in value]
    if isinstance(value, dict):
        return {k: _fill(v, subs) for k, v in value.items()}
    return value


@pytest.mark.parametrize("name,body,status,code,field", ROWS, ids=[r[0] for r in ROWS])
def test_bad_input_is_refused_with_the_right_status(http, tiny_request, substitutions, name, body, status, code,
                                                   field):
    if isinstance(body, bytes):
        for key, value in substitutions.items():
            body = body.replace(key.encode(), value.encode())
        resp = http.post("/v1/generate", content=body, headers={"content-type": "application/json"})
    else:
        resp = http.post("/v1/generate", json=tiny_request(**_fill(body, substitutions)))
    err = assert_error(resp, status, code, field)
    if field is not None and code == "invalid_parameter":
        assert field.split(".")[0].split("[")[0] in err["message"], err
    # nothing of the input is echoed back in bulk (no base64 or giant prompts in error messages)
    assert len(resp.content) < 4000, resp.text[:200]


@pytest.mark.parametrize("name,fields", OK_ROWS, ids=[r[0] for r in OK_ROWS])
def test_odd_but_legal_input_succeeds(http, tiny_request, face_b64, name, fields):
    resp = http.post("/v1/generate", json=tiny_request(face_images=[face_b64], **fields))
    assert resp.status_code == 200, resp.text[:500]
    assert len(resp.json()["images"]) == 1


@pytest.mark.parametrize("name,fields,status,code,field", MULTIPART_ROWS, ids=[r[0] for r in MULTIPART_ROWS])
def test_bad_multipart_input_is_refused_with_the_right_status(http, tiny_request, face_photo, name, fields, status,
                                                             code, field):
    form = {k: str(v) for k, v in tiny_request().items()}
    form.update(fields)
    files = [("face_images", ("me.jpg", face_photo.read_bytes(), "image/jpeg"))]
    err = assert_error(http.post("/v1/generate", data=form, files=files), status, code, field)
    assert field.split(".")[0] in err["message"], err


def test_identity_creation_refuses_bombs_and_empty_lists(http, check_error):
    check_error(http.post("/v1/identities", json={"face_images": [b64(png_claiming(20000, 20000))]}), 413,
                "image_too_large", "face_images[0]")
    check_error(http.post("/v1/identities", json={"face_images": []}), 422, "invalid_parameter", "face_images")
    check_error(http.post("/v1/identities", json={"face_images": ["https://example.com/me.jpg"]}), 400,
                "invalid_base64", "face_images[0]")


def test_multipart_bomb_and_text_files_are_refused(http, tiny_request, check_error):
    fields = {k: str(v) for k, v in tiny_request().items()}
    bomb = [("face_images", ("bomb.png", png_claiming(20000, 20000), "image/png"))]
    check_error(http.post("/v1/generate", data=fields, files=bomb), 413, "image_too_large", "face_images[0]")
    text = [("face_images", ("me.jpg", b"just text, labelled as a JPEG", "image/jpeg"))]
    check_error(http.post("/v1/generate", data=fields, files=text), 400, "invalid_image", "face_images[0]")


def test_exif_orientation_is_applied(http, face_photo, tiny_request):
    """A photo stored sideways with EXIF Orientation=6 (rotate 90 CW on display) is analysed upright: the face
    is found, and its reported image_size is the displayed (transposed) size."""
    from PIL import Image

    upright = Image.open(face_photo).convert("RGB")
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # what a camera holding the phone sideways stores
    exif = Image.Exif()
    exif[0x0112] = 6
    out = io.BytesIO()
    stored.save(out, format="JPEG", quality=92, exif=exif.tobytes())
    resp = http.post("/v1/generate", json=tiny_request(face_images=[b64(out.getvalue())]))
    assert resp.status_code == 200, resp.text[:500]
    assert resp.json()["face"]["image_size"] == list(upright.size)


def test_rows_cover_the_issue_list():
    names = {r[0] for r in ROWS} | {r[0] for r in OK_ROWS}
    for wanted in ("truncated-jpeg", "png-claims-20000x20000", "text-as-image", "png-claims-0x0", "width-string",
                   "negative-steps", "huge-num-images", "nan-guidance", "unicode-prompt", "prompt-too-long",
                   "empty-face-list", "five-faces", "no-face"):
        assert wanted in names
    json.dumps([r[1] for r in ROWS if not isinstance(r[1], bytes)])  # every JSON row is plain JSON
