"""A FaceAnalyzer replica loads the depth/pose preprocessors its config offers when it starts, not on the first
request with controls: one that cannot load them is not ready, and says which (issue 28, item 3)."""

from __future__ import annotations

import pytest

from deployments.face_analyzer.deployment import FaceAnalyzerDeployment
from deployments.messages import ModelNotLoaded


def replica(tiny_bundle, tmp_path, controlnets: dict, pose: str | None = None):
    args = {"profile": "real", "face_model": str(tiny_bundle / "antelopev2"), "instantid": str(tiny_bundle / "instantid"),
            "models": [{"name": "sdxl", "base_model": str(tiny_bundle / "sdxl"), "controlnets": controlnets}],
            "preprocessors": {"depth": str(tiny_bundle / "dpt"), "pose": pose or str(tiny_bundle / "dwpose")},
            "identity_store": str(tmp_path / "identities")}
    return FaceAnalyzerDeployment.func_or_class(args)


def test_offered_preprocessors_load_at_start(tiny_bundle, tmp_path):
    face = replica(tiny_bundle, tmp_path, {"depth": str(tiny_bundle / "controlnet-depth"),
                                           "pose": str(tiny_bundle / "controlnet-pose")})
    assert face.ready().ready, face.ready()
    assert set(face._maps.preprocessors._loaded) == {"depth", "pose"}, "loaded before any request"
    face.check_health()


def test_a_preprocessor_that_cannot_load_makes_the_replica_not_ready_and_names_it(tiny_bundle, tmp_path):
    face = replica(tiny_bundle, tmp_path, {"pose": str(tiny_bundle / "controlnet-pose")},
                   pose=str(tmp_path / "no-dwpose"))
    health = face.ready()
    assert not health.ready and "pose preprocessor" in health.error and "no-dwpose" in health.error
    with pytest.raises(ModelNotLoaded, match="pose preprocessor"):
        face.check_health()


def test_a_replica_built_outside_ray_starts_no_ray_cluster(tiny_bundle, tmp_path):
    """Outside Ray a replica's threads are onnxruntime's default; asking Ray for its CPU share would start a local
    cluster in the calling process (and every later ray.init of the suite would fail)."""
    import ray

    replica(tiny_bundle, tmp_path, {})
    assert not ray.is_initialized()


def test_control_types_without_a_model_load_nothing(tiny_bundle, tmp_path):
    face = replica(tiny_bundle, tmp_path, {"canny": str(tiny_bundle / "controlnet-canny")}, pose=str(tmp_path / "x"))
    assert face.ready().ready
    assert face._maps is None or not face._maps.preprocessors._loaded
