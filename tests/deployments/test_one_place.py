"""Facts that live in one place (issue 20): every user of a default, a pattern or a format reads it from there,
so changing it there changes it everywhere."""

from __future__ import annotations

import dataclasses
import inspect

import pytest

from instantid import defaults


def _field_defaults(cls) -> dict:
    return {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}


@pytest.mark.parametrize("name, value", [
    ("GUIDANCE_SCALE", 7.5), ("IP_ADAPTER_SCALE", 0.6), ("CONTROLNET_CONDITIONING_SCALE", 0.4),
    ("IMG2IMG_STRENGTH", 0.5), ("STEPS", 12),
])
def test_generation_defaults_come_from_instantid_defaults(monkeypatch, name, value):
    """The request schema and the CLI are built from instantid.defaults when they are built: a changed default
    reaches both (the library's own dataclasses are checked for equality below)."""
    import deployments.ingress.schemas as schemas
    from deployments.config import AppArgs
    from instantid.cli import build_parser

    monkeypatch.setattr(defaults, name, value)
    schemas._build.cache_clear()
    try:
        req = schemas.build_models(AppArgs()).GenerateRequest(face_images=["x"])
        field = {"GUIDANCE_SCALE": "guidance_scale", "IP_ADAPTER_SCALE": "ip_adapter_scale",
                 "CONTROLNET_CONDITIONING_SCALE": "controlnet_conditioning_scale",
                 "IMG2IMG_STRENGTH": "strength", "STEPS": "steps"}[name]
        assert getattr(req, field) == value
        parsed = build_parser().parse_args(["generate", "--output", "o.png"])
        assert getattr(parsed, field) == value
    finally:
        schemas._build.cache_clear()


def test_library_and_messages_share_the_defaults():
    from deployments.messages import GenerationTask
    from instantid.pipeline import GenerationRequest, InstantIDPipeline

    expected = {"guidance_scale": defaults.GUIDANCE_SCALE, "ip_adapter_scale": defaults.IP_ADAPTER_SCALE,
                "controlnet_conditioning_scale": defaults.CONTROLNET_CONDITIONING_SCALE,
                "strength": defaults.IMG2IMG_STRENGTH, "prompt_weighting": defaults.PROMPT_WEIGHTING}
    for cls in (GenerationRequest, GenerationTask):
        got = _field_defaults(cls)
        assert {k: got[k] for k in expected} == expected, cls.__name__
    call = inspect.signature(InstantIDPipeline.__call__).parameters
    assert call["num_inference_steps"].default == defaults.STEPS
    assert {k: call[k].default for k in expected if k in call} == {k: v for k, v in expected.items() if k in call}


def test_identity_id_pattern_is_the_stores():
    from deployments.ingress.identities import ID_PATTERN, new_identity_id, valid_identity_id
    from deployments.ingress.schemas import GenerateRequest

    schema = GenerateRequest.model_json_schema()["properties"]["identity_id"]
    patterns = [s.get("pattern") for s in schema.get("anyOf", [schema])]
    assert ID_PATTERN in patterns
    assert valid_identity_id(new_identity_id())


def test_accepted_formats_are_refused_the_same_way_by_the_library_and_the_service():
    """A GIF: the library's decode and the service's header check give the same message."""
    import io

    from PIL import Image

    from deployments.errors import ServiceError
    from deployments.ingress.inputs import check_image
    from instantid.errors import InvalidImageError
    from instantid.face import load_image

    out = io.BytesIO()
    Image.new("RGB", (8, 8)).save(out, format="GIF")
    with pytest.raises(InvalidImageError) as lib:
        load_image(out.getvalue(), "photo")
    with pytest.raises(ServiceError) as svc:
        check_image(out.getvalue(), "photo", 1 << 20)
    assert (svc.value.status, svc.value.code) == (400, "invalid_image")
    assert str(lib.value) == svc.value.message == "photo is a GIF image; only JPEG, PNG and WebP are accepted"


def test_model_not_loaded_is_written_and_read_in_one_place():
    """check_health's failure reaches the Ingress only as text in Serve's status message (inside a traceback);
    ModelNotLoaded both writes that text and finds it again, skipping the source line that raised it."""
    from deployments.ingress.backends import _reason
    from deployments.messages import ModelNotLoaded

    for model in ("model", "face model"):
        err = ModelNotLoaded(model, "WeightsError: weights not found: /x")
        message = ("The deployment failed to start 3 times in a row. Error:\n  File \"generator.py\", line 351\n"
                   f"    raise ModelNotLoaded({model!r}, f\"{{self.ready_error}}\")\n"
                   f"deployments.messages.ModelNotLoaded: {err}\n")
        assert ModelNotLoaded.reason_in(message) == f"{model} not loaded: WeightsError: weights not found: /x"
        assert _reason(message) == str(err)
    assert ModelNotLoaded.reason_in("Traceback (most recent call last):\n  File ...") is None
    assert ModelNotLoaded.reason_in("") is None


def test_backends_report_health_as_data(tmp_path):
    from deployments.face_analyzer.deployment import FaceAnalyzerDeployment
    from deployments.generator.deployment import Generator
    from deployments.messages import BackendHealth, ModelNotLoaded

    face = FaceAnalyzerDeployment.func_or_class.__new__(FaceAnalyzerDeployment.func_or_class)
    face.core, face.load_error = None, "WeightsError: no pack"
    assert face.ready() == BackendHealth(False, "WeightsError: no pack", details={"threads": None})
    with pytest.raises(ModelNotLoaded) as exc:
        face.check_health()
    assert (exc.value.model, exc.value.error) == ("face model", "WeightsError: no pack")
    gen = Generator.func_or_class.__new__(Generator.func_or_class)
    gen.ready_error, gen._running, gen._waiting = None, [], {"a", "b"}
    assert gen.ready() == BackendHealth(True, None, details={"waiting": 2})


def test_face_serialisation_is_the_librarys():
    """The service's FaceInfo is Face.to_dict mapped onto the photo (the analysis scale and crop offset), plus its
    source."""
    import numpy as np

    from deployments.face_analyzer.deployment import _face_info
    from instantid.face import Face

    face = Face(bbox=np.array([10, 20, 30, 60], np.float32), score=np.float32(0.75),
                kps=np.array([[10, 20], [30, 20], [20, 40], [12, 50], [28, 50]], np.float32),
                embedding=np.zeros(512, np.float32))
    # 640x400: resized to 1280x800 (scale 1/2 back), cropped to 1280x768 (16 rows off the top)
    info = _face_info(face, "face_images[0]", (640, 400))
    assert info == {"source": "face_images[0]", **face.to_dict((0.5, 0.5), (0.0, 8.0)), "image_size": [640, 400]}
    assert info["bbox"] == [5.0, 18.0, 15.0, 38.0] and info["kps"][0] == [5.0, 18.0] and info["score"] == 0.75


def test_the_seed_range_is_one_constant():
    """The API's bound, the service's draw and the CLI's draw all read instantid.defaults.MAX_SEED (the CLI drew
    below 2**31 while the API allowed up to 2**32 - 1)."""
    import inspect

    from deployments.ingress import schemas
    from instantid import cli, defaults

    assert schemas.MAX_SEED is defaults.MAX_SEED == 2**32 - 1
    bound = schemas.GenerateRequest.model_json_schema()["properties"]["seed"]["anyOf"][0]["maximum"]
    assert bound == defaults.MAX_SEED
    assert "random.randint(0, defaults.MAX_SEED)" in inspect.getsource(cli)
