"""Output safety filter: diffusers' ``StableDiffusionSafetyChecker`` (CLIP ViT-L/14 image embeddings compared
with 17 NSFW concept embeddings and 3 "special care" ones, each with its own threshold), the checker
CompVis/stable-diffusion-safety-checker ships and Replicate's InstantID runs by default.

``SafetyChecker.check(images)`` flags each image (one batched CLIP pass); ``apply`` then acts on the flagged ones:
``blur`` returns them heavily blurred (the caller marks them in its response), ``refuse`` leaves the decision to the
caller (the service answers 422 ``unsafe_output`` when every image of a result is flagged). diffusers' own
pipelines black flagged images out; a blurred image says more to a user who hit a false positive.
"""

from __future__ import annotations

import threading

import numpy as np
import PIL.Image
import PIL.ImageFilter

from .errors import WeightsError

DEFAULT_MODEL = "CompVis/stable-diffusion-safety-checker"
ACTIONS = ("blur", "refuse")
PATTERNS = ["config.json", "preprocessor_config.json", "model.safetensors"]
BLUR_FRACTION = 1 / 16  # Gaussian blur radius as a share of the longer side: shapes stay, details do not


class SafetyChecker:
    def __init__(self, model, processor):
        self.model, self.processor = model, processor
        self._lock = threading.Lock()

    @classmethod
    def load(cls, ref: str = DEFAULT_MODEL, device: str = "cpu", dtype=None) -> "SafetyChecker":
        from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
        from transformers import CLIPImageProcessor

        from .weights import resolve

        path = resolve(ref, allow_patterns=PATTERNS)
        if not (path / "config.json").is_file():
            raise WeightsError(f"malformed safety checker at {path}: missing config.json")
        try:
            model = StableDiffusionSafetyChecker.from_pretrained(path, torch_dtype=dtype).to(device).eval()
            processor = CLIPImageProcessor.from_pretrained(path)
        except (OSError, ValueError, RuntimeError, KeyError) as exc:
            raise WeightsError(f"cannot load safety checker from {path}: {exc}".splitlines()[0]) from exc
        return cls(model, processor)

    def check(self, images: list[PIL.Image.Image]) -> list[bool]:
        """One flag per image: True where any concept's similarity passes its threshold."""
        import torch

        if not images:
            return []
        pixels = self.processor(images=[image.convert("RGB") for image in images], return_tensors="pt").pixel_values
        param = next(self.model.parameters())
        placeholders = [np.zeros((1, 1, 3), np.float32) for _ in images]  # the checker blacks these out, not ours
        with self._lock, torch.no_grad():
            _, flags = self.model(images=placeholders, clip_input=pixels.to(device=param.device, dtype=param.dtype))
        return [bool(flag) for flag in flags]

    def apply(self, images: list[PIL.Image.Image], action: str) -> tuple[list[PIL.Image.Image], list[bool]]:
        """(images, flags): with ``blur`` the flagged images come back blurred; with ``refuse`` unchanged."""
        if action not in ACTIONS:
            raise ValueError(f"safety action must be one of {ACTIONS}, got {action!r}")
        flags = self.check(images)
        if action == "blur":
            images = [blur(image) if flag else image for image, flag in zip(images, flags)]
        return images, flags


def blur(image: PIL.Image.Image) -> PIL.Image.Image:
    return image.filter(PIL.ImageFilter.GaussianBlur(radius=max(image.size) * BLUR_FRACTION))
