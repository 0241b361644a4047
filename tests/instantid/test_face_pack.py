"""The face-pack check: a pack InstantID cannot use is refused when it loads, with the reason, whatever its
source; a usable pack with another recogniser than antelopev2's loads with a warning."""

from __future__ import annotations

import logging
import shutil

import pytest

from face_packs import pack_with_68_keypoints, pack_with_256d_recognizer, pack_without_keypoints
from instantid.errors import WeightsError
from instantid.face import FaceModel, is_hub_id, pack_dir
from instantid.tiny_face import DETECTOR_FILE, RECOGNIZER_FILE


def test_detector_without_keypoints_is_refused(tiny_bundle, tmp_path):
    pack = pack_without_keypoints(tiny_bundle / "antelopev2", tmp_path / "nokps")
    from insightface.app import FaceAnalysis

    routed = FaceAnalysis(name=str(pack), allowed_modules=["detection", "recognition"],
                          providers=["CPUExecutionProvider"])
    assert routed.models["detection"].use_kps is False  # insightface itself loads it happily
    with pytest.raises(WeightsError, match=f"detector {DETECTOR_FILE} gives no facial keypoints \\(6 outputs"):
        FaceModel(str(pack))


def test_detector_with_other_than_five_keypoints_is_refused(tiny_bundle, tmp_path):
    pack = pack_with_68_keypoints(tiny_bundle / "antelopev2", tmp_path / "kps68")
    with pytest.raises(WeightsError, match=f"detector {DETECTOR_FILE} gives 68 keypoints per face; InstantID needs five"):
        FaceModel(str(pack))


def test_recognizer_with_other_than_512_d_embeddings_is_refused(tiny_bundle, tmp_path):
    pack = pack_with_256d_recognizer(tiny_bundle / "antelopev2", tmp_path / "small")
    with pytest.raises(WeightsError, match="recogniser w600k_small.onnx gives embeddings of shape \\['batch', 256\\]"):
        FaceModel(str(pack))


def test_pack_from_s3_is_checked_too(tiny_bundle, tmp_path, s3_bucket, monkeypatch):
    import boto3

    monkeypatch.setenv("INSTANTID_CACHE", str(tmp_path / "cache"))
    pack = pack_without_keypoints(tiny_bundle / "antelopev2", tmp_path / "nokps")
    for path in pack.iterdir():
        boto3.client("s3").upload_file(str(path), s3_bucket, f"packs/nokps/{path.name}")
    with pytest.raises(WeightsError, match="no facial keypoints"):
        FaceModel(f"s3://{s3_bucket}/packs/nokps")


def test_another_512_d_recognizer_loads_with_a_warning_about_antelopev2(tiny_bundle, tmp_path, caplog):
    pack = tmp_path / "other"
    pack.mkdir()
    shutil.copyfile(tiny_bundle / "antelopev2" / DETECTOR_FILE, pack / DETECTOR_FILE)
    shutil.copyfile(tiny_bundle / "antelopev2" / RECOGNIZER_FILE, pack / "w600k_r50.onnx")
    with caplog.at_level(logging.WARNING, logger="instantid.face"):
        FaceModel(str(pack))
    assert "trained on antelopev2 embeddings" in caplog.text and "w600k_r50.onnx" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="instantid.face"):
        FaceModel(str(tiny_bundle / "antelopev2"))
    assert caplog.text == ""


def test_hub_ids_are_told_apart_from_names_and_paths(tiny_bundle, tmp_path, monkeypatch):
    assert is_hub_id("DIAMONIK7777/antelopev2") and is_hub_id("org/pack.v2")
    assert not is_hub_id("antelopev2") and not is_hub_id("/abs/dir") and not is_hub_id("a/b/c")
    assert not is_hub_id("./rel") and not is_hub_id("s3://bucket/prefix")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org").mkdir()
    shutil.copytree(tiny_bundle / "antelopev2", tmp_path / "org" / "pack")
    assert not is_hub_id("org/pack")  # an existing relative directory wins
    assert pack_dir("org/pack") == (tmp_path / "org" / "pack").resolve()


def test_hub_id_not_in_the_offline_cache_is_a_weights_error(tmp_path, monkeypatch, no_network):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(WeightsError, match="cannot load 'someone/pack' from the Hugging Face hub \\(HF_HUB_OFFLINE"):
        FaceModel("someone/pack")


def test_a_missing_named_pack_says_how_to_get_it(tmp_path, monkeypatch, no_network):
    monkeypatch.setenv("INSIGHTFACE_HOME", str(tmp_path))
    with pytest.raises(WeightsError, match="not found: .* \\(get it with `instantid download`"):
        FaceModel()
