"""Several people in one request (``people``) across the deployments: the Ingress resolves each person's identity
(photos through the FaceAnalyzer, or the identity store) and the group pose photo's faces, places everyone on the
output canvas with ``instantid.people.place_people`` (which names the bad field: overlapping regions, a face index
the photo lacks, a box off the canvas), and sends the Generator plain data: per person its embedding, keypoints on
the output canvas and region. The Generator draws the keypoint images and hands ``Person``s to the pipeline.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import numpy as np

from .errors import ServiceError
from .identities import decode_embedding, visible_to
from .models import default_size


@dataclass
class PeoplePlan:
    """What the Ingress resolved for a ``people`` request."""

    width: int
    height: int
    job: list[dict]  # per person: embedding, kps (output canvas), region -- what the Generator gets
    view: list[dict]  # per person: region, keypoints, the pose face it took -- what the response shows
    embeddings: list[np.ndarray]


def _decode_photos(req, max_pixels: int) -> list[list[tuple[str, bytes]] | None]:
    from .ingress import check_image, decode_base64

    out = []
    for i, person in enumerate(req.people):
        if person.face_images is None:
            out.append(None)
            continue
        photos = []
        for k, text in enumerate(person.face_images):
            where = f"people[{i}].face_images[{k}]"
            data = decode_base64(text, where)
            check_image(data, where, max_pixels)
            photos.append((where, data))
        out.append(photos)
    return out


async def resolve_people(core, ctx, req, pose: bytes | None, init_image: bytes | None) -> PeoplePlan:
    """Each person's identity and the group photo's faces (concurrently), then everyone on the canvas."""
    from instantid.identity import Pose
    from instantid.people import Placement, place_people

    from .ingress import _canvas_bbox

    limits = core.args.limits
    photos = await asyncio.to_thread(_decode_photos, req, limits.max_image_pixels)

    async def identity(i: int, person, person_photos):
        if person_photos is None:
            record = await core._store("get", person.identity_id)
            if record is None or not visible_to(record, ctx.scope):  # another key's: 404, as if absent
                raise ServiceError(404, "not_found", f"identity {person.identity_id} not found",
                                   field=f"people[{i}].identity_id")
            kps, canvas = record["pose"]["kps"], record["pose"]["canvas"]
            return decode_embedding(record["embedding"]), Pose(np.asarray(kps), tuple(canvas),
                                                               _bbox(record["faces"][0], canvas))
        analysis = await core._call(ctx, core._face_for(sum(len(d) for _, d in person_photos)).analyze.remote(
            person_photos, None))
        kps, canvas = analysis["pose"]["kps"], analysis["pose"]["canvas"]
        return analysis["embedding"], Pose(np.asarray(kps), tuple(canvas), _bbox(analysis["pose"]["face"], canvas))

    def _bbox(face, canvas):
        box = _canvas_bbox(face, canvas)
        return None if box is None else np.asarray(box)

    async def group_photo():
        if pose is None:
            return None
        return await core._call(ctx, core._face_for(len(pose)).analyze.remote(
            [], ("pose_image", pose), False, True))  # no thumbnail; a group photo

    found = await asyncio.gather(group_photo(), *(identity(i, p, ph) for i, (p, ph) in
                                                  enumerate(zip(req.people, photos))))
    group_analysis, identities = found[0], found[1:]
    group, group_info = None, []
    if group_analysis is not None:
        ctx.timings["face_analysis_s"] = group_analysis["timings"]["face_analysis_s"]
        canvas = tuple(group_analysis["group"]["canvas"])
        faces = [Pose(np.asarray(f["kps"]), canvas, np.asarray(f["bbox"])) for f in group_analysis["group"]["faces"]]
        group, group_info = (faces, canvas), [f["info"] for f in group_analysis["group"]["faces"]]

    source = group[1] if group else None
    if init_image is not None and (req.width is None or req.height is None):
        import io

        from PIL import Image

        from instantid.face import analysis_size

        with Image.open(io.BytesIO(init_image)) as image:
            source = analysis_size(*image.size)
    width, height = req.width, req.height
    if source is not None:
        default = default_size(source, limits)
        width, height = width or default[0], height or default[1]
    elif width is None or height is None:
        raise ServiceError(422, "invalid_parameter", "width: give width and height for people placed by box or "
                                                     "keypoints (no pose_image sets the canvas)", field="width")

    placements = [Placement(face_index=p.face_index, box=None if p.box is None else tuple(p.box),
                            keypoints=None if p.keypoints is None else np.asarray(p.keypoints, dtype=np.float64))
                  for p in req.people]
    embeddings = [np.asarray(e, dtype=np.float32) for e, _ in identities]
    people, _ = place_people(embeddings, placements, width, height, group=group,
                             references=[ref for _, ref in identities])
    job = [{"embedding": p.face_embedding, "kps": p.keypoints.astype(np.float32), "region": list(p.region)}
           for p in people]
    view = [{"region": list(p.region), "keypoints": [[round(float(x), 2), round(float(y), 2)] for x, y in p.keypoints],
             **({"face": group_info[s.face_index]} if s.face_index is not None else {})}  # both left to right
            for p, s in zip(people, req.people)]
    return PeoplePlan(width, height, job, view, embeddings)


# -- the Generator's side ---------------------------------------------------------------------------------
def decode_people(raw) -> list[dict] | None:
    """The job's ``people`` checked (the Ingress placed them; a handle caller might not have)."""
    from instantid.errors import InvalidParameterError
    from instantid.face import validate_embedding, validate_keypoints
    from instantid.people import MAX_PEOPLE

    if not raw:
        return None
    if len(raw) > MAX_PEOPLE:
        raise InvalidParameterError("people", f"at most {MAX_PEOPLE} people, got {len(raw)}")
    out = []
    for person in raw:
        region = tuple(int(v) for v in person["region"])
        if len(region) != 4:
            raise InvalidParameterError("people", "a region is x1, y1, x2, y2")
        out.append({"embedding": validate_embedding(person["embedding"]), "kps": validate_keypoints(person["kps"]),
                    "region": region})
    return out


def pipeline_people(people: list[dict], width: int, height: int) -> list:
    """Decoded job people as the pipeline's ``Person``s, keypoints drawn on the output canvas."""
    from instantid.keypoints import draw_keypoints
    from instantid.people import Person

    return [Person(p["embedding"], draw_keypoints(width, height, p["kps"]), p["region"], p["kps"]) for p in people]
