"""InstantID on SDXL: the pipeline.

Semantics are those of the official ``StableDiffusionXLInstantIDPipeline`` (which needs diffusers 0.25), on
current diffusers:
- the face embedding goes through the Resampler; with classifier-free guidance the unconditional branch uses
  the projection of an all-zero embedding;
- the UNet's cross-attention input is [text tokens; ID tokens] (decoupled attention, see attention.py);
- IdentityNet (a ControlNet) sees the keypoint image and the ID tokens -- not the text -- and so do the
  optional extra spatial ControlNets (as the official multi-ControlNet demo wires them); residuals add up in
  order, each scaled by its conditioning scale times its guidance window [start, end];
- initial latents (and ancestral noise) come from a CPU ``torch.Generator`` seeded per request.

Three features of the official demo's full pipeline and of its img2img pipeline, per request:
- ``prompt_weighting="lpw"``: the demo's long-prompt weighting (prompt_weighting.py); "none" is the basic pipeline's
  plain encoding. Prompts of unequal encoded length share a batch by padding, masked out of the attention;
- ``control_mask`` ("enhance non-face region"): IdentityNet's residuals are multiplied by the mask (bilinear) at
  each residual's resolution, and every identity-attention output by it (nearest), so identity and pose act only
  in the face region (white);
- ``init_image``/``strength`` (img2img): the timesteps are cut by ``strength`` and the VAE-encoded init image is
  noised at the first kept timestep with the request's own generator (SDXL ControlNet img2img of diffusers 0.27).

Several people in one picture (``people``, people.py): each identity gets its own slot of ID tokens, one
region mask and its own IdentityNet pass (its keypoint image and ID tokens, residuals masked to its region and
summed); attention.py confines each identity's tokens to its region. Extra ControlNets see the first person's
ID tokens. A one-person request is exactly the single-identity request with its region as ``control_mask``.

``generate`` takes several requests that share size, steps and scheduler and runs them as one denoising
batch. Each request keeps its own latents, generator and scheduler state, so its images are the ones it would
get alone (up to float rounding of batched matrix products).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np
import PIL.Image
import torch
from diffusers import ControlNetModel, StableDiffusionXLControlNetPipeline
from diffusers.pipelines.stable_diffusion_xl import StableDiffusionXLPipelineOutput
from diffusers.utils.torch_utils import randn_tensor
from torch.nn import functional as F

from . import defaults, prompt_weighting
from .attention import install_identity_adapter, set_identity_region, set_identity_scale, set_identity_tokens
from .errors import InvalidParameterError, WeightsError
from .people import Person, check_people
from .resampler import Resampler
from .schedulers import make_scheduler

EMBEDDING_VALUES = 512  # a raw ArcFace embedding


class _RedactTruncatedPrompt(logging.Filter):
    """diffusers logs the part of a prompt past CLIP's 77 tokens as a warning; prompts are personal data and
    never go to a log, so the record keeps only the fact."""

    def filter(self, record: logging.LogRecord) -> bool:
        if "input was truncated" in str(record.msg):
            record.msg, record.args = "a prompt was truncated to the text encoder's token limit", ()
        return True


for _module in {StableDiffusionXLControlNetPipeline.encode_prompt.__module__,
                "diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl"}:
    logging.getLogger(_module).addFilter(_RedactTruncatedPrompt())


@dataclass
class ControlInput:
    """An extra spatial ControlNet (depth, canny, ...) applied alongside IdentityNet."""

    name: str
    image: PIL.Image.Image
    scale: float = 1.0
    start: float = 0.0
    end: float = 1.0


@dataclass
class GenerationRequest:
    """One request's conditioning. Size, steps and scheduler are shared by a batch and given to ``generate``."""

    # one identity, (512,); (photos, 512) puts each photo's 16 ID tokens side by side (combine "concat",
    # identity.combine_embeddings); None with ``people``
    face_embedding: np.ndarray | torch.Tensor | None = None
    keypoint_image: PIL.Image.Image | None = None
    prompt: str = ""
    negative_prompt: str | None = None
    num_images: int = 1
    seed: int | None = 0
    generator: torch.Generator | None = None  # overrides seed (the official API takes a generator)
    guidance_scale: float = defaults.GUIDANCE_SCALE
    ip_adapter_scale: float = defaults.IP_ADAPTER_SCALE
    controlnet_conditioning_scale: float = defaults.CONTROLNET_CONDITIONING_SCALE
    control_guidance_start: float = 0.0
    control_guidance_end: float = 1.0
    controls: list[ControlInput] = field(default_factory=list)
    prompt_weighting: str = prompt_weighting.DEFAULT  # "none" or "lpw" (the demo's)
    control_mask: PIL.Image.Image | None = None  # white = face region; resized to the canvas when it differs
    init_image: PIL.Image.Image | None = None  # img2img: the picture to restyle (resized to the canvas)
    strength: float = defaults.IMG2IMG_STRENGTH  # img2img: the share of the schedule that is run (0 < strength <= 1)
    # ComfyUI_InstantID's ``noise``: the unconditional branch's embedding is ``noise * U[0, 1)`` per value instead
    # of zeros, drawn from a generator seeded with the request's seed (reproducible; the latents' generator is
    # left alone, so only the unconditional ID tokens change). 0: the demo's all-zero embedding
    noise: float = defaults.NOISE
    # 2-4 identities, each confined to its own region (people.py); replaces face_embedding, keypoint_image and
    # control_mask. One person is exactly the single-identity request with its region as the control mask.
    people: list[Person] = field(default_factory=list)

    def identities(self) -> list[tuple]:
        """(embedding, keypoint image, region mask or None) per identity, in slot order."""
        if self.people:
            return [(p.face_embedding, p.keypoint_image, p.region_mask()) for p in self.people]
        return [(self.face_embedding, self.keypoint_image, self.control_mask)]

    def make_generator(self) -> torch.Generator:
        if self.generator is not None:
            return self.generator
        # CPU generator, as diffusers does: one seed gives one image on any device
        return torch.Generator("cpu").manual_seed(int(self.seed or 0))

    def noise_generator(self) -> torch.Generator | None:
        """The generator of the unconditional embedding's noise (None without noise): its own, seeded like the
        latents' (the given generator's initial seed, else ``seed``), so that noise leaves the latents alone."""
        if not self.noise:
            return None
        seed = self.generator.initial_seed() if self.generator is not None else int(self.seed or 0)
        return torch.Generator("cpu").manual_seed(seed)

    def id_token_groups(self) -> int:
        """How many 16-token groups the identity takes: the rows of a concatenated embedding, else 1."""
        if self.people or self.face_embedding is None:
            return 1
        return int(np.prod(np.shape(self.face_embedding))) // EMBEDDING_VALUES


