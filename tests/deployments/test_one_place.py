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
    import deployments.schemas as schemas
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
    from deployments.identities import ID_PATTERN, new_identity_id, valid_identity_id
    from deployments.schemas import GenerateRequest

    schema = GenerateRequest.model_json_schema()["properties"]["identity_id"]
    patterns = [s.get("pattern") for s in schema.get("anyOf", [schema])]
    assert ID_PATTERN in patterns
    assert valid_identity_id(new_identity_id())


def test_accepted_formats_are_refused_the_same_way_by_the_library_and_the_service():
    """A GIF: the library's decode and the service's header check give the same message."""
    import io

    from PIL import Image

    from deployments.errors import ServiceError
    from deployments.http.readers import check_image
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
