"""The Generator's compile setting on the tiny profile, in-process (no Ray): off by default; on, the model is
optimised and every planned bucket warmed inside load (the replica's constructor, before it reports ready),
and a shape outside the plan runs eager, counted in the fallback metric."""

from __future__ import annotations

import numpy as np

from deployments import metrics
from deployments.config import AppArgs
from deployments.generator.deployment import GeneratorCore
from deployments.tiny_profile import resolve_args
from instantid.identity import Pose
from instantid.pipeline import GenerationRequest


def test_compile_is_off_by_default():
    assert AppArgs().compile.enabled is False


def test_compile_warms_every_bucket_at_load_and_counts_fallbacks(tiny_bundle, monkeypatch, tmp_path):
    counted = []
    monkeypatch.setattr(metrics, "compile_fallback", counted.append)
    args = resolve_args({"profile": "tiny", "tiny_dir": str(tiny_bundle),
                         "compile": {"enabled": True, "backend": "eager", "cache_dir": str(tmp_path / "inductor"),
                                     "batch_buckets": [2], "sizes": [[64, 64]]}})
    core = GeneratorCore(args)
    pipe = core.load(args.default_model).pipe
    state = pipe.serving
    assert state.broken is None and {key[0] for key in state.warmed} >= {"unet", "controlnet0", "vae_decoder"}
    assert state.eager_calls == {} and (tmp_path / "inductor").is_dir()
    kps = np.array([[20, 22], [44, 22], [32, 34], [23, 46], [41, 46]], dtype=float)
    request = GenerationRequest(face_embedding=np.ones(512, np.float32), keypoint_image=Pose(kps, (64, 64)).draw())
    pipe.generate([request], width=64, height=64, steps=2, scheduler="euler", output_type="latent")
    assert state.eager_calls == {} and counted == []  # planned: compiled
    pipe.generate([request], width=64, height=96, steps=2, scheduler="euler", output_type="latent")
    assert state.eager_calls["unplanned"] > 0 and counted and set(counted) == {"unplanned"}
