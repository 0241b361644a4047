"""Extra spatial ControlNets of a request (``controls``) on the Ingress: checked, their maps derived on CPU beside
the face analysis (deployments/face_analyzer/control_maps.py), applied by the Generator
(deployments/generator/controls.py).

A request's ``controls[i]`` is ``{type, image?, map?, scale?, start, end}``. ``type`` is a key of the model's
``controlnets``; pose, canny and depth derive their map from ``image`` (default: the pose photo, else the first
face photo, as the demo) with ``instantid.controls``; any type takes a ready ``map`` instead.

- Ingress (``check_controls``): base64 and header checks naming ``controls[i].image`` / ``.map`` (400; a ready
  map is decoded too, ``messages.load_map``, so a corrupt one is refused before a job is accepted), the type
  against the model (422 naming ``controls[i].type``), a photo to derive from (422), bounds in the schema.
- FaceAnalyzer replicas (the CPU face group; ``face_analyzer.control_maps.ControlMapsCore``): photos decoded with the same bounds as the face
  photos, resized as the demo resizes its photo (``resize_for_analysis``), maps derived at that size. The Ingress
  calls it concurrently with the face analysis of the same request.
- Generator (``generator.controls.decode_maps``): each map decoded (a ready one) and resized to the output canvas, then
  ``ControlInput(type, map, scale, start, end)``, exactly what ``instantid.controls.prepare_controls`` builds.
"""

from __future__ import annotations

import asyncio


from instantid.controls import CONTROL_TYPES as DERIVED  # no torch at import: the Ingress stays light
from instantid.controls import DEFAULT_SCALES

from deployments.errors import INVALID_PARAMETER
from deployments.ingress.backends import BY_VALUE_MAX_BYTES
from deployments.ingress.inputs import check_image, decode_base64
from deployments.messages import ControlMaps, load_map


def check_controls(req, spec, faces: list[bytes] | None, pose: bytes | None, max_pixels: int) -> list[dict]:
    """The request's controls as plain data: ``{name, scale, start, end}`` plus ``photo`` (bytes to derive the
    map from) or ``map`` (bytes of a ready map). Blocking (base64, headers): run off the event loop."""
    out = []
    for i, control in enumerate(req.controls):
        where = f"controls[{i}]"
        if control.type not in spec.controlnets:
            raise INVALID_PARAMETER(f"{where}.type: model {spec.name!r} has no {control.type!r} ControlNet; it has "
                               f"{sorted(spec.controlnets)}", field=f"{where}.type")
        if control.image is not None and control.map is not None:
            raise INVALID_PARAMETER(f"{where}: give image or map, not both", field=where)
        entry = {"name": control.type, "start": control.start, "end": control.end,
                 "scale": DEFAULT_SCALES.get(control.type, 1.0) if control.scale is None else control.scale}
        if control.map is not None:
            entry["map"] = decode_base64(control.map, f"{where}.map")
            check_image(entry["map"], f"{where}.map", max_pixels)
            load_map(entry["map"], i)  # decoded once here too: a corrupt map is the request's 400, never later
        elif control.type not in DERIVED:
            raise INVALID_PARAMETER(f"{where}.map: a {control.type!r} control needs a ready map",
                               field=f"{where}.map")
        elif control.image is not None:
            entry["photo"] = decode_base64(control.image, f"{where}.image")
            check_image(entry["photo"], f"{where}.image", max_pixels)
        elif pose is not None or faces:
            entry["photo"] = pose if pose is not None else faces[0]  # the demo's choice
        else:
            raise INVALID_PARAMETER(f"{where}.image: no photo to derive the {control.type} map "
                               "from (a stored identity has none): give image, pose_image or map",
                               field=f"{where}.image")
        out.append(entry)
    return out


def control_fields(controls: list[dict]) -> list[tuple[str, str, bytes]]:
    """(field name for errors, type, photo bytes) of the controls whose map is derived."""
    return [(f"controls[{i}].image", c["name"], c["photo"]) for i, c in enumerate(controls) if "photo" in c]


def attach_maps(controls: list[dict], derived: ControlMaps | None) -> list[dict]:
    """The Generator's ``controls``: each entry with its ``map`` (derived array, or the ready map's bytes)."""
    maps = iter(derived.maps if derived is not None else [])
    out = []
    for c in controls:
        entry = {k: v for k, v in c.items() if k != "photo"}
        if "photo" in c:
            entry["map"] = next(maps)
        out.append(entry)
    return out


async def start_control_maps(core, ctx, req, spec, faces, pose) -> tuple[list[dict], asyncio.Future | None]:
    """Check the request's controls and start deriving their maps on the CPU face group (by reference: maps
    of a 1024-1280 canvas are megabytes), so they run while the same request's faces are analysed."""
    if not req.controls:
        return [], None
    controls = await asyncio.to_thread(check_controls, req, spec, faces, pose, core.args.limits.max_image_pixels)
    items = control_fields(controls)
    if not items:
        return controls, None
    handle = core.backends.face_for(BY_VALUE_MAX_BYTES + 1)
    task = asyncio.ensure_future(ctx.call(handle.control_maps.remote(items)))
    # a failure elsewhere in the request leaves the result unread: consume it (its error is the request's own)
    task.add_done_callback(lambda t: t.cancelled() or t.exception())
    return controls, task


async def finish_control_maps(ctx, controls: list[dict], task) -> list[dict]:
    """The Generator's ``controls``: the derived maps awaited and attached (the ready ones travel as bytes)."""
    derived = None
    if task is not None:
        derived = await task
        ctx.timings["control_maps_s"] = derived.timings["control_maps_s"]
    return attach_maps(controls, derived)
