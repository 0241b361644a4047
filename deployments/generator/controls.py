"""A task's control maps on the Generator: each decoded (a ready map) and resized to the output canvas, as
``instantid.controls.prepare_controls`` resizes them."""

from __future__ import annotations

import numpy as np

from deployments.messages import load_map


def decode_maps(controls: list[dict], width: int, height: int) -> list[dict]:
    """Generator side: every map as an RGB array on the output canvas (a ready map decoded first), as
    ``prepare_controls`` resizes them."""
    from PIL import Image

    out = []
    for i, c in enumerate(controls):
        source = c["map"]
        if isinstance(source, (bytes, bytearray)):
            image = load_map(source, i)
        else:
            image = Image.fromarray(np.asarray(source, dtype=np.uint8))
        image = image.convert("RGB").resize((width, height))
        out.append({**c, "map": np.asarray(image, dtype=np.uint8)})
    return out
