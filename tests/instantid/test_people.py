"""Several people in one picture on the tiny bundle: each identity's tokens and IdentityNet residuals act only
inside its own region; one person is exactly the single-identity request; mixed batches and dropped rows work;
placements and their errors."""

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import Attention

from instantid.attention import IdentityAttnProcessor, region_at
from instantid.errors import InvalidParameterError
from instantid.identity import Pose
from instantid.keypoints import face_region_mask
from instantid.people import MAX_PEOPLE, REGION_MARGIN, Placement, place_people
from instantid.pipeline import GenerationRequest, _resized

SIZE = 128
KPS_A = np.array([[22, 40], [34, 40], [28, 47], [23, 54], [33, 54]], dtype=float)
KPS_B = KPS_A + [70, 10]


def embedding(seed=0):
    return np.random.RandomState(seed).randn(512).astype(np.float32) * 10


def two_people(emb_a=0, emb_b=1):
    people, _ = place_people([embedding(emb_a), embedding(emb_b)],
                             [Placement(keypoints=KPS_A), Placement(keypoints=KPS_B)], SIZE, SIZE)
    return people


def run(pipe, *requests, steps=2, callback=None):
    out = pipe.generate(list(requests), width=SIZE, height=SIZE, steps=steps, output_type="latent",
                        callback=callback)
    return [None if x is None else x.clone() for x in out]


def region_tensor(person) -> torch.Tensor:
    return torch.from_numpy(np.array(person.region_mask())[:, :, 0]).float()[None] / 255


# -- exactness ------------------------------------------------------------------------------------------------
def test_one_person_is_exactly_the_single_identity_request_with_its_region_as_control_mask(pipe):
    person = two_people()[0]
    one = GenerationRequest(people=[person], prompt="a person", seed=3)
    single = GenerationRequest(face_embedding=person.face_embedding, keypoint_image=person.keypoint_image,
                               control_mask=face_region_mask(SIZE, SIZE, person.region), prompt="a person", seed=3)
    assert torch.equal(run(pipe, one)[0], run(pipe, single)[0])


def test_several_identities_in_one_attention_call_equal_one_call_per_identity():
    """The masked joint call is exactly sum_i region_i * attn(q, K_i, V_i): checked against the single-identity
    path run once per identity (the layer is affine in the identity branch, so the text-only part is removed)."""
    torch.manual_seed(0)
    attn = Attention(query_dim=32, cross_attention_dim=16, heads=2, dim_head=16)
    proc = IdentityAttnProcessor(32, 16, num_tokens=4)
    attn.set_processor(proc)
    hidden = torch.randn(2, 64, 32)  # an 8 x 8 grid
    text, ids = torch.randn(2, 7, 16), [torch.randn(2, 4, 16) for _ in range(3)]
    masks = torch.zeros(2, 3, 8, 8)
    masks[:, 0, :4, :4], masks[:, 1, 4:, 2:5], masks[:, 2, :3, 6:] = 1, 1, 1
    masks[1, 2] = 0  # the second row has only two people: its third slot is empty

    proc.scale, proc.region = 0.7, masks
    joint = attn(hidden, torch.cat([text, *ids], dim=1))
    proc.scale, proc.region = 0.0, None
    text_only = attn(hidden, torch.cat([text, ids[0]], dim=1))
    want = text_only.clone()
    for k in range(3):
        proc.scale, proc.region = 0.7, masks[:, k]
        want += attn(hidden, torch.cat([text, ids[k]], dim=1)) - text_only
    torch.testing.assert_close(joint, want, rtol=1e-5, atol=1e-5)


# -- confinement ----------------------------------------------------------------------------------------------
def _capture(pipe, request, monkeypatch):
    """The identity-attention output of every layer and the summed IdentityNet residuals, at the first step."""
    attention, residuals = [], []
    original_attend, original_net = IdentityAttnProcessor._attend_people, type(pipe)._identity_net

    def attend(self, *args):
        out = original_attend(self, *args)
        attention.append(out.clone())
        return out

    def identity_net(self, *args):
        down, mid = original_net(self, *args)
        if not residuals:
            residuals.extend([*down, mid])
        return down, mid

    monkeypatch.setattr(IdentityAttnProcessor, "_attend_people", attend)
    monkeypatch.setattr(type(pipe), "_identity_net", identity_net)
    run(pipe, request, steps=1)
    monkeypatch.undo()
    return attention, residuals


