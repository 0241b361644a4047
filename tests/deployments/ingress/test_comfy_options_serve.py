"""ComfyUI_InstantID's controls over the service (issue 27): combine, noise, det_size, det_retry, face_index and
pose_face_index in the request schema (422s naming the field), through the real FaceAnalyzer core to the
Generator's task and the pipeline's request, with the library computing the expected values; and the OpenAPI."""

from __future__ import annotations

import asyncio
import io

import numpy as np
import pytest
from PIL import Image, ImageOps

from deployments.errors import ServiceError
from deployments.generator.deployment import accept_task
from deployments.ingress.context import RequestContext
from deployments.ingress.service import GenerationService
from deployments.messages import GenerationTask
from deployments.tiny_profile import resolve_args
from fakes import LocalFace, LocalGenerator, generate_request, make_client
from instantid.face import FaceModel, load_image
from instantid.identity import Detection, build_identity, build_pose, combine_embeddings
from serve_helpers import app_args, assert_error, b64


@pytest.fixture(scope="module")
def service(tiny_bundle):
    args = resolve_args(app_args(tiny_bundle))
    core = GenerationService(args, LocalFace(args), LocalGenerator(args))
    core.backends.require = lambda names: asyncio.sleep(0)
    return core


@pytest.fixture(scope="module")
def photos(face_photo):
    mirrored = io.BytesIO()
    ImageOps.mirror(Image.open(face_photo).convert("RGB")).save(mirrored, "PNG")
    return {"face": face_photo.read_bytes(), "other": mirrored.getvalue()}


@pytest.fixture(scope="module")
def library(tiny_bundle):
    return FaceModel(str(tiny_bundle / "antelopev2"))


def generate(service, **fields):
    data = {"width": 64, "height": 64, "steps": 1, "seed": 11, "identity_score": False, **fields}
    return asyncio.run(service.generate(RequestContext(route="/v1/generate"), data))


def last_task(service) -> GenerationTask:
    return service.backends.generator.jobs[-1]


def test_combine_and_noise_reach_the_task_as_the_library_computes_them(service, photos, library):
    both = [b64(photos["face"]), b64(photos["other"])]
    faces = [f.embedding for f in build_identity(library, [("a", load_image(photos["face"])),
                                                           ("b", load_image(photos["other"]))]).faces]
    generate(service, face_images=both)
    np.testing.assert_array_equal(last_task(service).embedding, np.mean(np.stack(faces), axis=0))  # the default
    assert last_task(service).noise == 0.0
    generate(service, face_images=both, combine="concat", noise=0.35)
    task = last_task(service)
    np.testing.assert_array_equal(task.embedding, np.stack(faces))
    assert task.noise == 0.35
    generate(service, face_images=both, combine="norm_average", identity_score=True)
    np.testing.assert_allclose(last_task(service).embedding, combine_embeddings(faces, "norm_average"), rtol=1e-6)


def test_face_index_det_size_and_pose_face_index_reach_the_face_analysis(service, photos, library):
    photo = load_image(photos["face"])
    response = generate(service, face_images=[b64(photos["face"])], face_index=1, det_size=320, det_retry=True)
    picked = build_identity(library, [("a", photo)], detection=Detection(det_size=320, retry=True, face_index=1))
    np.testing.assert_array_equal(last_task(service).embedding, picked.embedding)
    np.testing.assert_allclose(last_task(service).kps, picked.pose.kps)
    assert response["face"]["source"] == "face_images[0]"
    generate(service, face_images=[b64(photos["face"])], pose_image=b64(photos["other"]), pose_face_index=1)
    pose = build_pose(library, "p", load_image(photos["other"]), Detection(face_index=1))
    np.testing.assert_allclose(last_task(service).kps, pose.kps)
    with pytest.raises(ServiceError) as info:
        generate(service, face_images=[b64(photos["face"])], face_index=2)  # the tiny detector finds two
    assert info.value.status == 422 and info.value.field == "face_index"


