"""Known answers for the demo features, each computed here independently of the code under test (issue 30):
a weighted token's embedding from the LPW formula, the decoupled attention with face regions and several people
by hand-written softmax, the region mask at every UNet resolution, img2img's timesteps and noised start from the
scheduler's arithmetic (betas -> sigmas), the guidance windows step by step, seed 0's noise, and coordinates
mapped between canvases of different aspect ratios.

The rest of the pipeline tests mostly compare the pipeline with itself (batched == alone, A != B); a formula that
is wrong but used consistently passes those and fails these."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import Attention
from PIL import Image

from instantid.attention import IdentityAttnProcessor, region_at
from instantid.face import Face, analysis_size
from instantid.identity import Pose
from instantid.keypoints import fit_canvas
from instantid.loading import load_pipeline
from instantid.people import Placement, grown_region, place_people
from instantid.pipeline import GenerationRequest
from instantid.prompt_weighting import encode_weighted_prompt

SIZE = 64
KPS = np.array([[20, 22], [44, 22], [32, 34], [23, 46], [41, 46]], dtype=float)


@pytest.fixture(scope="module")
def pipe(tiny_bundle):
    p = load_pipeline(str(tiny_bundle / "sdxl"), str(tiny_bundle / "instantid"), device="cpu")
    p.set_progress_bar_config(disable=True)
    return p


def request(**overrides):
    fields = dict(face_embedding=np.random.RandomState(0).randn(512).astype(np.float32) * 10,
                  keypoint_image=Pose(KPS, (SIZE, SIZE)).draw(), prompt="a person", seed=7)
    fields.update(overrides)
    return GenerationRequest(**fields)


class UNetSpy:
    """Records what the UNet is called with (timestep, latent input, IdentityNet's mid residual), unchanged."""

    def __init__(self, unet):
        self.calls = []
        self.handle = unet.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        sample, t = args[0], args[1]
        self.calls.append({"t": float(t), "sample": sample.clone(),
                           "mid": kwargs["mid_block_additional_residual"].clone()})

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


# -- weighted prompts ---------------------------------------------------------------------------------------
def _hidden(pipe, ids):
    tokens = torch.tensor([ids])
    one = pipe.text_encoder(tokens, output_hidden_states=True).hidden_states[-2]
    two = pipe.text_encoder_2(tokens, output_hidden_states=True)
    return torch.cat([one, two.hidden_states[-2]], -1)[0], two[0]


@torch.no_grad()
def test_a_weighted_tokens_embedding_is_the_lpw_formula(pipe):
    """lpw_stable_diffusion_xl: e_j <- e_last + (e_j - e_last) * w_j (w as float16) for w_j != 1, where e_last is
    the chunk's end token; the pieces are tokenised separately; the negative prompt is padded with the end token."""
    tok = pipe.tokenizer
    bos, eos = tok.bos_token_id, tok.eos_token_id
    a = tok("a ", truncation=False).input_ids[1:-1]
    person = tok("person", truncation=False).input_ids[1:-1]
    face = tok(" face", truncation=False).input_ids[1:-1]
    ids = [bos, *a, *person, *face, eos]
    weights = [1.0] * (1 + len(a)) + [1.3] * len(person) + [1 / 1.1] * len(face) + [1.0]
    plain, pooled = _hidden(pipe, ids)
    want = plain.clone()
    for j, w in enumerate(weights):
        w16 = float(np.float16(w))
        if w16 != 1.0:
            want[j] = plain[-1] + (plain[j] - plain[-1]) * w16
    neg_ids = [bos, *([eos] * (len(ids) - 2)), eos]  # "" padded to the prompt's length
    neg_want, neg_pooled = _hidden(pipe, neg_ids)

    pe, ne, pp, npool = encode_weighted_prompt(pipe, "a (person:1.3)[ face]", None, "cpu")
    torch.testing.assert_close(pe[0], want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ne[0], neg_want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pp[0], pooled[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(npool[0], neg_pooled[0], rtol=1e-5, atol=1e-6)
    # the weighted positions really moved (the test would pass with weights ignored otherwise)
    moved = (pe[0] - plain).abs().amax(-1) > 1e-6
    assert moved.tolist() == [w != 1.0 for w in weights]


@torch.no_grad()
def test_a_long_weighted_prompt_is_encoded_per_75_token_chunk(pipe):
    """Past 75 tokens: chunks of 75 between start/end tokens, each encoded alone, concatenated; the pooled
    embedding is the LAST chunk's."""
    tok = pipe.tokenizer
    bos, eos = tok.bos_token_id, tok.eos_token_id
    text = "x" * 80  # the tiny vocabulary is per character: 80 tokens
    body = tok(text, truncation=False).input_ids[1:-1]
    assert len(body) == 80
    first, _ = _hidden(pipe, [bos, *body[:75], eos])
    second, pooled = _hidden(pipe, [bos, *body[75:], eos])
    pe, _, pp, _ = encode_weighted_prompt(pipe, text, "", "cpu")
    torch.testing.assert_close(pe[0], torch.cat([first, second]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pp[0], pooled[0], rtol=1e-5, atol=1e-6)


# -- the region mask at every UNet resolution ---------------------------------------------------------------
def _nearest(mask: np.ndarray, h: int, w: int) -> np.ndarray:
    """Nearest resize as torch (and the reference's F.interpolate) does it: source index floor(i * in / out)."""
    rows = np.minimum((np.arange(h) * (mask.shape[0] / h)).astype(int), mask.shape[0] - 1)
    cols = np.minimum((np.arange(w) * (mask.shape[1] / w)).astype(int), mask.shape[1] - 1)
    return mask[rows][:, cols]


@pytest.mark.parametrize("latent, levels", [((8, 8), [(8, 8), (4, 4), (2, 2)]),
                                            ((13, 9), [(13, 9), (7, 5), (4, 3)]),
                                            ((7, 12), [(7, 12), (4, 6), (2, 3)])])
def test_region_at_each_unet_resolution(latent, levels):
    """A latent of (H, W) is halved rounding up by each stride-2 downsampler: the mask is resized (nearest) to each
    of those grids (the reference's sqrt-ratio factor was one row short on odd sides)."""
    rng = np.random.default_rng(1)
    mask = (rng.random(latent) > 0.5).astype(np.float32)
    for h, w in levels:
        got = region_at(torch.from_numpy(mask)[None], h * w)
        assert got.shape == (1, h * w, 1)
        np.testing.assert_array_equal(got[0, :, 0].numpy().reshape(h, w), _nearest(mask, h, w))
    with pytest.raises(ValueError):
        region_at(torch.from_numpy(mask)[None], 5)


def _softmax_attend(q, k, v, heads):
    """Multi-head attention written out: softmax(q k^T / sqrt(d)) v per head."""
    b, n, c = q.shape
    d = c // heads
    qh, kh, vh = (x.reshape(b, -1, heads, d).permute(0, 2, 1, 3).double() for x in (q, k, v))
    scores = qh @ kh.transpose(-1, -2) / math.sqrt(d)
    probs = torch.exp(scores - scores.amax(-1, keepdim=True))
    probs = probs / probs.sum(-1, keepdim=True)
    return (probs @ vh).permute(0, 2, 1, 3).reshape(b, n, c)


@torch.no_grad()
@pytest.mark.parametrize("people", [1, 2, 3])
def test_decoupled_attention_with_regions_is_the_formula(people):
    """out = to_out(attn(q, K_text, V_text) + scale * sum_i region_i * attn(q, K_ip(id_i), V_ip(id_i))): each
    identity's tokens act only inside its region, with a softmax over its own tokens alone."""
    torch.manual_seed(0)
    dim, heads, tokens, grid = 16, 2, 4, (4, 6)
    attn = Attention(query_dim=dim, cross_attention_dim=dim, heads=heads, dim_head=dim // heads)
    proc = IdentityAttnProcessor(dim, dim, num_tokens=tokens)
    positions = grid[0] * grid[1]
    x = torch.randn(2, positions, dim)
    text = torch.randn(2, 5, dim)
    ids = torch.randn(2, people * tokens, dim)
    # disjoint regions: columns split between the people, the last column in nobody's region
    regions = torch.zeros(2, people, *grid)
    for i in range(people):
        regions[:, i, :, i * (grid[1] - 1) // people:(i + 1) * (grid[1] - 1) // people] = 1
    regions[1] = regions[1].flip(-2)  # another layout in the second row
    proc.region = regions if people > 1 else regions[:, 0]
    proc.scale = torch.tensor([0.7, 0.3])

    q = attn.to_q(x)
    want = _softmax_attend(q, attn.to_k(text), attn.to_v(text), heads)
    for i in range(people):
        own = ids[:, i * tokens:(i + 1) * tokens]
        part = _softmax_attend(q, proc.to_k_ip(own), proc.to_v_ip(own), heads)
        where = regions[:, i].reshape(2, positions, 1).double()
        want = want + proc.scale.double().view(2, 1, 1) * where * part
    want = attn.to_out[0](want.float())
    got = proc(attn, x, torch.cat([text, ids], 1))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


# -- img2img: which timesteps run, and from what ------------------------------------------------------------
def _sdxl_sigmas(config) -> np.ndarray:
    """EulerDiscreteScheduler's sigma of every training timestep from its config (scaled_linear betas)."""
    assert config["beta_schedule"] == "scaled_linear"
    betas = np.linspace(config["beta_start"] ** 0.5, config["beta_end"] ** 0.5, config["num_train_timesteps"],
                        dtype=np.float32) ** 2
    alphas_cumprod = np.cumprod(1.0 - betas.astype(np.float64))
    return np.sqrt((1 - alphas_cumprod) / alphas_cumprod)


def _leading_timesteps(config, steps: int) -> list[int]:
    assert config["timestep_spacing"] == "leading"
    ratio = config["num_train_timesteps"] // steps
    return [i * ratio + config["steps_offset"] for i in reversed(range(steps))]


def test_the_tiny_bundles_schedule_is_sdxls(pipe):
    assert _leading_timesteps(pipe.scheduler.config, 10) == [901, 801, 701, 601, 501, 401, 301, 201, 101, 1]


@pytest.mark.parametrize("strength, steps, runs", [(0.8, 10, 8), (0.4, 5, 2), (0.55, 4, 2), (0.75, 2, 1), (1.0, 4, 4)])
def test_img2img_runs_the_last_strength_share_of_the_schedule(pipe, strength, steps, runs):
    """diffusers img2img: int(steps * strength) steps, the LAST ones of the full schedule (the default 0.8 over 10
    steps runs 8: 701 ... 1); a change that ran the first ones or one too many shows here (0.75 of 2 steps is 1:
    int, not round)."""
    init = Image.fromarray(np.random.RandomState(0).randint(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))
    with UNetSpy(pipe.unet) as spy:
        pipe.generate([request(init_image=init, strength=strength, guidance_scale=1.0)], width=SIZE, height=SIZE,
                      steps=steps, output_type="latent")
    assert [c["t"] for c in spy.calls] == _leading_timesteps(pipe.scheduler.config, steps)[steps - runs:]


@torch.no_grad()
def test_img2img_starts_from_the_init_image_noised_at_the_first_kept_timestep(pipe):
    """x_T = sf * (VAE sample of the init image) + sigma_t * noise, both drawn from the request's generator in that
    order; the UNet sees x_T / sqrt(sigma_t^2 + 1). sigma_t from the betas, for t = 701 (0.8 of 10 steps)."""
    init = Image.fromarray(np.random.RandomState(3).randint(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))
    with UNetSpy(pipe.unet) as spy:
        pipe.generate([request(init_image=init, strength=0.8, guidance_scale=1.0, seed=5)], width=SIZE,
                      height=SIZE, steps=10, output_type="latent", callback=lambda i, n: [])  # one step
    first = spy.calls[0]
    assert first["t"] == 701
    g = torch.Generator("cpu").manual_seed(5)
    pixels = torch.from_numpy(np.asarray(init, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
    latent = pipe.vae.encode(pixels).latent_dist.sample(g) * pipe.vae.config.scaling_factor
    noise = torch.randn(latent.shape, generator=g)
    sigma = float(_sdxl_sigmas(pipe.scheduler.config)[701])
    want = (latent + sigma * noise) / math.sqrt(sigma ** 2 + 1)
    torch.testing.assert_close(first["sample"], want, rtol=1e-4, atol=1e-4)


# -- seeds --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 4294967295])
def test_a_seed_gives_torchs_own_noise_from_a_cpu_generator(pipe, seed):
    """Seed 0 is a seed like any other (not "no seed"): the first UNet input is torch.randn from a CPU generator
    seeded with it (x_T = noise * init_noise_sigma, scaled back by 1 / sqrt(sigma_max^2 + 1) for the UNet)."""
    with UNetSpy(pipe.unet) as spy:
        pipe.generate([request(seed=seed, guidance_scale=1.0)], width=SIZE, height=SIZE, steps=1,
                      output_type="latent")
    want = torch.randn((1, 4, SIZE // 8, SIZE // 8), generator=torch.Generator("cpu").manual_seed(seed))
    torch.testing.assert_close(spy.calls[0]["sample"], want, rtol=1e-5, atol=1e-5)


# -- guidance windows ---------------------------------------------------------------------------------------
@torch.no_grad()
def test_guidance_windows_pick_the_steps_each_request_gets_identitynet(pipe, monkeypatch):
    """control_guidance_start/end as diffusers: IdentityNet acts at step i of n only when start <= i/n and
    (i+1)/n <= end, at its conditioning scale; requests with different windows share a batch."""
    raw = []
    forward = pipe.controlnet.forward

    def spy(*args, conditioning_scale=1.0, **kwargs):
        down, mid = forward(*args, conditioning_scale=1.0, **kwargs)
        raw.append(mid.clone())
        return [d * conditioning_scale for d in down], mid * conditioning_scale

    monkeypatch.setattr(pipe.controlnet, "forward", spy)
    a = request(controlnet_conditioning_scale=0.8, control_guidance_start=0.2, control_guidance_end=0.6, seed=1)
    b = request(controlnet_conditioning_scale=0.5, control_guidance_start=0.0, control_guidance_end=0.3, seed=2)
    c = request(controlnet_conditioning_scale=0.6, seed=3)  # the whole schedule
    with UNetSpy(pipe.unet) as unet:
        pipe.generate([a, b, c], width=SIZE, height=SIZE, steps=5, output_type="latent")
    # by hand for n = 5: a on steps 1-2 (0.2 <= i/5, (i+1)/5 <= 0.6), b on step 0 only ((0+1)/5 <= 0.3), c on all
    want = {0: [0, 0.8, 0.8, 0, 0], 1: [0.5, 0, 0, 0, 0], 2: [0.6] * 5}
    assert len(unet.calls) == len(raw) == 5
    rows = 3  # CFG: [uncond a, b, c, cond a, b, c]
    for i, (call, r) in enumerate(zip(unet.calls, raw)):
        for k in range(rows):
            for row in (k, k + rows):
                got = float((call["mid"][row] * r[row]).sum() / (r[row] * r[row]).sum())
                assert got == pytest.approx(want[k][i], abs=1e-5), (i, k, row)


# -- coordinates between canvases of different shapes ------------------------------------------------------
def test_cover_fit_onto_a_narrower_and_a_wider_canvas():
    """A 100x50 pose onto 50x50: scale 1, the crop window centred on the face box, x shifted by -25; onto 200x50:
    scale 2 (cover), y cropped around the face."""
    kps = np.array([[45, 20], [55, 20], [50, 25], [46, 32], [54, 32]], dtype=float)
    bbox = np.array([40, 10, 60, 40], dtype=float)
    pose = Pose(kps, (100, 50), bbox)
    np.testing.assert_allclose(pose.keypoints_on(50, 50), kps - [25, 0])
    mask = np.asarray(pose.face_mask(50, 50))[..., 0]
    want = np.zeros((50, 50), np.uint8)
    want[10:40, 15:35] = 255
    np.testing.assert_array_equal(mask, want)
    fit = fit_canvas((100, 50), (200, 50), kps, bbox)
    # scale max(200/100, 50/50) = 2; y: 50 - 100 = -50 of slack, centre 25 * 2 = 50 -> offset 25 - 50 = -25
    assert fit.scale == 2.0 and fit.offset == (0.0, -25.0)
    np.testing.assert_allclose(pose.keypoints_on(200, 50), kps * 2 - [0, 25])


def test_a_face_near_the_edge_keeps_the_crop_inside_the_source():
    kps = np.array([[5, 20], [15, 20], [10, 25], [6, 32], [14, 32]], dtype=float)
    fit = fit_canvas((100, 50), (50, 50), kps, np.array([0, 10, 20, 40.0]))
    assert fit.offset == (0.0, 0.0)  # clamped: the window cannot start left of the source


@pytest.mark.parametrize("size, want", [((1000, 600), (1280, 768)), ((600, 1000), (768, 1280)),
                                        ((333, 1000), (384, 1280)), ((1280, 1280), (1280, 1280))])
def test_the_demos_analysis_size_for_non_square_photos(size, want):
    """resize_img(max_side=1280, min_side=1024, base 64) worked by hand: short side to 1024, long side to 1280,
    both rounded down to a multiple of 64 (e.g. 333x1000 -> 1024x3075 -> 426x1280 -> 384x1280)."""
    assert analysis_size(*size) == want


def test_face_coordinates_map_back_to_a_non_square_photo():
    face = Face(bbox=np.array([100, 50, 300, 250], np.float32), score=0.9,
                kps=np.array([[150, 100]] * 5, np.float32), embedding=np.zeros(512, np.float32))
    out = face.to_dict((1000 / 1280, 600 / 768))  # a 1000x600 photo analysed at 1280x768
    assert out["bbox"] == pytest.approx([78.125, 39.0625, 234.375, 195.3125])
    assert out["kps"][0] == pytest.approx([117.1875, 78.125])
    out = face.to_dict((0.5, 0.25))  # x and y scaled apart (a photo stretched by the demo's rounding)
    assert out["bbox"] == pytest.approx([50, 12.5, 150, 62.5]) and out["kps"][0] == pytest.approx([75, 25])


def test_people_on_a_non_square_canvas_get_their_regions_by_hand():
    """Keypoint placements on a 96x64 canvas: the box is a square 2.5 x the larger of the eye and eye-to-mouth
    distances, centred on the points' mean; the region grows it by REGION_MARGIN each side, clipped."""
    from instantid.defaults import REGION_MARGIN

    left = np.array([[16, 20], [28, 20], [22, 26], [17, 32], [27, 32]], dtype=float)
    right = left + [50, 8]
    people, size = place_people([np.ones(512), np.ones(512)], [Placement(keypoints=left), Placement(keypoints=right)],
                                96, 64)
    assert size == (96, 64)
    for person, kps in zip(people, (left, right)):
        cx, cy = kps.mean(axis=0)
        half = 2.5 * max(12.0, 12.0) / 2  # eyes 12 apart, eyes to mouth 12
        box = (cx - half, cy - half, cx + half, cy + half)
        m = 2 * half * REGION_MARGIN
        want = (max(0, int(box[0] - m)), max(0, int(box[1] - m)), min(96, math.ceil(box[2] + m)),
                min(64, math.ceil(box[3] + m)))
        assert person.region == want == grown_region(box, 96, 64)
        assert person.keypoint_image.size == (96, 64)
        mask = np.asarray(person.region_mask())[..., 0] > 0
        assert mask.sum() == (want[2] - want[0]) * (want[3] - want[1])
        assert mask[want[1], want[0]] and not mask[want[1] - 1 if want[1] else want[3], want[0]]


def test_group_faces_share_one_cover_fit_centred_on_their_union():
    """face_index placements from a 200x100 group photo onto a 100x100 canvas: scale max(100/200, 100/100) = 1, the
    crop window centred on the union of the chosen boxes (x 110..170 -> centre 140: offset 50 - 140 = -90, kept
    inside the source: -90 >= -100), faces counted left to right whatever order the detector gave."""
    def face(x):
        kps = np.array([[x + 5, 30], [x + 15, 30], [x + 10, 35], [x + 6, 42], [x + 14, 42]], dtype=np.float32)
        return Face(bbox=np.array([x, 20, x + 20, 50], np.float32), score=0.9, kps=kps,
                    embedding=np.zeros(512, np.float32))

    faces = [face(150), face(10), face(110)]  # detector order; left to right: 10, 110, 150
    people, size = place_people([np.ones(512), np.ones(512)], [Placement(face_index=1), Placement(face_index=2)],
                                100, 100, group=(faces, (200, 100)))
    assert size == (100, 100)
    np.testing.assert_allclose(people[0].keypoints, face(110).kps - [90, 0])
    np.testing.assert_allclose(people[1].keypoints, face(150).kps - [90, 0])
    assert people[0].region == grown_region([20, 20, 40, 50], 100, 100)


def test_a_tall_face_box_grows_by_its_own_height_and_width():
    """grown_region: REGION_MARGIN of the width left and right, of the HEIGHT above and below (a box placement's
    box need not be square), clipped to the canvas: (12, 20, 52, 100) with margin 0.25 -> (2, 0, 62, 120)."""
    from instantid.defaults import REGION_MARGIN

    assert REGION_MARGIN == 0.25
    assert grown_region([12, 20, 52, 100], 200, 200) == (2, 0, 62, 120)
    assert grown_region([12, 20, 52, 100], 60, 110) == (2, 0, 60, 110)