def _rows(values: list[float], counts: list[int], copies: int, like: torch.Tensor,
          always: bool = False) -> float | torch.Tensor:
    """Per-row scale for a batch laid out as ``copies`` blocks of requests; a float when all rows agree (unless
    ``always``: compiled serving wants one graph input whatever the values)."""
    if len(set(values)) == 1 and not always:
        return values[0]
    per_block = [v for v, n in zip(values, counts) for _ in range(n)]
    return torch.tensor(per_block * copies, device=like.device, dtype=like.dtype)


def _pad_text(embeds: list[torch.Tensor], always: bool = False,
              bucket: Callable[[int], int] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Concatenate text embeddings over the batch; when lengths differ (weighted prompts), pad with zeros and
    return the (rows, tokens) attention mask that hides the padding. Equal lengths: no mask, as before (unless
    ``always``, for compiled serving: a mask, and the length padded to ``bucket(longest)``)."""
    longest = max(e.shape[1] for e in embeds)
    if bucket is not None:
        longest = bucket(longest)
    if all(e.shape[1] == longest for e in embeds) and not always:
        return torch.cat(embeds), None
    padded = [F.pad(e, (0, 0, 0, longest - e.shape[1])) for e in embeds]
    mask = torch.cat([(torch.arange(longest) < e.shape[1]).repeat(e.shape[0], 1) for e in embeds])
    return torch.cat(padded), mask.to(device=embeds[0].device, dtype=embeds[0].dtype)


def _resized(region: torch.Tensor, like: torch.Tensor, mode: str) -> torch.Tensor:
    """(rows, H, W) masks resized to a residual's (rows, C, h, w) resolution, as (rows, 1, h, w)."""
    return F.interpolate(region[:, None], like.shape[-2:], mode=mode).to(like.dtype)


class _Abandoned(Exception):
    """A request's caller gave up during its VAE decode (``still_wanted``): the decode stops at the next block."""


def _wanted_check(still_wanted, position: int) -> Callable[[], None] | None:
    if still_wanted is None:
        return None

    def check() -> None:
        wanted = still_wanted()
        if wanted is not None and position not in set(wanted):
            raise _Abandoned

    return check


def _scale(tensor: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
    if isinstance(scale, torch.Tensor):
        return tensor * scale.view(-1, *([1] * (tensor.ndim - 1)))
    return tensor * scale


class InstantIDPipeline(StableDiffusionXLControlNetPipeline):
    """SDXL + IdentityNet (``controlnet``) + the identity adapter (Resampler and decoupled attention)."""

    image_proj_model: Resampler | None = None

    # Extra ControlNets and LoRAs are not diffusers components (from_pretrained knows nothing of them), so they
    # live in per-instance dicts created on first use.
    @property
    def extra_controlnets(self) -> dict[str, ControlNetModel]:
        return self.__dict__.setdefault("_extra_controlnets", {})

    @property
    def loras(self) -> dict[str, str]:
        """Loaded LoRA adapters: name -> the reference they were loaded from."""
        return self.__dict__.setdefault("_loras", {})

    # -- loading ---------------------------------------------------------------------------------------
    def load_identity_adapter(self, state: dict) -> None:
        """Install ``ip-adapter.bin``'s two parts: ``image_proj`` (Resampler) and ``ip_adapter`` (attention)."""
        if "image_proj" not in state or "ip_adapter" not in state:
            raise ValueError("identity adapter weights must hold 'image_proj' and 'ip_adapter'")
        resampler = Resampler.from_state_dict(state["image_proj"])
        if resampler.proj_out.out_features != self.unet.config.cross_attention_dim:
            raise ValueError(
                f"adapter emits {resampler.proj_out.out_features}-d tokens, the UNet attends over "
                f"{self.unet.config.cross_attention_dim}-d: not an adapter for this base model"
            )
        self.image_proj_model = resampler.to(device=self.unet.device, dtype=self.unet.dtype)
        install_identity_adapter(self.unet, state["ip_adapter"], resampler.num_queries)

    def add_controlnet(self, name: str, model: ControlNetModel) -> None:
        self.extra_controlnets[name] = model.to(device=self.unet.device, dtype=self.unet.dtype)

    def load_lora(self, name: str, ref: str) -> None:
        """Load LoRA weights (file, directory, hub id or s3://) as adapter ``name``; inactive until selected."""
        from .weights import resolve

        path = resolve(ref)
        kwargs = {"weight_name": path.name} if path.is_file() else {}
        try:
            self.load_lora_weights(str(path.parent if path.is_file() else path), adapter_name=name, **kwargs)
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise WeightsError(f"cannot load LoRA {name!r} from {ref}: {exc}".splitlines()[0]) from exc
        self.loras[name] = ref
        self.set_loras({})

    def set_loras(self, scales: dict[str, float]) -> None:
        """Activate exactly the named LoRAs at the given scales (an empty dict turns LoRA off)."""
        known = self.loras
        unknown = set(scales) - set(known)
        if unknown:
            raise InvalidParameterError("loras", f"unknown LoRA {sorted(unknown)}; loaded: {sorted(known)}")
        if not known:
            return
        self.__dict__["_active_loras"] = tuple(sorted(scales.items()))  # part of a compiled UNet graph's key
        if scales:
            self.enable_lora()
            self.set_adapters(list(scales), adapter_weights=list(scales.values()))
        else:
            self.disable_lora()

    def to(self, *args, **kwargs):
        super().to(*args, **kwargs)
        for module in [self.image_proj_model, *self.extra_controlnets.values()]:
            if module is not None:
                module.to(*args, **kwargs)
        return self

    # -- the official call signature -----------------------------------------------------------------
    @torch.no_grad()
    def __call__(
        self,
        prompt: str = "",
        *,
        image_embeds,
        image: PIL.Image.Image,
        negative_prompt: str | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = defaults.STEPS,
        guidance_scale: float = defaults.GUIDANCE_SCALE,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | None = None,
        ip_adapter_scale: float = defaults.IP_ADAPTER_SCALE,
        controlnet_conditioning_scale: float = defaults.CONTROLNET_CONDITIONING_SCALE,
        control_guidance_start: float = 0.0,
        control_guidance_end: float = 1.0,
        scheduler: str = "default",
        controls: list[ControlInput] = (),
        output_type: str = "pil",
        callback: Callable[[int, int], None] | None = None,
        prompt_weighting: str = prompt_weighting.DEFAULT,
        control_mask: PIL.Image.Image | None = None,
        init_image: PIL.Image.Image | None = None,
        strength: float = defaults.IMG2IMG_STRENGTH,
    ) -> StableDiffusionXLPipelineOutput:
        request = GenerationRequest(
            face_embedding=image_embeds,
            keypoint_image=image,
            prompt=prompt,
            negative_prompt=negative_prompt,
            num_images=num_images_per_prompt,
            generator=generator,
            guidance_scale=guidance_scale,
            ip_adapter_scale=ip_adapter_scale,
            controlnet_conditioning_scale=controlnet_conditioning_scale,
            control_guidance_start=control_guidance_start,
            control_guidance_end=control_guidance_end,
            controls=list(controls),
            prompt_weighting=prompt_weighting,
            control_mask=control_mask,
            init_image=init_image,
            strength=strength,
        )
        width = width or image.size[0]
        height = height or image.size[1]
        images = self.generate([request], width=width, height=height, steps=num_inference_steps,
                               scheduler=scheduler, output_type=output_type, callback=callback)[0]
        return StableDiffusionXLPipelineOutput(images=images)

    # -- batched generation --------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        requests: list[GenerationRequest],
        *,
        width: int | None = None,
        height: int | None = None,
        steps: int = defaults.STEPS,
        scheduler: str = "default",
        output_type: str = "pil",
        callback: Callable[[int, int], Iterable[int] | None] | None = None,
        still_wanted: Callable[[], Iterable[int] | None] | None = None,
    ) -> list:
        """Run ``requests`` as one denoising batch; returns one list of images per request.

        ``callback(step, total)`` runs after each step. It may return the indices (into ``requests``) of the
        requests to go on with: the others' rows leave the batch before the next step (their callers gave up)
        and their entry in the result is None; the rest denoise exactly as they would have.
        ``still_wanted()`` is asked the same (None: all) during the VAE decode, before each of the decoder's
        blocks: a request whose caller gave up stops within its decode (a 2048x2048 decode takes ~25 s on CPU).
        Size defaults to the first request's keypoint image (the pose canvas). img2img requests must share one
        strength, and a batch is all img2img or none (their timesteps differ)."""
        # 1. Check inputs
        identities = [r.identities() for r in requests]
        if identities and identities[0][0][1] is not None:
            width = width or identities[0][0][1].size[0]
            height = height or identities[0][0][1].size[1]
        self._check(requests, width, height, steps)
        device, dtype = self._execution_device, self.unet.dtype
        cfg = requests[0].guidance_scale > 1 and self.unet.config.time_cond_proj_dim is None
        copies = 2 if cfg else 1
        # Compiled serving (optimize.ServingPlan): the batch is padded to a bucket with a copy of the first
        # request whose images are discarded, so every batch has one of a few shapes.
        serving = getattr(self, "serving", None)
        n_real = len(requests)
        if serving is not None:
            rows = copies * sum(r.num_images for r in requests)
            bucket = serving.plan.bucket(rows)
            if bucket is not None and bucket > rows and (bucket - rows) % copies == 0:
                requests = [*requests, dataclasses.replace(requests[0], num_images=(bucket - rows) // copies,
                                                           generator=None, seed=0)]
                identities.append(identities[0])
        counts = [r.num_images for r in requests]
        # identity slots: every row has as many as the request with the most people; a request with fewer has
        # zero ID tokens and an empty region in the others, and IdentityNet skips its rows there
        slots = max(len(i) for i in identities)
        # ID tokens per identity slot: the Resampler's 16, times the photos of a concatenated identity (one slot)
        per_slot = self.image_proj_model.num_queries * requests[0].id_token_groups()

        # 2. Encode prompts (text) and faces (ID tokens), per request, in the reference's [uncond, cond] order
        neg_embeds, pos_embeds, neg_pooled, pos_pooled, neg_ids, pos_ids = [], [], [], [], [], []
        for r in requests:
            pe, ne, pp, npool = self._encode_text(r, device, cfg)
            pos_embeds.append(pe), pos_pooled.append(pp)
            if cfg:
                neg_embeds.append(ne), neg_pooled.append(npool)
            uncond_ids, cond_ids = self._encode_faces([e for e, _, _ in identities[len(pos_ids)]], slots,
                                                      r.num_images, cfg, device, dtype, r.noise, r.noise_generator())
            pos_ids.append(cond_ids)
            if cfg:
                neg_ids.append(uncond_ids)
        prompt_embeds, text_mask = _pad_text(neg_embeds + pos_embeds, always=serving is not None,
                                             bucket=serving.plan.text_bucket if serving is not None else None)
        pooled = torch.cat(neg_pooled + pos_pooled)
        id_tokens = torch.cat(neg_ids + pos_ids)

        # 3. Prepare control images: IdentityNet's keypoints (one batch per identity slot), then each extra
        # ControlNet's
        blank = PIL.Image.new("RGB", (width, height))
        identity_images = [
            self._control_batch([ids[k][1] if k < len(ids) else blank for ids in identities], counts, copies,
                                width, height, self.controlnet.dtype)
            for k in range(slots)
        ]
        slot_rows = self._slot_rows(identities, counts, copies, slots, device, serving is not None)
        extra_names = [c.name for c in requests[0].controls]
        extra_images = {
            name: self._control_batch([r.controls[k].image for r in requests], counts, copies, width, height,
                                      self.extra_controlnets[name].dtype)
            for k, name in enumerate(extra_names)
        }

        region = self._region_batch(identities, slots, counts, copies, width, height, device, prompt_embeds.dtype,
                                    always=serving is not None)

        # 4. Prepare timesteps: one scheduler per request (their state advances independently); img2img keeps the
        # last ``strength`` share of them
        schedulers = [make_scheduler(scheduler, self.scheduler.config) for _ in requests]
        img2img = requests[0].init_image is not None
        begin = (steps - min(int(steps * requests[0].strength), steps)) * schedulers[0].order if img2img else 0
        for s in schedulers:
            s.set_timesteps(steps, device=device)
            if img2img and hasattr(s, "set_begin_index"):
                s.set_begin_index(begin)
        timesteps = schedulers[0].timesteps[begin:]

        # 5. Prepare latents from each request's own CPU generator
        generators = [r.make_generator() for r in requests]
        shape_hw = (self.unet.config.in_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        if img2img:
            latents = [self._noised_init(r, g, s, timesteps[:1], width, height, device, prompt_embeds.dtype)
                       for r, g, s in zip(requests, generators, schedulers)]
        else:
            latents = [
                randn_tensor((r.num_images, *shape_hw), generator=g, device=device, dtype=prompt_embeds.dtype)
                * s.init_noise_sigma
                for r, g, s in zip(requests, generators, schedulers)
            ]
        step_kwargs = [self.prepare_extra_step_kwargs(g, 0.0) for g in generators]

        # 6. SDXL micro-conditioning and per-row scales
        text_proj_dim = int(pooled.shape[-1]) if self.text_encoder_2 is None else \
            self.text_encoder_2.config.projection_dim
        time_ids = self._get_add_time_ids((height, width), (0, 0), (height, width), dtype=prompt_embeds.dtype,
                                          text_encoder_projection_dim=text_proj_dim)
        added = {"text_embeds": pooled.to(device), "time_ids": time_ids.to(device).repeat(pooled.shape[0], 1)}
        unet_context = torch.cat([prompt_embeds, id_tokens], dim=1)
        timestep_cond = self._timestep_cond(requests, device, prompt_embeds.dtype)
        set_identity_scale(self.unet, _rows([r.ip_adapter_scale for r in requests], counts, copies, id_tokens,
                                            always=serving is not None))
        set_identity_region(self.unet, region)
        set_identity_tokens(self.unet, per_slot)
        encoder_mask = None
        if text_mask is not None:  # prompts of unequal length: padding is masked out; ID tokens always attended
            encoder_mask = torch.cat([text_mask, text_mask.new_ones(text_mask.shape[0], id_tokens.shape[1])], 1)
        identity_window = [(r.controlnet_conditioning_scale, r.control_guidance_start, r.control_guidance_end)
                           for r in requests]
        extra_windows = {name: [(r.controls[k].scale, r.controls[k].start, r.controls[k].end) for r in requests]
                         for k, name in enumerate(extra_names)}

        # 7. Denoise. Every per-step value is made here, once per batch (and again only when rows leave): the step
        # loop copies nothing from the host to the device.
        n = len(timesteps)
        n_requests = len(requests)
        active = list(range(n_requests))  # positions in the caller's list of the requests still in the batch
        gone: set[int] = set()  # compiled serving: requests given up whose rows stay in the batch (same shape)

        def step_scales():
            like = id_tokens
            return (self._step_scales(identity_window, n, counts, copies, like, serving is not None),
                    {name: self._step_scales(w, n, counts, copies, like, serving is not None)
                     for name, w in extra_windows.items()})

        identity_steps, extra_steps = step_scales()
        masks: dict = {}  # region masks at each residual's resolution, made at the first step
        with self.progress_bar(total=n) as bar:
            for i, t in enumerate(timesteps):
                if serving is not None and serving.cudagraphs:
                    torch.compiler.cudagraph_mark_step_begin()  # the previous step's graph outputs are free
                scaled = [s.scale_model_input(x, t) for s, x in zip(schedulers, latents)]
                model_input = torch.cat(scaled * copies)
                down, mid = self._identity_net(model_input, t, id_tokens, identity_images, added, region, slot_rows,
                                               identity_steps[i], per_slot, masks)
                for name in extra_names:
                    d2, m2 = self._control(self.extra_controlnets[name], model_input, t, id_tokens[:, :per_slot],
                                           extra_images[name], added, extra_steps[name][i])
                    down = [a + b for a, b in zip(down, d2)]
                    mid = mid + m2
                noise = self.unet(
                    model_input, t, encoder_hidden_states=unet_context, timestep_cond=timestep_cond,
                    down_block_additional_residuals=down, mid_block_additional_residual=mid,
                    added_cond_kwargs=added, encoder_attention_mask=encoder_mask, return_dict=False,
                )[0]
                latents = self._step(noise, t, latents, requests, schedulers, step_kwargs, counts, cfg)
                bar.update()
                wanted = callback(i + 1, n) if callback is not None else None
                if wanted is None:
                    continue
                wanted = set(wanted)
                if serving is not None:  # the rows stay (the shape is a compiled graph's); results are dropped
                    gone |= {position for position in active if position not in wanted}
                    if all(position in gone for position in active if position < n_real):
                        set_identity_region(self.unet, None)
                        return [None] * n_real
                    continue
                keep = [k for k, position in enumerate(active) if position in wanted]
                if not keep:
                    set_identity_region(self.unet, None)
                    set_identity_tokens(self.unet, None)
                    return [None] * n_requests
                if len(keep) < len(active):
                    # drop the other requests' rows from every per-row input (layout: copies x requests x images)
                    offsets = np.cumsum([0] + counts)
                    rows = torch.tensor([c * offsets[-1] + offsets[k] + j for c in range(copies) for k in keep
                                         for j in range(counts[k])], device=unet_context.device)
                    active, requests, counts, latents, schedulers, step_kwargs, identities = (
                        [seq[k] for k in keep]
                        for seq in (active, requests, counts, latents, schedulers, step_kwargs, identities))
                    unet_context, id_tokens = unet_context[rows], id_tokens[rows]
                    identity_images = [image[rows] for image in identity_images]
                    slot_rows = self._slot_rows(identities, counts, copies, slots, device)
                    masks.clear()
                    extra_images = {name: image[rows] for name, image in extra_images.items()}
                    added = {key: value[rows] for key, value in added.items()}
                    if timestep_cond is not None:  # guidance-embedding models run unguided: one copy
                        timestep_cond = timestep_cond[rows]
                    if encoder_mask is not None:
                        encoder_mask = encoder_mask[rows]
                    if region is not None:
                        region = region[rows]
                        set_identity_region(self.unet, region)
                    identity_window = [identity_window[k] for k in keep]
                    extra_windows = {name: [w[k] for k in keep] for name, w in extra_windows.items()}
                    identity_steps, extra_steps = step_scales()
                    set_identity_scale(self.unet, _rows([r.ip_adapter_scale for r in requests], counts, copies,
                                                        id_tokens))

        set_identity_region(self.unet, None)
        set_identity_tokens(self.unet, None)

        # 8. Decode, per request (a request's images are decoded together, as the reference does)
        results: list = [None] * n_requests
        for position, x in zip(active, latents):
            if position >= n_real or position in gone:  # pad rows and given-up requests are not decoded
                continue
            if output_type == "latent":
                results[position] = x
                continue
            try:
                results[position] = self._decode(x, output_type, _wanted_check(still_wanted, position))
            except _Abandoned:
                results[position] = None
        return results[:n_real]

    # -- steps of generate ---------------------------------------------------------------------------
    def _check(self, requests, width, height, steps) -> None:
        if not requests:
            raise InvalidParameterError("requests", "at least one request is needed")
        if self.image_proj_model is None:
            raise RuntimeError("identity adapter not loaded: call load_identity_adapter first")
        for name, value in (("width", width), ("height", height)):
            if value <= 0 or value % 8:
                raise InvalidParameterError(name, f"must be a positive multiple of 8, got {value}")
        if steps < 1:
            raise InvalidParameterError("steps", f"must be at least 1, got {steps}")
        first = requests[0]
        cfg = first.guidance_scale > 1
        names = [c.name for c in first.controls]
        for r in requests:
            if (r.guidance_scale > 1) != cfg:
                raise InvalidParameterError("guidance_scale", "a batch cannot mix guided and unguided requests")
            if [c.name for c in r.controls] != names:
                raise InvalidParameterError("controls", "a batch must use the same extra ControlNets")
            if r.num_images < 1:
                raise InvalidParameterError("num_images", "must be at least 1")
            if r.people:
                if r.face_embedding is not None or r.keypoint_image is not None or r.control_mask is not None:
                    raise InvalidParameterError("people", "replaces face_embedding, keypoint_image and "
                                                          "control_mask: give one or the other")
                check_people(r.people)
                if any(np.size(p.face_embedding) != EMBEDDING_VALUES for p in r.people):
                    raise InvalidParameterError("people", f"each person's embedding has {EMBEDDING_VALUES} values "
                                                          "(several photos of a person are averaged, not concatenated)")
            elif r.face_embedding is None or r.keypoint_image is None:
                raise InvalidParameterError("face_embedding", "a face embedding and a keypoint image, or people")
            else:
                shape = tuple(np.shape(r.face_embedding))
                if len(shape) not in (1, 2) or shape[-1] != EMBEDDING_VALUES or 0 in shape:
                    raise InvalidParameterError("face_embedding", f"must be ({EMBEDDING_VALUES},) or (photos, "
                                                                  f"{EMBEDDING_VALUES}), got shape {shape}")
            if r.id_token_groups() != first.id_token_groups():
                raise InvalidParameterError("face_embedding", "a batch must share one number of ID tokens (a "
                                                              "concatenated identity has 16 per photo)")
            if not 0 <= r.noise <= 1:
                raise InvalidParameterError("noise", f"must be in [0, 1], got {r.noise}")
            for c in r.controls:
                if c.name not in self.extra_controlnets:
                    raise InvalidParameterError("controls", f"unknown ControlNet {c.name!r}")
            if r.prompt_weighting not in prompt_weighting.MODES:
                raise InvalidParameterError("prompt_weighting", f"must be one of {list(prompt_weighting.MODES)}, "
                                                                f"got {r.prompt_weighting!r}")
            if (r.init_image is None) != (first.init_image is None):
                raise InvalidParameterError("init_image", "a batch cannot mix img2img and text-to-image requests")
            if r.init_image is not None:
                if not 0 < r.strength <= 1:
                    raise InvalidParameterError("strength", f"must be in (0, 1], got {r.strength}")
                if r.strength != first.strength:
                    raise InvalidParameterError("strength", "a batch must share one strength (its timesteps)")
                if min(int(steps * r.strength), steps) < 1:
                    raise InvalidParameterError("strength", f"{r.strength} of {steps} steps leaves no step to run")

    def _encode_text(self, r: GenerationRequest, device, cfg: bool):
        """(prompt, negative, pooled, negative pooled) for one request, one row per image."""
        if r.prompt_weighting == "lpw":
            pe, ne, pp, npool = prompt_weighting.encode_weighted_prompt(self, r.prompt, r.negative_prompt, device)
            n = r.num_images
            return pe.repeat(n, 1, 1), ne.repeat(n, 1, 1), pp.repeat(n, 1), npool.repeat(n, 1)
        return self.encode_prompt(r.prompt, device=device, num_images_per_prompt=r.num_images,
                                  do_classifier_free_guidance=cfg, negative_prompt=r.negative_prompt)

    @staticmethod
    def _region_batch(identities, slots, counts, copies, width, height, device, dtype,
                      always: bool = False) -> torch.Tensor | None:
        """Per-row control masks, 1 = face, from each mask's first channel: (rows, H, W) with one identity slot
        (ones for rows without a mask; None when no row has one, unless ``always``), (rows, slots, H, W) with
        several (a slot a request has no identity in is zeros)."""
        if slots == 1 and not always and all(ids[0][2] is None for ids in identities):
            return None

        def as_tensor(image):
            if image is None:
                return torch.ones(height, width)
            image = image.convert("RGB")
            if image.size != (width, height):
                image = image.resize((width, height), PIL.Image.BILINEAR)
            return torch.from_numpy(np.array(image)[:, :, 0]).float() / 255.0

        masks = []
        for ids, n in zip(identities, counts):
            per_slot = [as_tensor(mask) for _, _, mask in ids]
            mask = per_slot[0] if slots == 1 else torch.stack(
                per_slot + [torch.zeros(height, width)] * (slots - len(per_slot)))
            masks += [mask] * n
        return torch.stack(masks * copies).to(device=device, dtype=dtype)

    def _noised_init(self, r, generator, scheduler, first_t, width, height, device, dtype) -> torch.Tensor:
        """img2img latents: the init image VAE-encoded (a sample, from the request's generator) and noised at the
        first kept timestep, as diffusers 0.27's SDXL ControlNet img2img ``prepare_latents``."""
        image = self.image_processor.preprocess(r.init_image.convert("RGB"), height=height, width=width)
        vae = self.vae
        with self._vae_run() as vae_dtype:
            init = vae.encode(image.to(device=device, dtype=vae_dtype)).latent_dist.sample(generator)
        init = (vae.config.scaling_factor * init.to(dtype)).repeat(r.num_images, 1, 1, 1)
        noise = randn_tensor(init.shape, generator=generator, device=device, dtype=dtype)
        return scheduler.add_noise(init, noise, first_t.repeat(r.num_images))

    def _encode_faces(self, embeddings, slots, num_images, cfg, device, dtype, noise=0.0, generator=None):
        """ID tokens of a request's identities side by side, (rows, slots x tokens, dim) per branch; slots it
        has no identity for hold zeros (never attended: their region is empty)."""
        encoded = [self._encode_face(e, num_images, cfg, device, dtype, noise, generator) for e in embeddings]
        if slots == 1:
            return encoded[0]
        pad = torch.zeros_like(encoded[0][1])
        cond = torch.cat([c for _, c in encoded] + [pad] * (slots - len(encoded)), dim=1)
        uncond = torch.cat([u for u, _ in encoded] + [pad] * (slots - len(encoded)), dim=1) if cfg else None
        return uncond, cond

    @staticmethod
    def _slot_rows(identities, counts, copies, slots, device, all_rows: bool = False) -> list[torch.Tensor | None]:
        """Per identity slot, the batch rows whose request has an identity there (None: all rows). ``all_rows``
        (compiled serving): every slot on every row, one shape; a row without that identity has zero ID tokens,
        a blank keypoint image and an all-zero region there, so it adds exactly nothing."""
        out: list[torch.Tensor | None] = [None]
        if all_rows:
            return out * slots
        offsets = np.cumsum([0] + counts)
        for k in range(1, slots):
            out.append(torch.tensor([c * offsets[-1] + offsets[q] + j for c in range(copies)
                                     for q, ids in enumerate(identities) if len(ids) > k
                                     for j in range(counts[q])], dtype=torch.long, device=device))
        return out

    def _identity_net(self, model_input, t, id_tokens, images, added, region, slot_rows, row_scale, per_slot,
                      masks: dict):
        """IdentityNet once per identity slot, on the rows that have that identity, with its own keypoint image
        and ID tokens; residuals masked (bilinear) to the slot's region and summed. The control mask of a
        single-identity request acts the same way, on IdentityNet only, as in the reference."""
        down = mid = None
        for k, rows in enumerate(slot_rows):
            if rows is not None and rows.numel() == 0:  # everybody with this many people has left the batch
                continue

            def pick(x, rows=rows):
                return x if rows is None else x[rows]

            scale = row_scale if not isinstance(row_scale, torch.Tensor) else pick(row_scale)
            d, m = self._control(self.controlnet, pick(model_input), t,
                                 pick(id_tokens[:, k * per_slot:(k + 1) * per_slot]), pick(images[k]),
                                 {key: pick(v) for key, v in added.items()}, scale)
            if region is not None:
                if k not in masks:  # once per batch: the same masks serve every step
                    mask = pick(region if region.ndim == 3 else region[:, k])
                    masks[k] = [_resized(mask, x, "bilinear") for x in (*d, m)]
                d = [x * w for x, w in zip(d, masks[k])]
                m = m * masks[k][-1]
            if rows is None and down is not None:  # compiled serving runs every slot on every row
                down, mid = [a + b for a, b in zip(down, d)], mid + m
            elif rows is None:
                down, mid = d, m
            else:
                down = [a.index_add(0, rows, b) for a, b in zip(down, d)]
                mid = mid.index_add(0, rows, m)
        return down, mid

    def _encode_face(self, embedding, num_images, cfg, device, dtype, noise=0.0, generator=None):
        """ID tokens for one face; the unconditional branch projects an all-zero embedding, or with ``noise``
        ``noise * U[0, 1)`` drawn from ``generator`` (ComfyUI_InstantID's noise injection). An embedding of several
        rows (combine "concat") goes through the Resampler one row at a time; their tokens are laid side by side."""
        if not isinstance(embedding, torch.Tensor):
            embedding = torch.from_numpy(np.asarray(embedding, dtype=np.float32))
        emb = embedding.to(device=device, dtype=dtype)
        emb = emb.reshape(-1, 1, self.image_proj_model.embedding_dim)  # one row per photo
        groups = emb.shape[0]
        if cfg:
            uncond = torch.zeros_like(emb) if not noise else (
                noise * torch.rand(emb.shape, generator=generator, dtype=torch.float32)).to(device=device, dtype=dtype)
            batch = torch.cat([uncond, emb])
        else:
            batch = emb
        tokens = self.image_proj_model(batch)  # (copies x groups, 16, dim)
        tokens = tokens.reshape(-1, groups * tokens.shape[1], tokens.shape[2])  # each copy's groups side by side
        tokens = tokens.repeat_interleave(num_images, dim=0)
        if cfg:
            return tokens[:num_images], tokens[num_images:]
        return None, tokens

    def _control_batch(self, images, counts, copies, width, height, dtype) -> torch.Tensor:
        prepared = [
            self.prepare_image(image=img, width=width, height=height, batch_size=n, num_images_per_prompt=n,
                               device=self._execution_device, dtype=dtype)
            for img, n in zip(images, counts)
        ]
        return torch.cat(prepared * copies)

    def _step_scales(self, windows, n, counts, copies, like, always) -> list[float | torch.Tensor]:
        """Each step's conditioning scales: a float per step when all rows agree (and not ``always``), else one
        (steps, rows) tensor made in one copy, indexed per step (a view)."""
        per_step = [self._keep(windows, i, n) for i in range(n)]
        if not always and all(len(set(v)) == 1 for v in per_step):
            return [v[0] for v in per_step]
        table = torch.tensor([[v for v, c in zip(values, counts) for _ in range(c)] * copies for values in per_step],
                             device=like.device, dtype=like.dtype)
        return list(table.unbind(0))

    @staticmethod
    def _keep(windows, i: int, n: int) -> list[float]:
        """Conditioning scale of each request at step i: zero outside its [start, end] window."""
        return [scale * (1.0 - float(i / n < start or (i + 1) / n > end)) for scale, start, end in windows]

    def _control(self, net, model_input, t, id_tokens, image, added, row_scale):
        down, mid = net(
            model_input, t, encoder_hidden_states=id_tokens, controlnet_cond=image,
            conditioning_scale=row_scale if isinstance(row_scale, float) else 1.0,
            added_cond_kwargs=added, return_dict=False,
        )
        if isinstance(row_scale, torch.Tensor):
            down = [_scale(d, row_scale) for d in down]
            mid = _scale(mid, row_scale)
        return down, mid

    def _timestep_cond(self, requests, device, dtype):
        dim = self.unet.config.time_cond_proj_dim
        if dim is None:
            return None
        guidance = torch.cat([torch.tensor(r.guidance_scale - 1).repeat(r.num_images) for r in requests])
        return self.get_guidance_scale_embedding(guidance, embedding_dim=dim).to(device=device, dtype=dtype)

    @staticmethod
    def _step(noise, t, latents, requests, schedulers, step_kwargs, counts, cfg):
        total = sum(counts)
        uncond, cond = (noise[:total], noise[total:]) if cfg else (None, noise)
        out, start = [], 0
        for r, s, kw, x, n in zip(requests, schedulers, step_kwargs, latents, counts):
            pred = cond[start:start + n]
            if cfg:
                u = uncond[start:start + n]
                pred = u + r.guidance_scale * (pred - u)
            out.append(s.step(pred, t, x, **kw, return_dict=False)[0])
            start += n
        return out

    def _decode(self, latents: torch.Tensor, output_type: str, check: Callable[[], None] | None = None):
        vae = self.vae
        hooks = []
        if check is not None:
            check()
        # checks inside the decoder's forward, when it runs eagerly (CPU: seconds per block); a compiled decoder
        # (optimize.py, fullgraph) cannot call back into Python mid-graph, and decodes in well under a second
        if check is not None and not hasattr(vae.decoder, "_eager_forward"):
            decoder = vae.decoder
            blocks = [decoder.mid_block, *decoder.up_blocks, decoder.conv_out]
            blocks += [r for up in decoder.up_blocks for r in getattr(up, "resnets", [])]
            hooks = [b.register_forward_pre_hook(lambda module, args: check()) for b in blocks if b is not None]
        try:
            with self._vae_run() as vae_dtype:
                image = vae.decode(latents.to(vae_dtype) / vae.config.scaling_factor, return_dict=False)[0]
        finally:
            for hook in hooks:
                hook.remove()
        return self.image_processor.postprocess(image, output_type=output_type)

    @contextlib.contextmanager
    def _vae_run(self):
        """The dtype the VAE runs in; inputs are cast to it. The VAE keeps the dtype it was loaded in
        (loading.pick_vae_dtype, optimize's ``fp16_vae``): a request never recasts it, which would race with
        other threads and invalidate compiled graphs. Only a float16 VAE that overflows in float16
        (``force_upcast``, a layout neither the loader nor optimize makes) is upcast for the call, as diffusers'
        own pipelines do, and put back in float16 after it."""
        vae = self.vae
        dtype = next(iter(vae.post_quant_conv.parameters())).dtype
        if not (dtype == torch.float16 and vae.config.force_upcast):
            yield dtype
            return
        vae.to(dtype=torch.float32)
        try:
            yield torch.float32
        finally:
            vae.to(dtype=torch.float16)