@pytest.mark.parametrize("fields, field", [
    ({"noise": 1.5}, "noise"), ({"noise": -0.1}, "noise"), ({"det_size": 600}, "det_size"),
    ({"det_size": 64}, "det_size"), ({"combine": "sum"}, "combine"), ({"face_index": -1}, "face_index"),
    ({"pose_face_index": 0}, "pose_face_index"),
    ({"identity_id": "id_" + "0" * 32, "face_images": None, "combine": "concat"}, "combine"),
    ({"face_images": None, "people": [{"face_images": ["x"], "box": [0, 0, 30, 30]}], "det_size": 320},
     "det_size"),
])
def test_bad_options_are_422s_naming_the_field(tmp_path, fields, field):
    client = make_client(tmp_path)
    body = {k: v for k, v in generate_request(**fields).items() if v is not None}
    assert_error(client.post("/v1/generate", json=body), 422, "invalid_parameter", field)


def test_good_options_are_accepted(tmp_path):
    client = make_client(tmp_path)
    for fields in ({"noise": 0.35}, {"noise": 1.0, "combine": "concat"}, {"combine": "norm_average"},
                   {"det_size": 320, "det_retry": True}, {"det_size": 1280}, {"face_index": 0},
                   {"pose_image": generate_request()["face_images"][0], "pose_face_index": 0}):
        resp = client.post("/v1/generate", json=generate_request(**fields))
        assert resp.status_code == 200, (fields, resp.text)


def test_the_options_are_in_the_openapi_schema(tmp_path):
    schema = make_client(tmp_path).get("/openapi.json").json()
    props = next(s for name, s in schema["components"]["schemas"].items() if name.startswith("GenerateRequest")
                 )["properties"]
    assert props["combine"]["enum"] == ["average", "norm_average", "concat"]
    assert props["combine"]["default"] == "average"
    assert props["noise"]["minimum"] == 0 and props["noise"]["maximum"] == 1 and props["noise"]["default"] == 0
    det = props["det_size"]["anyOf"][0]
    assert det["minimum"] == 160 and det["maximum"] == 1280 and det["multipleOf"] == 32
    assert {"det_retry", "face_index", "pose_face_index"} <= set(props)


def test_a_concatenated_task_is_accepted_and_batches_only_with_its_token_count():
    base = dict(model="tiny", kps=np.zeros((5, 2)) + 30, canvas=(64, 64), width=64, height=64, steps=2)
    plain = accept_task(GenerationTask(embedding=np.ones(512, np.float32), **base))
    concat = accept_task(GenerationTask(embedding=np.ones((3, 512), np.float32), noise=0.2, **base))
    assert concat.embedding.shape == (3, 512)
    assert plain.batch_key() != concat.batch_key()
    assert concat.batch_key() == GenerationTask(embedding=np.zeros((3, 512), np.float32), **base).batch_key()
    with pytest.raises(Exception, match="512"):
        accept_task(GenerationTask(embedding=np.ones((3, 511), np.float32), **base))


def test_the_handle_client_carries_the_options(service, photos, face_photo, tmp_path):
    """deployments/client.py over the service (a handle-shaped adapter in process, as the Ray tests' handle)."""
    from deployments.client import InstantIDClient
    from deployments.ingress.schemas import GenerateRequest

    class Response:
        def __init__(self, payload):
            self.payload = payload

        def result(self, timeout_s=None):
            return asyncio.run(service.generate(RequestContext(route="handle"), self.payload))

    class Handle:
        class generate:
            @staticmethod
            def remote(payload):
                return Response(payload)

    other = tmp_path / "other.png"
    other.write_bytes(photos["other"])
    client = InstantIDClient(handle=Handle())
    request = GenerateRequest(face_images=[str(face_photo), str(other)], width=64, height=64, steps=1, seed=2,
                              identity_score=False, combine="concat", noise=0.5, det_size=320)
    response = client.generate(request)
    assert response.seed == 2
    task = last_task(service)
    assert task.embedding.shape == (2, 512) and task.noise == 0.5
    with pytest.raises(ServiceError) as info:
        client.generate(face_images=[str(face_photo)], width=64, height=64, steps=1, noise=3)
    assert info.value.status == 422 and info.value.field == "noise"