@pytest.mark.parametrize("changed", [0, 1])
def test_changing_one_identity_changes_only_its_own_region(pipe, monkeypatch, changed):
    """Identity A's embedding moves the identity attention and IdentityNet's residuals at the first step only
    inside A's region (and B's only inside B's). Attention is compared at the UNet's first cross-attention layer,
    whose queries both runs share; deeper layers see hidden states that convolutions and self-attention have
    already spread (as with the official one-face control mask) -- the per-layer exactness test above covers them.
    IdentityNet residuals are compared where the bilinear-resized region is zero."""
    base = two_people()
    moved = two_people(*((5, 1) if changed == 0 else (0, 5)))
    attention_a, residuals_a = _capture(pipe, GenerationRequest(people=base, seed=1), monkeypatch)
    attention_b, residuals_b = _capture(pipe, GenerationRequest(people=moved, seed=1), monkeypatch)
    region = region_tensor(base[changed])
    assert len(attention_a) == len(attention_b) > 0
    for a, b in zip(attention_a[:1], attention_b[:1]):
        inside = region_at(region, a.shape[1])[0, :, 0] > 0
        diff = (a - b).abs().amax(dim=(0, 2))
        assert diff[~inside].max() == 0 and diff[inside].max() > 0
    moved_inside = []
    for a, b in zip(residuals_a, residuals_b):
        inside = _resized(region, a, "bilinear")[0, 0] > 0
        diff = (a - b).abs().amax(dim=(0, 1))
        assert diff[~inside].max() == 0
        moved_inside.append(bool(diff[inside].max() > 0))
    assert any(moved_inside)  # the levels after IdentityNet's first cross-attention block (SDXL's first has none)


def test_the_order_of_people_does_not_matter_who_stands_where_does(pipe):
    base = run(pipe, GenerationRequest(people=two_people(), seed=1))[0]
    listed_backwards = run(pipe, GenerationRequest(people=list(reversed(two_people())), seed=1))[0]
    torch.testing.assert_close(base, listed_backwards, rtol=1e-4, atol=1e-5)  # tokens follow the person
    swapped_places = run(pipe, GenerationRequest(people=two_people(1, 0), seed=1))[0]
    assert not torch.allclose(base, swapped_places, atol=1e-3)


# -- batching -------------------------------------------------------------------------------------------------
def test_people_batch_with_single_identity_requests(pipe):
    """A two-person request shares a denoising batch with single-identity ones (with and without a control
    mask); every request ends as it does alone, up to batched-matmul rounding."""
    person = two_people()[0]
    single = GenerationRequest(face_embedding=embedding(3), keypoint_image=person.keypoint_image, seed=4,
                               num_images=2)
    masked = GenerationRequest(face_embedding=embedding(4), keypoint_image=person.keypoint_image, seed=5,
                               control_mask=face_region_mask(SIZE, SIZE, person.region))
    group = GenerationRequest(people=two_people(), seed=6, prompt="two people")
    together = run(pipe, single, group, masked)
    for got, request in zip(together, (single, group, masked)):
        torch.testing.assert_close(got, run(pipe, request)[0], rtol=1e-3, atol=2e-4)


def test_dropped_rows_take_their_identity_slots_with_them(pipe):
    group = GenerationRequest(people=two_people(), seed=6, num_images=2)
    other = GenerationRequest(people=two_people(2, 3)[:1], seed=7)
    three = GenerationRequest(face_embedding=embedding(9), keypoint_image=two_people()[1].keypoint_image, seed=8)
    kept = run(pipe, group, other, three, steps=3)
    dropped = run(pipe, group, other, three, steps=3, callback=lambda step, total: [0, 2] if step >= 1 else None)
    assert dropped[1] is None
    torch.testing.assert_close(dropped[0], kept[0], rtol=1e-3, atol=2e-4)
    torch.testing.assert_close(dropped[2], kept[2], rtol=1e-3, atol=2e-4)
    # the only multi-person request leaves: the remaining rows run with an empty second slot
    alone = run(pipe, group, three, steps=3, callback=lambda step, total: [1] if step >= 1 else None)
    torch.testing.assert_close(alone[1], kept[2], rtol=1e-3, atol=2e-4)


