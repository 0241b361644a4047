"""The 'tiny' profile: a random-weight bundle built on first start, used where no real weights are configured.

``resolve_args`` is idempotent: the application builder calls it once (building the bundle where the app is
built), and every deployment calls it again in its setup, which is a no-op when the bundle is complete on
that node and builds it (under a file lock) when a replica lands on a node that has not got it yet.
"""

from __future__ import annotations

import logging
from pathlib import Path

from deployments.config import AppArgs, ModelSpec

log = logging.getLogger("instantid.serve")

TINY_WARNING = ("TINY PROFILE: random weights, the images are noise, not faces. "
                "Configure real weights (profile: real) for real images.")


def _field_default(name: str):
    field = AppArgs.model_fields[name]
    return field.get_default(call_default_factory=True)


def resolve_args(args: AppArgs | dict | None) -> AppArgs:
    """Validate; in the tiny profile build the bundle and point unconfigured weights at it."""
    args = args if isinstance(args, AppArgs) else AppArgs.model_validate(args or {})
    if args.profile != "tiny":
        return args
    from instantid.controls import CONTROL_TYPES
    from instantid.tiny import make_tiny

    root = Path(make_tiny(Path(args.tiny_dir).expanduser()))
    update: dict = {}
    if args.instantid == _field_default("instantid"):
        update["instantid"] = str(root / "instantid")
    if args.face_model == _field_default("face_model"):
        update["face_model"] = str(root / "antelopev2")
    default_models = _field_default("models")
    if [m.model_dump() for m in args.models] == [m.model_dump() for m in default_models]:
        name = default_models[0].name
        update["models"] = [ModelSpec(name=name, base_model=str(root / "sdxl"),
                                      loras={"tiny": str(root / "lora" / "pytorch_lora_weights.safetensors")},
                                      controlnets={kind: str(root / f"controlnet-{kind}") for kind in CONTROL_TYPES})]
        update["default_model"] = name
    if args.preprocessors == _field_default("preprocessors"):
        update["preprocessors"] = {"depth": str(root / "dpt"), "pose": str(root / "dwpose")}
    if args.safety.model == _field_default("safety").model:
        update["safety"] = {**args.safety.model_dump(), "model": str(root / "safety")}
    if update:
        log.warning("%s (bundle: %s)", TINY_WARNING, root)
        data = args.model_dump()
        data.update({k: ([m.model_dump() for m in v] if k == "models" else v) for k, v in update.items()})
        args = AppArgs.model_validate(data)
    return args
