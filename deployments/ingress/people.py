"""Several people in one request (``people``) across the deployments: the GenerationService resolves each
person's identity (photos through the FaceAnalyzer, or the identity store) and the group pose photo's faces,
places everyone on the output canvas with ``instantid.people.place_people`` (which names the bad field:
overlapping regions, a face index the photo lacks, a box off the canvas), and sends the Generator typed
``PersonPlacement``s: per person its embedding, keypoints on the output canvas and region. The Generator draws the
keypoint images and hands ``Person``s to the pipeline.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import numpy as np

from deployments.errors import INVALID_PARAMETER
from deployments.ingress.identities import decode_embedding, require_visible
from deployments.ingress.inputs import check_image, decode_base64
from deployments.messages import PersonPlacement
from deployments.ingress.schemas import default_size


@dataclass
class PeoplePlan:
    """What the service resolved for a ``people`` request."""

    width: int
    height: int
    people: list[PersonPlacement]  # what the Generator gets
    view: list[dict]  # per person: region, keypoints, the pose face it took -- what the response shows


def canvas_bbox(face: dict, canvas) -> list[float] | None:
    """The face box on the analysed canvas (FaceInfo reports it on the photo as uploaded)."""
    if not face.get("bbox") or not face.get("image_size"):
        return None
    sx, sy = canvas[0] / face["image_size"][0], canvas[1] / face["image_size"][1]
    x1, y1, x2, y2 = face["bbox"]
    return [x1 * sx, y1 * sy, x2 * sx, y2 * sy]


def _decode_photos(req, max_pixels: int) -> list[list[tuple[str, bytes]] | None]:
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


async def resolve_people(service, ctx, req, pose: bytes | None, init_image: bytes | None) -> PeoplePlan:
    """Each person's identity and the group photo's faces (concurrently), then everyone on the canvas."""
    from instantid.identity import Pose
    from instantid.people import Placement, place_people

    limits = service.args.limits
    photos = await asyncio.to_thread(_decode_photos, req, limits.max_image_pixels)

    def reference(face: dict, kps, canvas) -> Pose:
        box = canvas_bbox(face, canvas)
        return Pose(np.asarray(kps), tuple(canvas), None if box is None else np.asarray(box))

    async def identity(i: int, person, person_photos):
        if person_photos is None:
            record = require_visible(await service.stored_identity(person.identity_id), ctx.scope,
                                     person.identity_id, field=f"people[{i}].identity_id")
            return decode_embedding(record["embedding"]), reference(record["faces"][0], record["pose"]["kps"],
                                                                    record["pose"]["canvas"])
        analysis = await service.analyze_photos(ctx, person_photos)
        return analysis.embedding, reference(analysis.pose_face, analysis.pose_kps, analysis.pose_canvas)

    async def group_photo():
        return None if pose is None else await service.analyze_photos(ctx, [], ("pose_image", pose), group=True)

    found = await asyncio.gather(group_photo(), *(identity(i, p, ph) for i, (p, ph) in
                                                  enumerate(zip(req.people, photos))))
    group_analysis, identities = found[0], found[1:]
    group, group_info = None, []
    if group_analysis is not None:
        canvas = tuple(group_analysis.pose_canvas)
        group = ([Pose(np.asarray(f["kps"]), canvas, np.asarray(f["bbox"])) for f in group_analysis.group], canvas)
        group_info = [f["info"] for f in group_analysis.group]

    source = group[1] if group else None
    if init_image is not None and (req.width is None or req.height is None):
        from instantid.face import analysis_size
        from instantid.image_limits import read_header

        source = analysis_size(*read_header(init_image, "init_image")[1])  # checked at the edge already
    width, height = req.width, req.height
    if source is not None:
        default = default_size(source, limits)
        width, height = width or default[0], height or default[1]
    elif width is None or height is None:
        raise INVALID_PARAMETER("width: give width and height for people placed by box or "
                                                     "keypoints (no pose_image sets the canvas)", field="width")

    placements = [Placement(face_index=p.face_index, box=None if p.box is None else tuple(p.box),
                            keypoints=None if p.keypoints is None else np.asarray(p.keypoints, dtype=np.float64))
                  for p in req.people]
    people, _ = place_people([np.asarray(e, dtype=np.float32) for e, _ in identities], placements, width, height,
                             group=group, references=[ref for _, ref in identities])
    view = [{"region": list(p.region), "keypoints": [[round(float(x), 2), round(float(y), 2)] for x, y in p.keypoints],
             **({"face": group_info[s.face_index]} if s.face_index is not None else {})}  # both left to right
            for p, s in zip(people, req.people)]
    return PeoplePlan(width, height, [PersonPlacement(p.face_embedding, p.keypoints.astype(np.float32), p.region)
                                      for p in people], view)
