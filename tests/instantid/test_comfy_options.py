"""ComfyUI_InstantID's controls in the library (issue 27): how several photos combine, noise in the unconditional
identity embedding, the detector's size and its retry at smaller sizes, and the choice of the face by index.

Known answers: combinations computed by hand or with numpy; the concatenated ID tokens rebuilt from the Resampler
one photo at a time; the noise rebuilt from a generator seeded as documented; the detector compared with
insightface's own ``FaceAnalysis.get`` at that size. The defaults are pinned by tests/instantid/test_golden.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from instantid.errors import InvalidParameterError, NoFaceError
from instantid.face import FaceModel, load_image, resize_for_analysis
from instantid.identity import Detection, Pose, build_identity, build_pose, combine_embeddings
from instantid.loading import load_pipeline
from instantid.pipeline import GenerationRequest

SIZE = 64
KPS = np.array([[20, 22], [44, 22], [32, 34], [23, 46], [41, 46]], dtype=float)


def embedding(seed=0):
    return np.random.RandomState(seed).randn(512).astype(np.float32) * 10


# --- combining several photos ----------------------------------------------------------------------------------


def test_combine_modes_known_answers():
    e1 = np.zeros(512, np.float32)
    e1[:2] = [3, 4]  # length 5
    e2 = np.zeros(512, np.float32)
    e2[2] = 10  # length 10
    np.testing.assert_array_equal(combine_embeddings([e1, e2], "average")[:3], [1.5, 2.0, 5.0])
    # unit vectors (0.6, 0.8, 0) and (0, 0, 1): mean (0.3, 0.4, 0.5), at the mean length 7.5
    np.testing.assert_allclose(combine_embeddings([e1, e2], "norm_average")[:3], [2.25, 3.0, 3.75], rtol=1e-6)
    assert not combine_embeddings([e1, e2], "norm_average")[3:].any()
    stacked = combine_embeddings([e1, e2], "concat")
    assert stacked.shape == (2, 512) and stacked.dtype == np.float32
    np.testing.assert_array_equal(stacked, np.stack([e1, e2]))

    rng = np.random.default_rng(5)
    many = [rng.standard_normal(512).astype(np.float32) * s for s in (5, 20, 40)]
    units = [m.astype(np.float64) / np.linalg.norm(m.astype(np.float64)) for m in many]
    expected = np.mean(units, axis=0) * np.mean([np.linalg.norm(m.astype(np.float64)) for m in many])
    np.testing.assert_allclose(combine_embeddings(many, "norm_average"), expected, rtol=1e-5)
    np.testing.assert_array_equal(combine_embeddings(many, "average"),
                                  np.mean(np.stack(many), axis=0).astype(np.float32))
    with pytest.raises(InvalidParameterError, match="combine"):
        combine_embeddings(many, "median")


@pytest.fixture(scope="module")
def analyzer(tiny_bundle) -> FaceModel:
    return FaceModel(str(tiny_bundle / "antelopev2"))


@pytest.fixture(scope="module")
def photos(face_photo):
    from PIL import ImageOps

    photo = load_image(face_photo)
    return [("a", photo), ("b", ImageOps.mirror(photo))]


def test_build_identity_combines_as_asked_and_defaults_to_the_mean(analyzer, photos):
    default = build_identity(analyzer, photos)
    faces = [f.embedding for f in default.faces]
    np.testing.assert_array_equal(default.embedding, np.mean(np.stack(faces), axis=0).astype(np.float32))
    np.testing.assert_array_equal(build_identity(analyzer, photos, combine="concat").embedding, np.stack(faces))
    np.testing.assert_allclose(build_identity(analyzer, photos, combine="norm_average").embedding,
                               combine_embeddings(faces, "norm_average"))
    with pytest.raises(InvalidParameterError, match="combine"):
        build_identity(analyzer, photos, combine="sum")


# --- the pipeline: concatenated tokens and noise ---------------------------------------------------------------


@pytest.fixture(scope="module")
def pipe(tiny_bundle):
    p = load_pipeline(str(tiny_bundle / "sdxl"), str(tiny_bundle / "instantid"), device="cpu")
    p.set_progress_bar_config(disable=True)
    return p


def request(**overrides):
    fields = dict(face_embedding=embedding(), keypoint_image=Pose(KPS, (SIZE, SIZE)).draw(), prompt="a person",
                  seed=7)
    fields.update(overrides)
    return GenerationRequest(**fields)


def spy(pipe, *requests, steps=1):
    """Run; return (latents, the Resampler's inputs, the UNet's first (sample, context), IdentityNet's context)."""
    resampler_in, unet_in, control_in = [], [], []
    hooks = [
        pipe.image_proj_model.register_forward_hook(lambda m, args, out: resampler_in.append(args[0].clone())),
        pipe.unet.register_forward_hook(
            lambda m, args, kwargs, out: unet_in.append((args[0].clone(), kwargs["encoder_hidden_states"].clone())),
            with_kwargs=True),
        pipe.controlnet.register_forward_hook(
            lambda m, args, kwargs, out: control_in.append(kwargs["encoder_hidden_states"].clone()), with_kwargs=True),
    ]
    try:
        latents = pipe.generate(list(requests), width=SIZE, height=SIZE, steps=steps, output_type="latent")
    finally:
        for h in hooks:
            h.remove()
    return latents, resampler_in, unet_in, control_in


def test_concat_gives_16_tokens_per_photo_each_from_the_resampler_alone(pipe):
    rows = np.stack([embedding(0), embedding(1), embedding(2)])
    _, _, unet_in, control_in = spy(pipe, request(face_embedding=rows))
    _, _, plain_in, _ = spy(pipe, request())
    text = plain_in[0][1].shape[1] - 16
    context = unet_in[0][1]
    assert context.shape[1] == text + 16 * 3
    with torch.no_grad():
        expected = torch.cat([pipe.image_proj_model(torch.from_numpy(r).reshape(1, 1, 512)) for r in rows], dim=1)
        uncond = torch.cat([pipe.image_proj_model(torch.zeros(1, 1, 512))] * 3, dim=1)
    # rows: [uncond, cond] (CFG); the ID tokens follow the text tokens
    torch.testing.assert_close(context[1, text:], expected[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(context[0, text:], uncond[0], rtol=1e-5, atol=1e-5)
    assert control_in[0].shape[1] == 48  # IdentityNet sees all the ID tokens


def test_concat_of_one_photo_is_the_plain_request_and_a_batch_shares_its_token_count(pipe):
    one = pipe.generate([request(face_embedding=embedding()[None])], width=SIZE, height=SIZE, steps=2,
                        output_type="latent")[0]
    plain = pipe.generate([request()], width=SIZE, height=SIZE, steps=2, output_type="latent")[0]
    assert torch.equal(one, plain)
    with pytest.raises(InvalidParameterError, match="face_embedding"):
        pipe.generate([request(), request(face_embedding=np.stack([embedding(0), embedding(1)]))],
                      width=SIZE, height=SIZE, steps=1)
    with pytest.raises(InvalidParameterError, match="face_embedding"):
        pipe.generate([request(face_embedding=np.zeros((2, 256), np.float32))], width=SIZE, height=SIZE, steps=1)


def test_concat_tokens_reach_an_attention_layer_whole(pipe):
    """The decoupled attention splits text from ID tokens: with 48 ID tokens, all 48 must be attended as ID
    tokens (a split at 16 would feed 32 of them to the text branch). Changing the third photo changes the image;
    swapping it for the first photo's embedding gives the [e0, e1, e0] result, not the [e0, e1, e2] one."""
    a = pipe.generate([request(face_embedding=np.stack([embedding(0), embedding(1), embedding(2)]))], width=SIZE,
                      height=SIZE, steps=2, output_type="latent")[0]
    b = pipe.generate([request(face_embedding=np.stack([embedding(0), embedding(1), embedding(3)]))], width=SIZE,
                      height=SIZE, steps=2, output_type="latent")[0]
    assert not torch.equal(a, b)
    proc = next(p for p in pipe.unet.attn_processors.values() if hasattr(p, "identity_tokens"))
    assert proc.identity_tokens is None  # reset after the call


@pytest.mark.parametrize("noise, seed", [(0.35, 7), (1.0, 123)])
def test_noise_is_uniform_in_the_unconditional_embedding_from_a_seeded_generator(pipe, noise, seed):
    _, resampler_in, unet_in, _ = spy(pipe, request(noise=noise, seed=seed))
    _, plain_resampler_in, plain_unet_in, _ = spy(pipe, request(seed=seed))
    batch = resampler_in[0]  # [uncond, cond]
    expected = noise * torch.rand((1, 1, 512), generator=torch.Generator("cpu").manual_seed(seed))
    torch.testing.assert_close(batch[0:1], expected, rtol=0, atol=0)
    assert 0 <= float(batch[0].min()) and float(batch[0].max()) < noise
    assert abs(float(batch[0].mean()) - noise / 2) < 0.05 * noise  # uniform on [0, noise), as ComfyUI
    torch.testing.assert_close(batch[1:], plain_resampler_in[0][1:], rtol=0, atol=0)  # the identity untouched
    assert not plain_resampler_in[0][0].any()  # no noise: the demo's all-zero embedding
    assert torch.equal(unet_in[0][0], plain_unet_in[0][0])  # the latents' generator is left alone

    with torch.no_grad():  # the unconditional ID tokens are the Resampler's of that noise
        tokens = pipe.image_proj_model(expected)
    text = unet_in[0][1].shape[1] - 16
    torch.testing.assert_close(unet_in[0][1][0, text:], tokens[0], rtol=1e-5, atol=1e-5)

    # reproducible: the same seed, the same result; a given generator seeds the noise with its initial seed
    again, *_ = spy(pipe, request(noise=noise, seed=seed))
    first, *_ = spy(pipe, request(noise=noise, seed=seed))
    assert torch.equal(again[0], first[0])
    _, from_generator, _, _ = spy(pipe, request(noise=noise, seed=None,
                                                generator=torch.Generator("cpu").manual_seed(seed)))
    torch.testing.assert_close(from_generator[0][0:1], expected, rtol=0, atol=0)


def test_noise_with_concat_draws_one_row_per_photo_and_bad_noise_is_refused(pipe):
    rows = np.stack([embedding(0), embedding(1)])
    _, resampler_in, _, _ = spy(pipe, request(face_embedding=rows, noise=0.5, seed=3))
    expected = 0.5 * torch.rand((2, 1, 512), generator=torch.Generator("cpu").manual_seed(3))
    torch.testing.assert_close(resampler_in[0][:2], expected, rtol=0, atol=0)
    for bad in (-0.1, 1.5):
        with pytest.raises(InvalidParameterError, match="noise"):
            pipe.generate([request(noise=bad)], width=SIZE, height=SIZE, steps=1)


# --- detection: size, retry, face index ------------------------------------------------------------------------


def test_det_size_is_insightfaces_own_detection_at_that_size(analyzer, face_photo):
    canvas = resize_for_analysis(load_image(face_photo))
    bgr = np.ascontiguousarray(np.asarray(canvas)[:, :, ::-1])
    default = analyzer.analyze(canvas)
    app = analyzer.app
    try:
        app.det_model.input_size = (320, 320)  # ComfyUI's way: resize the shared detector
        stock = sorted(app.get(bgr), key=lambda f: (f.bbox[2] - f.bbox[0]) * (f.bbox[3] - f.bbox[1]), reverse=True)
    finally:
        app.det_model.input_size = (640, 640)
    ours = analyzer.analyze(canvas, det_size=320)
    assert len(ours) == len(stock) > 0
    for f, s in zip(ours, stock):
        np.testing.assert_allclose(f.bbox, s.bbox[:4], rtol=1e-6)
        np.testing.assert_allclose(f.kps, s.kps, rtol=1e-6)
        np.testing.assert_allclose(f.embedding, s.embedding, rtol=1e-6)
    # the shared model is left as it was
    assert [f.bbox.tolist() for f in analyzer.analyze(canvas)] == [f.bbox.tolist() for f in default]
    for bad in (100, 650, 2048, True, "640"):
        with pytest.raises(InvalidParameterError, match="det_size"):
            analyzer.analyze(canvas, det_size=bad)


def test_retry_goes_down_64_at_a_time_until_a_face_is_found(analyzer, face_photo, monkeypatch):
    canvas = resize_for_analysis(load_image(face_photo))
    real = analyzer.app.det_model.detect
    asked = []

    def detect(img, input_size=None, **kwargs):
        size = input_size or analyzer.app.det_model.input_size
        asked.append(size[0])
        found = real(img, input_size=size, **kwargs)
        return found if size[0] <= 384 else (found[0][:0], None if found[1] is None else found[1][:0])

    monkeypatch.setattr(analyzer.app.det_model, "detect", detect)
    assert analyzer.analyze(canvas) == [] and asked == [640]  # the default: no retry
    asked.clear()
    faces = analyzer.analyze(canvas, retry=True)
    assert asked == [640, 576, 512, 448, 384] and faces
    asked.clear()
    assert analyzer.analyze(canvas, det_size=256, retry=True) and asked == [256]
    asked.clear()
    monkeypatch.setattr(analyzer.app.det_model, "detect",
                        lambda img, input_size=None, **kw: (asked.append((input_size or (640,))[0]),
                                                            real(img, input_size=input_size, **kw)[0][:0], None)[1:])
    assert analyzer.analyze(canvas, retry=True) == []
    assert asked == list(range(640, 191, -64))  # ComfyUI_InstantID's sizes: 640 down to 192
    with pytest.raises(NoFaceError):
        build_identity(analyzer, [("a", load_image(face_photo))], detection=Detection(retry=True))


def test_face_index_picks_left_to_right_for_the_identity_and_the_pose(analyzer, face_photo):
    photo = load_image(face_photo)
    faces = analyzer.analyze(resize_for_analysis(photo))
    assert len(faces) == 2  # the tiny detector's main face and its small one
    by_x = sorted(faces, key=lambda f: float(f.bbox[0] + f.bbox[2]) / 2)
    for index in (0, 1):
        identity = build_identity(analyzer, [("a", photo)], detection=Detection(face_index=index))
        np.testing.assert_array_equal(identity.embedding, by_x[index].embedding)
        np.testing.assert_array_equal(identity.pose.kps, by_x[index].kps)
        pose = build_pose(analyzer, "a", photo, Detection(face_index=index))
        np.testing.assert_array_equal(pose.bbox, by_x[index].bbox)
    np.testing.assert_array_equal(build_identity(analyzer, [("a", photo)]).embedding, faces[0].embedding)  # largest
    with pytest.raises(InvalidParameterError, match="face_index") as info:
        build_identity(analyzer, [("a", photo)], detection=Detection(face_index=2))
    assert "has 2 face" in str(info.value)
    with pytest.raises(InvalidParameterError, match="face_index"):
        Detection(face_index=-1)
