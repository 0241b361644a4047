"""The tiny bundle: random weights in exactly the real on-disk layouts, built at run time (never committed).

What the tiny profile (``serve/local.yaml``, ``scripts/demo``) and ``instantid make-tiny`` need, and nothing
else: ``make_tiny(root)`` (``bundle.py``) writes the SDXL and InstantID directories, an extra ControlNet and a
LoRA, and ``face_pack.py``'s antelopev2-style face pack. Random weights prove plumbing and numerics, never
image quality. Builders only tests and benchmarks use live in ``tests/fixtures/``.
"""

from .bundle import make_tiny
from .face_pack import write_tiny_face_pack

__all__ = ["make_tiny", "write_tiny_face_pack"]