def test_identitynet_runs_once_per_identity_on_its_rows(pipe):
    rows = []
    hook = pipe.controlnet.register_forward_pre_hook(lambda _, args: rows.append(int(args[0].shape[0])))
    try:
        run(pipe, GenerationRequest(people=two_people(), seed=1, num_images=2),
            GenerationRequest(face_embedding=embedding(), keypoint_image=two_people()[0].keypoint_image), steps=2)
    finally:
        hook.remove()
    assert rows == [2 * 3, 2 * 2] * 2  # per step: slot 0 on every row (guided: 2 x 3), slot 1 on the group's


def test_pipeline_refuses_mixed_or_overlapping_inputs(pipe):
    a, b = two_people()
    with pytest.raises(InvalidParameterError, match="people"):
        run(pipe, GenerationRequest(people=[a, b], face_embedding=embedding()))
    with pytest.raises(InvalidParameterError, match="overlap"):
        run(pipe, GenerationRequest(people=[a, a]))
    with pytest.raises(InvalidParameterError, match="people"):
        run(pipe, GenerationRequest(people=[a, b, a, b, a]))
    with pytest.raises(InvalidParameterError, match="face_embedding"):
        run(pipe, GenerationRequest(prompt="nobody"))


# -- placement ------------------------------------------------------------------------------------------------
@dataclass
class _Face:
    bbox: np.ndarray
    kps: np.ndarray


def _face(x):
    return _Face(np.array([x - 12, 30, x + 12, 60], dtype=np.float32), KPS_A - [28, 0] + [x, 0])


def test_face_index_counts_left_to_right_and_maps_onto_the_canvas():
    faces = [_face(150), _face(30), _face(90)]  # detector order: largest first, not left to right
    people, size = place_people([embedding(0), embedding(1)], [Placement(face_index=2), Placement(face_index=0)],
                                group=(faces, (200, 100)))
    assert size == (200, 100)
    centre_x = [(p.region[0] + p.region[2]) / 2 for p in people]
    assert centre_x == pytest.approx([150, 30], abs=1)
    x1, y1, x2, y2 = people[1].region  # box 18..42 x 30..60, grown by REGION_MARGIN per side
    assert (x1, y1, x2, y2) == (int(18 - 24 * REGION_MARGIN), int(30 - 30 * REGION_MARGIN),
                                int(np.ceil(42 + 24 * REGION_MARGIN)), int(np.ceil(60 + 30 * REGION_MARGIN)))
    drawn = np.array(people[0].keypoint_image)
    assert drawn[:, :100].max() == 0 and drawn[:, 100:].max() > 0  # the right face's keypoints only
    # another size: one cover-fit for the whole group, the faces keep their order and spacing
    people, size = place_people([embedding(0), embedding(1)], [Placement(face_index=0), Placement(face_index=2)],
                                160, 80, group=(faces, (200, 100)))
    assert size == (160, 80) and people[0].region[2] < people[1].region[0]


def test_box_placement_scales_the_persons_own_face_into_the_box():
    ref = Pose(KPS_A, (SIZE, SIZE), np.array([10, 28, 46, 66], dtype=float))
    people, _ = place_people([embedding()], [Placement(box=(60, 20, 96, 58))], SIZE, SIZE, references=[ref])
    assert people[0].region == (51, 10, 105, 68)
    with pytest.raises(InvalidParameterError, match=r"people\[0\]\.box"):
        place_people([embedding()], [Placement(box=(60, 20, 96, 58))], SIZE, SIZE)  # no face photo


@pytest.mark.parametrize("placements, group, field", [
    ([Placement(face_index=0), Placement(face_index=3)], True, r"people\[1\]\.face_index"),
    ([Placement(face_index=0)], False, r"people\[0\]\.face_index"),
    ([Placement(keypoints=KPS_A), Placement(keypoints=KPS_A + [20, 0])], False, "people: the regions of people"),
    ([Placement(keypoints=KPS_A)] * (MAX_PEOPLE + 1), False, "people: 1 to 4"),
    ([Placement(keypoints=KPS_A), Placement(box=(100, 10, 140, 50))], False, r"people\[1\]\.box"),
    ([Placement(keypoints=KPS_A + [120, 0])], False, r"people\[0\]\.keypoints"),
])
def test_bad_placements_name_the_field(placements, group, field):
    faces = ([_face(30), _face(90), _face(150)], (200, 100)) if group else None
    ref = Pose(KPS_A, (SIZE, SIZE), np.array([10, 28, 46, 66], dtype=float))
    with pytest.raises(InvalidParameterError, match=field):
        place_people([embedding()] * len(placements), placements, SIZE if not group else None,
                     SIZE if not group else None, group=faces, references=[ref] * len(placements))
