"""``people`` over HTTP without a Ray cluster (fake FaceAnalyzer and Generator): the job the Generator gets, the
response, and every bad input as a 422 naming its field; the Generator's side (job decoding, requests built)
and the FaceAnalyzer's group analysis on the tiny bundle."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from serve_helpers import assert_error
from fakes import CANVAS, GROUP, GroupFace, RecordingGenerator, face, photo

from deployments.config import Limits
from deployments.generator.deployment import GeneratorCore, LoadedModel, accept_task
from deployments.messages import GenerationTask, PersonPlacement
from deployments.ingress.schemas import default_size
from instantid.people import REGION_MARGIN, grown_region



def people_request(*people, **fields):
    return {"people": list(people), "pose_image": photo(), "steps": 2, "identity_score": False, **fields}


def post(tmp_path, body, gen=None, face=None):
    from deployments.config import AppArgs
    from deployments.ingress.http.app import build_http_app
    from deployments.ingress.service import GenerationService
    from fastapi.testclient import TestClient

    args = AppArgs.model_validate({"identity_store": str(tmp_path / "ids")})
    core = GenerationService(args, face or GroupFace(), gen or RecordingGenerator(),
                       status_fn=lambda: {"FaceAnalyzer": "HEALTHY", "Generator": "HEALTHY"})
    return TestClient(build_http_app(core), raise_server_exceptions=False).post("/v1/generate", json=body)


def test_two_people_from_a_group_photo_reach_the_generator(tmp_path):
    gen = RecordingGenerator()
    resp = post(tmp_path, people_request({"face_images": [photo(10)], "face_index": 2},
                                         {"face_images": [photo(200)], "face_index": 0},
                                         return_pose_image=True), gen)
    assert resp.status_code == 200, resp.text
    job = gen.jobs[-1]
    assert (job.width, job.height) == default_size(tuple(CANVAS), Limits())  # the group canvas's
    assert job.embedding is None and job.enhance_face_region is False and len(job.people) == 2
    right, left = face(*GROUP[0]), face(*GROUP[1])  # face_index 2 = the rightmost, 0 = the leftmost
    scale = max(job.width / CANVAS[0], job.height / CANVAS[1])  # cover-fit onto the output canvas
    for person, (box, _) in zip(job.people, (right, left)):
        centre = (person.region[0] + person.region[2]) / 2
        assert centre == pytest.approx((box[0] + box[2]) / 2 * scale, abs=6)
    assert job.people[0].embedding[0] != job.people[1].embedding[0]
    body = resp.json()
    assert "face" not in body and [p["region"] for p in body["people"]] == [list(p.region) for p in job.people]
    assert body["people"][0]["face"]["bbox"] == right[0].tolist()
    assert body["timings"]["identities"] == 2 and "pose_image" in body


def test_boxes_and_keypoints_need_a_canvas_and_stay_on_it(tmp_path):
    gen = RecordingGenerator()
    kps = [[700, 200], [730, 200], [715, 215], [703, 230], [727, 230]]
    resp = post(tmp_path, {"people": [{"face_images": [photo(10)], "box": [100, 100, 300, 340]},
                                      {"face_images": [photo(20)], "keypoints": kps}],
                           "width": 1024, "height": 512, "steps": 2, "identity_score": False}, gen)
    assert resp.status_code == 200, resp.text
    first, second = gen.jobs[-1].people
    assert first.region == grown_region([100, 100, 300, 340], 1024, 512)
    np.testing.assert_allclose(second.kps, kps)
    assert REGION_MARGIN == 0.25


@pytest.mark.parametrize("body, field", [
    # a face index the photo lacks
    (people_request({"face_images": ["A"], "face_index": 0}, {"face_images": ["B"], "face_index": 3}),
     "people[1].face_index"),
    # more than four people
    (people_request(*[{"face_images": ["A"], "face_index": 0}] * 5), "people"),
    # a box off the canvas
    ({"people": [{"face_images": ["A"], "box": [900, 10, 1100, 200]}], "width": 1024, "height": 512},
     "people[0].box"),
    # overlapping regions (boxes 40 px apart grow 50 px each way)
    ({"people": [{"face_images": ["A"], "box": [100, 100, 300, 300]},
                 {"face_images": ["B"], "box": [340, 100, 540, 300]}], "width": 1024, "height": 512}, "people"),
    # both the top-level identity and people
    ({**people_request({"face_images": ["A"], "face_index": 0}), "face_images": ["A"]}, "people"),
    (people_request({"face_images": ["A"], "face_index": 0}, min_similarity=0.3), "min_similarity"),
    # a person with two identities, or two placements
    (people_request({"face_images": ["A"], "identity_id": "id_" + "0" * 32, "face_index": 0}), "people[0]"),
    (people_request({"face_images": ["A"], "face_index": 0, "box": [1, 2, 3, 4]}), "people[0]"),
    # no canvas for boxes
    ({"people": [{"face_images": ["A"], "box": [10, 10, 100, 100]}]}, "width"),
    # a face index without a pose photo
    ({"people": [{"face_images": ["A"], "face_index": 0}], "width": 512, "height": 512}, "people[0].face_index"),
    # a stored identity that does not exist
    (people_request({"identity_id": "id_" + "0" * 32, "face_index": 0}), "people[0].identity_id"),
    # a photo that is not an image
    (people_request({"face_images": ["bm90IGFuIGltYWdl"], "face_index": 0}), "people[0].face_images[0]"),
])
def test_bad_people_are_422_or_404_naming_the_field(tmp_path, body, field):
    body = {k: v for k, v in body.items()}
    for person in body.get("people", []):
        if person.get("face_images") in (["A"], ["B"]):
            person["face_images"] = [photo(10 if person["face_images"] == ["A"] else 20)]
    if body.get("face_images") == ["A"]:
        body["face_images"] = [photo(10)]
    resp = post(tmp_path, body)
    status = 404 if field.endswith("identity_id") else 400 if "face_images" in field else 422  # as for one face
    assert_error(resp, status, resp.json()["error"]["code"], field)
    assert "Traceback" not in resp.text


def test_overlapping_group_faces_are_refused(tmp_path):
    resp = post(tmp_path, people_request({"face_images": [photo(10)], "face_index": 0},
                                         {"face_images": [photo(20)], "face_index": 1}),
                face=GroupFace(group=[(100, 200), (170, 200)]))
    assert_error(resp, 422, "invalid_parameter", "people")
    assert "overlap" in resp.json()["error"]["message"]


# -- the Generator's side --------------------------------------------------------------------------------------
def _people():
    box_a, kps_a = face(20, 30, side=16)
    box_b, kps_b = face(60, 30, side=16)
    return [PersonPlacement(np.full(512, 3.0, np.float32), kps_a, grown_region(box_a, 96, 64)),
            PersonPlacement(np.full(512, -2.0, np.float32), kps_b, grown_region(box_b, 96, 64))]


def _job(**fields):
    return GenerationTask(**{"model": "tiny", "embedding": None, "kps": None, "canvas": None, "width": 96,
                             "height": 64, "steps": 2, "seed": 1, "people": _people(), **fields})


def test_generator_builds_people_requests_and_batches_them_with_single_ones(tiny_bundle, monkeypatch):
    from deployments.config import AppArgs
    from instantid.loading import load_pipeline
    from instantid.pipeline import InstantIDPipeline

    job = accept_task(_job(return_pose_image=True))
    assert job.people and job.embedding is None and job.canvas == (96, 64)
    single = accept_task(GenerationTask(model="tiny", embedding=np.ones(512, np.float32),
                                        kps=face(40, 30, side=16)[1], canvas=(96, 64), width=96, height=64,
                                        steps=2, seed=2))
    assert job.batch_key() == single.batch_key()  # the pipeline batches them together
    with pytest.raises(Exception, match="people"):
        accept_task(_job(people=_people() * 3))

    seen = []
    real = InstantIDPipeline.generate
    monkeypatch.setattr(InstantIDPipeline, "generate",
                        lambda self, requests, **kw: seen.append(requests) or real(self, requests, **kw))
    pipe = load_pipeline(str(tiny_bundle / "sdxl"), str(tiny_bundle / "instantid"), device="cpu")
    pipe.set_progress_bar_config(disable=True)
    core = GeneratorCore(AppArgs.model_validate({}))
    out = core.predict(LoadedModel("tiny", pipe, 0.0), [job, single])
    people = seen[0][0].people
    assert [p.region for p in people] == [p.region for p in _people()]
    assert seen[0][1].people == [] and seen[0][1].face_embedding is not None
    assert len(out) == 2 and out[0].images[0].shape == (64, 96, 3)
    pose = out[0].pose_image  # both people's keypoints
    for p in people:
        x1, y1, x2, y2 = p.region
        assert pose[y1:y2, x1:x2].max() > 0


def test_face_analyzer_reports_every_group_face_left_to_right(tiny_bundle, face_photo):
    from deployments.face_analyzer.deployment import FaceAnalysisCore

    core = FaceAnalysisCore(str(tiny_bundle / "antelopev2"), threads=1)
    data = open(face_photo, "rb").read()
    result = core.predict([], ("pose_image", data), group=True)
    faces = result.group
    assert len(faces) == 2  # the tiny detector's small (top-left) and main faces
    assert faces[0]["bbox"][0] < faces[1]["bbox"][0]
    assert faces[0]["info"]["image_size"] == list(Image.open(io.BytesIO(data)).size)
    assert result.pose_face == max(faces, key=lambda f: (f["bbox"][2] - f["bbox"][0]) * (f["bbox"][3] - f["bbox"][1]))["info"]


def test_openapi_publishes_people_for_json_bodies_only(tmp_path):
    from deployments.config import AppArgs
    from deployments.ingress.http.app import build_http_app
    from deployments.ingress.service import GenerationService
    from fastapi.testclient import TestClient

    core = GenerationService(AppArgs.model_validate({"identity_store": str(tmp_path / "ids")}), GroupFace(),
                             RecordingGenerator(), status_fn=lambda: {})
    schema = TestClient(build_http_app(core)).get("/openapi.json").json()
    components = schema["components"]["schemas"]
    assert "people" in components["GenerateRequest"]["properties"] and "Person" in components
    body = schema["paths"]["/v1/generate"]["post"]["requestBody"]["content"]
    form = body["multipart/form-data"]["schema"]["properties"]
    assert "people" not in form and "controls" not in form and "face_images" in form
    assert "#/$defs/" not in str(schema)  # every reference resolves inside the document
