"""Request and response models of the HTTP API and of the Python handle client.

Request models carry their bounds in the schema (``Field(ge=..., le=...)``), so ``/docs`` and
``/openapi.json`` publish the limits the service enforces. The bounds come from ``AppArgs.limits``: the
Ingress builds its own classes with ``build_models(args)``. The module-level ``GenerateRequest`` and
``IdentityCreateRequest`` are built from the default limits and accept any model/style name; they are
what a Python client constructs. The service re-validates every request against its configured bounds.

This module imports no torch: the Ingress stays light.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from functools import lru_cache
from typing import Annotated, Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, WithJsonSchema, field_validator, model_validator

from instantid import defaults
from instantid.defaults import PROMPT_WEIGHTINGS

from deployments.config import AppArgs, Limits
from deployments.errors import INVALID_PARAMETER
from deployments.ingress.identities import ID_PATTERN

# Mirrors instantid.schedulers.NAMES (importing that module pulls in diffusers and torch); a test keeps
# the two equal.
SCHEDULERS = ("default", "euler", "euler_a", "dpmpp_2m_karras", "lcm")
OUTPUT_FORMATS = ("png", "jpeg", "webp")
DELIVERIES = ("inline", "s3")
MAX_SEED = defaults.MAX_SEED
MAX_LORAS = 8
MAX_NAME_CHARS = 128  # a LoRA name (a key in ``loras``)
MAX_IDENTITY_RETRIES = 3  # regeneration rounds one request may ask for (each bounded by its deadline too)
MAX_LIST_LIMIT = 1000  # identities one list call returns at most (HTTP ``?limit=`` and the handle alike)

def list_limit(value: Any) -> int:
    """A list call's ``limit`` as given by any caller: an integer in 1..MAX_LIST_LIMIT, else a 422 naming it."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_LIST_LIMIT:
        raise INVALID_PARAMETER(f"limit: must be an integer from 1 to {MAX_LIST_LIMIT}",
                           field="limit")
    return value


_DOC_IMAGE = "Base64 image (JPEG, PNG or WebP; a data: URL prefix is accepted)."
# An image as base64 text, with the schema saying what the Ingress's decoding accepts (400 ``invalid_base64`` /
# ``invalid_image`` otherwise; the checks stay in the Ingress, the schema only publishes them): an optional
# data: URL header, whitespace anywhere, complete padded quartets, at least one (an empty image is refused).
_B64 = r"\s*[A-Za-z0-9+/]"
BASE64_IMAGE_PATTERN = (rf"^\s*(?:data:[^,]*,)?(?:{_B64 * 4})*(?:{_B64 * 4}|{_B64 * 3}\s*=|{_B64 * 2}\s*=\s*=)\s*$")
Base64Image = Annotated[str, WithJsonSchema({"type": "string", "minLength": 1, "pattern": BASE64_IMAGE_PATTERN})]

def _given(name: str, schema: dict) -> dict:
    return {"required": [name], "properties": {name: schema}}


# The generate request's rules across fields, in its schema as the validators below enforce them (422): exactly
# one identity source (photos, a stored identity or people); people go without enhance_face_region and
# min_similarity; retry_below_threshold needs min_similarity, which needs identity_score.
GENERATE_RULES = {
    "oneOf": [_given("face_images", {"type": "array"}), _given("identity_id", {"type": "string"}),
              _given("people", {"type": "array"})],
    "allOf": [
        {"if": _given("people", {"type": "array"}),
         "then": {"properties": {"enhance_face_region": {"enum": [False, None]}, "min_similarity": {"type": "null"}}}},
        {"if": _given("retry_below_threshold", {"type": "integer", "minimum": 1}),
         "then": _given("min_similarity", {"type": "number"})},
        {"if": _given("min_similarity", {"type": "number"}),
         "then": {"properties": {"identity_score": {"const": True}}}},
    ],
}

# A person's own rules (422): exactly one identity source, exactly one placement.
PERSON_RULES = {"allOf": [
    {"oneOf": GENERATE_RULES["oneOf"][:2]},
    {"oneOf": [_given("face_index", {"type": "integer"}), _given("box", {"type": "array"}),
               _given("keypoints", {"type": "array"})]},
]}
_PEOPLE_WITH = lambda rule: _given("people", {"type": "array", "contains": rule})  # noqa: E731
# ... and the request's around people: face_index needs pose_image; box and keypoints need width and height
# when there is no pose_image
GENERATE_RULES["allOf"] += [
    {"if": _PEOPLE_WITH(_given("face_index", {"type": "integer"})), "then": _given("pose_image", {"type": "string"})},
    # combine and face_index choose among face_images' photos and faces: a stored identity is already combined
    {"if": _given("identity_id", {"type": "string"}),
     "then": {"properties": {"face_index": {"type": "null"}, "combine": {"enum": [defaults.COMBINE, None]}}}},
    # pose_face_index picks a face of pose_image (the service's 422 names it)
    {"if": _given("pose_face_index", {"type": "integer"}), "then": _given("pose_image", {"type": "string"})},
    {"if": {"allOf": [_PEOPLE_WITH({"anyOf": [_given("box", {"type": "array"}), _given("keypoints", {"type": "array"})]}),
                      {"not": _given("pose_image", {"type": "string"})}]},
     "then": {"allOf": [_given("width", {"type": "integer"}), _given("height", {"type": "integer"})]}},
]


def default_size(canvas: tuple[int, int], limits: Limits) -> tuple[int, int]:
    """The output size when the request gives none: the pose (or init image) canvas, scaled with one factor
    into the service's side limits where it falls outside them, multiples of 8."""
    w, h = canvas
    scale = min(1.0, limits.max_side / max(w, h))
    scale = max(scale, min(limits.min_side / min(w, h), limits.max_side / max(w, h)))

    def side(v: float) -> int:
        v = int(min(max(v, limits.min_side), limits.max_side))
        return max(8, v - v % 8)

    return side(w * scale), side(h * scale)


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _person_model(limits: Limits):
    """One entry of ``people``: an identity and where it goes (instantid/people.py)."""
    Coordinate = Annotated[float, Field(ge=0, le=limits.max_side)]
    Point = Annotated[list[Coordinate], Field(min_length=2, max_length=2)]

    class Person(_Model):
        model_config = ConfigDict(extra="forbid", json_schema_extra=PERSON_RULES)

        face_images: Optional[list[Base64Image]] = Field(
            None, min_length=1, max_length=limits.max_faces,
            description=f"1 to {limits.max_faces} photos of this person ({_DOC_IMAGE}), embeddings averaged.")
        identity_id: Optional[str] = Field(None, pattern=ID_PATTERN, description="A stored identity.")
        face_index: Optional[int] = Field(None, ge=0, le=255, description="The face of pose_image this person "
                                                                         "takes, counted left to right from 0.")
        box: Optional[list[Coordinate]] = Field(
            None, min_length=4, max_length=4, description="x1, y1, x2, y2: the face box on the output canvas; the "
                                                          "person's own face keypoints are scaled into it.")
        keypoints: Optional[list[Point]] = Field(
            None, min_length=5, max_length=5, description="Five [x, y] keypoints on the output canvas (left eye, "
                                                          "right eye, nose, mouth corners).")

        @model_validator(mode="after")
        def _one_each(self):
            if (self.face_images is None) == (self.identity_id is None):
                raise ValueError("give exactly one of face_images and identity_id")
            if sum(x is not None for x in (self.face_index, self.box, self.keypoints)) != 1:
                raise ValueError("give exactly one of face_index, box and keypoints")
            return self

    return Person


def _generate_model(limits: Limits, models: tuple[str, ...] | None, styles: tuple[str, ...] | None,
                    max_timeout: float | None):
    """The /v1/generate request with bounds from ``limits`` (and enums when names are given)."""
    ModelName = Literal[models] if models else str  # type: ignore[valid-type]
    StyleName = Literal[styles] if styles else str  # type: ignore[valid-type]
    Scheduler = Literal[SCHEDULERS]  # type: ignore[valid-type]
    LoraScale = Annotated[float, Field(ge=-2.0, le=2.0)]
    LoraName = Annotated[str, StringConstraints(min_length=1, max_length=MAX_NAME_CHARS)]
    Person = _person_model(limits)

    class ControlRequest(_Model):
        """An extra spatial ControlNet beside IdentityNet (docs/api.md, "Controls")."""

        type: str = Field(min_length=1, max_length=MAX_NAME_CHARS,
                          description="A control type of the model (GET /v1/models `controls`): pose, canny and "
                                      "depth derive their map from a photo; other names take a ready map.")
        image: Optional[str] = Field(None, description=f"Photo to derive the map from. {_DOC_IMAGE} Absent (and no "
                                                       "map): the pose photo, else the first face photo.")
        map: Optional[str] = Field(None, description=f"A ready control map, used as is (resized to the output). "
                                                     f"{_DOC_IMAGE}")
        scale: Optional[float] = Field(None, ge=0.0, le=2.0, description="Conditioning scale. Absent: the demo's "
                                       "default for the type (pose 0.4, canny 0.3, depth 0.5; 1.0 otherwise).")
        start: float = Field(0.0, ge=0.0, le=1.0, description="Share of the steps before it acts.")
        end: float = Field(1.0, ge=0.0, le=1.0, description="Share of the steps after which it stops.")

    class GenerateRequest(_Model):
        """Generate images of the identity in ``face_images`` (or a stored ``identity_id``)."""

        model_config = ConfigDict(extra="forbid", json_schema_extra=GENERATE_RULES)

        face_images: Optional[list[Base64Image]] = Field(
            None, min_length=1, max_length=limits.max_faces,
            description=f"1 to {limits.max_faces} photos of one person: {_DOC_IMAGE} Their embeddings are "
                        "averaged; the keypoints of the first one set the pose unless pose_image is given. "
                        "Exactly one of face_images and identity_id.")
        identity_id: Optional[str] = Field(None, pattern=ID_PATTERN,
                                           description="A stored identity (POST /v1/identities).")
        people: Optional[list[Person]] = Field(  # type: ignore[valid-type]
            None, min_length=1, max_length=defaults.MAX_PEOPLE,
            description=f"1 to {defaults.MAX_PEOPLE} people in one picture, each confined to its face box grown by "
                        f"{defaults.REGION_MARGIN:.0%} per "
                        "side (regions may not overlap); instead of face_images/identity_id. face_index needs "
                        "pose_image; box and keypoints need width and height when there is no pose_image.")
        pose_image: Optional[Base64Image] = Field(None, description=f"Photo whose face keypoints set the pose. {_DOC_IMAGE}")
        prompt: str = Field("", max_length=limits.max_prompt_chars)
        negative_prompt: Optional[str] = Field(
            None, max_length=limits.max_prompt_chars,
            description="Absent: SDXL's zero negative embedding. A string, even empty, is encoded.")
        style: Optional[StyleName] = Field(None, description="A style preset applied to the prompts.")
        width: Optional[int] = Field(
            None, ge=limits.min_side, le=limits.max_side, multiple_of=8,
            description="Absent: the pose canvas's width (the init image's with init_image), as the official demo "
                        "does; another aspect than the pose's gets the face by cover-fit, never stretched.")
        height: Optional[int] = Field(None, ge=limits.min_side, le=limits.max_side, multiple_of=8,
                                      description="Absent: as width.")
        prompt_weighting: Literal[PROMPT_WEIGHTINGS] = Field(  # type: ignore[valid-type]
            defaults.PROMPT_WEIGHTING, description="lpw: the demo's (text:1.3) weighting without a 77-token limit; none: plain CLIP.")
        enhance_face_region: Optional[bool] = Field(
            None, description="Identity and pose act only inside the face box, the prompt rules the rest. "
                              "Absent: on (the face box is always known here), as the demo and Replicate.")
        init_image: Optional[Base64Image] = Field(None, description=f"img2img: the picture to restyle. {_DOC_IMAGE}")
        strength: float = Field(defaults.IMG2IMG_STRENGTH, gt=0.0, le=1.0, description="img2img: the share of the schedule that runs.")
        return_pose_image: bool = Field(False, description="Add the keypoint image IdentityNet got (base64 PNG).")
        steps: int = Field(min(defaults.STEPS, limits.max_steps), ge=1, le=limits.max_steps,
                           description="Denoising steps.")
        guidance_scale: float = Field(defaults.GUIDANCE_SCALE, ge=0.0, le=30.0,
                                      description="Classifier-free guidance; <= 1 disables it.")
        ip_adapter_scale: float = Field(defaults.IP_ADAPTER_SCALE, ge=0.0, le=2.0,
                                        description="Strength of the identity tokens.")
        controlnet_conditioning_scale: float = Field(defaults.CONTROLNET_CONDITIONING_SCALE, ge=0.0, le=2.0,
                                                     description="Strength of IdentityNet.")
        seed: Optional[int] = Field(None, ge=0, le=MAX_SEED, description="Random when absent; echoed back.")
        num_images: int = Field(1, ge=1, le=limits.max_num_images)
        scheduler: Scheduler = "default"
        base_model: Optional[ModelName] = Field(None, description="A configured model name (GET /v1/models); "
                                                                  "the default model when absent.")
        loras: dict[LoraName, LoraScale] = Field(default_factory=dict, max_length=MAX_LORAS,
                                            description="LoRA name -> scale, among the base model's LoRAs.")
        output_format: Literal[OUTPUT_FORMATS] = "png"  # type: ignore[valid-type]
        delivery: Literal[DELIVERIES] = Field(  # type: ignore[valid-type]
            "inline", description="inline: base64 in `images`; s3: presigned URLs in `urls`.")
        timeout_s: Optional[float] = Field(
            None, gt=0, le=max_timeout, description="Deadline for this request (at most the service's own); 504 "
                                                    "past it.")
        controls: list[ControlRequest] = Field(
            default_factory=list, max_length=limits.max_controls,
            description=f"At most {limits.max_controls} extra ControlNets (pose, canny, depth, ...) of the model.")
        safety_checker: bool = Field(True, description="false turns the output safety checker off for this "
                                                       "request, where the service allows it (else 422).")
        identity_score: bool = Field(True, description="Score each image's face against the identity "
                                                       "(`identity` in the response); false skips its CPU cost.")
        min_similarity: Optional[float] = Field(
            None, ge=-1.0, le=1.0, description="Images whose identity similarity is under this (or with no face) "
                                               "get `below_threshold: true`.")
        retry_below_threshold: int = Field(
            0, ge=0, le=MAX_IDENTITY_RETRIES,
            description="Regenerate images under min_similarity with new seeds, at most this many more rounds, "
                        "keeping the best of each; rounds stop at the request's deadline.")
        # ComfyUI_InstantID's controls; the defaults are the demo's behaviour
        combine: Literal[defaults.COMBINE_MODES] = Field(  # type: ignore[valid-type]
            defaults.COMBINE, description="How several face_images combine: average (the demo's mean raw "
                                          "embedding), norm_average (the mean of their unit vectors at their mean "
                                          "length: every photo pulls equally), concat (16 ID tokens per photo side "
                                          "by side). With face_images only.")
        noise: float = Field(defaults.NOISE, ge=0.0, le=1.0,
                             description="Uniform noise of this size in the unconditional identity embedding "
                                         "instead of zeros, drawn from the request's seed (ComfyUI_InstantID's "
                                         "noise, 0.35 there against the 'burnt' look). 0: the demo's.")
        det_size: Optional[int] = Field(
            None, ge=defaults.DET_SIZE_MIN, le=defaults.DET_SIZE_MAX, multiple_of=32,
            description=f"The face detector's input side for face_images and pose_image (absent: "
                        f"{defaults.DET_SIZE}); larger finds smaller faces, at a cost growing with its square.")
        det_retry: bool = Field(False, description="When no face is found, retry the detector 64 pixels smaller at "
                                                   "a time down to 192 (a face filling the photo), as "
                                                   "ComfyUI_InstantID does.")
        face_index: Optional[int] = Field(None, ge=0, le=255, description="Use the N-th face (0-based, left to "
                                          "right) of each face_images photo instead of the largest.")
        pose_face_index: Optional[int] = Field(None, ge=0, le=255, description="Take the keypoints from the N-th "
                                               "face (0-based, left to right) of pose_image instead of the "
                                               "largest.")

        # fields declared after ``people`` see it in info.data: the 422 names the field at fault
        @field_validator("people")
        @classmethod
        def _people_alone(cls, value, info):
            if value is not None and (info.data.get("face_images") is not None
                                      or info.data.get("identity_id") is not None):
                raise ValueError("replaces face_images and identity_id: give one or the other")
            return value

        @field_validator("enhance_face_region", "min_similarity")
        @classmethod
        def _not_with_people(cls, value, info):
            if value is not None and value is not False and info.data.get("people") is not None:
                raise ValueError("not with people (each person's region already confines its identity; identity "
                                 "scores are for one identity)")
            return value

        @field_validator("enhance_face_region", "return_pose_image", "safety_checker", "identity_score", "det_retry",
                         mode="before")
        @classmethod
        def _boolean(cls, value):
            # a form's text is "true" or "false"; pydantic would also take "0", "1", "yes", "on" for a boolean
            if isinstance(value, str) and value.lower() in ("true", "false"):
                return value.lower() == "true"
            if value is not None and not isinstance(value, bool):
                raise ValueError("a boolean: true or false")
            return value

        @field_validator("combine", "det_size", "det_retry", "face_index", "pose_face_index")
        @classmethod
        def _face_options_alone(cls, value, info):
            default = {"combine": defaults.COMBINE, "det_retry": False}.get(info.field_name)
            if value is None or value == default:
                return value
            if info.data.get("people") is not None:
                raise ValueError("not with people (a person's photos and the group photo use the defaults)")
            if info.field_name in ("combine", "face_index") and info.data.get("identity_id") is not None:
                raise ValueError("applies to face_images; a stored identity is already combined")
            return value

        @model_validator(mode="after")
        def _score_options(self):
            if self.retry_below_threshold and self.min_similarity is None:
                raise ValueError("retry_below_threshold needs min_similarity")
            if self.min_similarity is not None and not self.identity_score:
                raise ValueError("min_similarity needs identity_score")
            return self

        @model_validator(mode="after")
        def _one_source(self):
            # the multipart form and the handle client may bring face images as files; the Ingress then
            # checks "exactly one source" itself, so only a JSON body with both is refused here
            if self.face_images is not None and self.identity_id is not None:
                raise ValueError("give face_images or identity_id, not both")
            return self

    return GenerateRequest


def _identity_model(limits: Limits):
    class IdentityCreateRequest(_Model):
        """Store an identity: the mean embedding, the first photo's keypoints and a thumbnail."""

        face_images: list[Base64Image] = Field(min_length=1, max_length=limits.max_faces,
                                       description=f"1 to {limits.max_faces} photos of one person. {_DOC_IMAGE}")

    return IdentityCreateRequest


@dataclass(frozen=True)
class RequestModels:
    """The request classes bound to one deployment's limits (``GenerationService.schemas``)."""

    GenerateRequest: type[BaseModel]
    IdentityCreateRequest: type[BaseModel]


@lru_cache(maxsize=8)
def _build(limits_json: str, models: tuple[str, ...] | None, styles: tuple[str, ...] | None,
           max_timeout: float | None) -> RequestModels:
    limits = Limits.model_validate_json(limits_json)
    return RequestModels(_generate_model(limits, models, styles, max_timeout), _identity_model(limits))


def build_models(args: AppArgs) -> RequestModels:
    """Request models bound to a deployment's limits, model names, styles and timeout."""
    from instantid.styles import presets

    return _build(args.limits.model_dump_json(), tuple(m.name for m in args.models), tuple(sorted(presets())),
                  float(args.request_timeout_s))


_DEFAULTS = _build(Limits().model_dump_json(), None, None, None)
GenerateRequest = _DEFAULTS.GenerateRequest
IdentityCreateRequest = _DEFAULTS.IdentityCreateRequest


# -- responses -----------------------------------------------------------------------------------------
class FaceInfo(BaseModel):
    """A detected face, in the pixel coordinates of the image it came from."""

    source: str = Field(description="Which input: face_images[i], pose_image, or identity:<id>.")
    bbox: list[float] = Field(description="x1, y1, x2, y2.", min_length=4, max_length=4)
    score: float
    kps: list[list[float]] = Field(description="Left eye, right eye, nose, left and right mouth corner: [x, y].")
    image_size: list[int] = Field(description="Width and height of that image.")


class PlacedPerson(BaseModel):
    """One of ``people`` as generated, on the output canvas."""

    region: list[int] = Field(description="x1, y1, x2, y2 (end-exclusive): where this identity acts.",
                              min_length=4, max_length=4)
    keypoints: list[list[float]] = Field(description="The five keypoints IdentityNet drew for this person.")
    face: Optional[FaceInfo] = Field(None, description="The pose_image face it took (face_index).")


class Timings(BaseModel):
    """Seconds spent per stage of this request (stages that did not run are absent)."""

    model_config = ConfigDict(extra="allow")
    decode_s: Optional[float] = Field(None, description="Base64 decoding and image header checks (Ingress).")
    image_decode_s: Optional[float] = Field(None, description="Full decoding of the input photos (FaceAnalyzer).")
    face_analysis_s: Optional[float] = Field(None, description="Face detection + embedding (FaceAnalyzer).")
    identity_load_s: Optional[float] = None
    queue_s: Optional[float] = Field(None, description="Waiting in the Generator for a batch to start.")
    model_load_s: Optional[float] = Field(None, description="Loading a model this request needed.")
    denoise_s: Optional[float] = Field(None, description="Prompt/face encoding and the denoising loop.")
    vae_decode_s: Optional[float] = None
    control_maps_s: Optional[float] = Field(None, description="Deriving control maps from photos (Preprocessor).")
    safety_check_s: Optional[float] = Field(None, description="The safety checker on the batch's images; it runs "
                                                              "beside the next batch's denoising.")
    encode_s: Optional[float] = Field(None, description="Image encoding (png/jpeg/webp).")
    upload_s: Optional[float] = Field(None, description="S3 upload and URL presigning.")
    identity_score_s: Optional[float] = Field(None, description="Face analysis of the outputs (FaceAnalyzer).")
    identity_retry_s: Optional[float] = Field(None, description="Regenerating and rescoring images under "
                                                                "min_similarity.")
    total_s: float = 0.0
    batch_size: int = Field(1, description="Requests that shared this request's denoising batch.")
    batch_images: int = Field(1, description="Images generated by that batch.")
    identities: int = Field(1, description="Identities in this request (people: IdentityNet runs once per "
                                           "identity per step).")


class ImageIdentity(BaseModel):
    """How much one output image looks like the identity: the paper's FaceSim (docs/identity_score.md)."""

    similarity: Optional[float] = Field(None, description="Cosine of the ArcFace embeddings of the output's "
                                                          "largest face and of the identity (averaged); null "
                                                          "without a face.")
    face_found: bool
    bbox: Optional[list[float]] = Field(None, description="x1, y1, x2, y2 of that face in the output image.")
    per_reference: Optional[list[float]] = Field(None, description="Cosine with each of face_images (2 or more).")
    below_threshold: Optional[bool] = Field(None, description="Under min_similarity or no face (with "
                                                              "min_similarity).")
    seed: Optional[int] = Field(None, description="A regenerated image's own seed (it reproduces with "
                                                  "num_images 1); absent: the request's seed.")
    attempts: Optional[int] = Field(None, description="Images generated for this slot (retry_below_threshold).")


class GenerateResponse(BaseModel):
    request_id: str
    images: Optional[list[str]] = Field(None, description="Base64 images (delivery=inline).")
    urls: Optional[list[str]] = Field(None, description="Presigned S3 GET URLs (delivery=s3).")
    format: str
    width: int
    height: int
    seed: int
    model: str = Field(description="The base model that generated the images.")
    loras: dict[str, float] = Field(default_factory=dict)
    face: Optional[FaceInfo] = Field(None, description="The face whose keypoints set the pose (absent with "
                                                       "people).")
    people: Optional[list[PlacedPerson]] = Field(None, description="With people: where each one went.")
    pose_image: Optional[str] = Field(None, description="Base64 PNG of the keypoint image (return_pose_image).")
    identity: Optional[list[ImageIdentity]] = Field(None, description="Per image, in order: its identity score.")
    nsfw: Optional[list[bool]] = Field(None, description="Per image, in order: flagged by the safety checker (with "
                                                         "action blur, the image is blurred); absent when it is off.")
    timings: Timings

    def image_bytes(self) -> list[bytes]:
        """The inline images, decoded."""
        return [base64.b64decode(s) for s in self.images or []]


class IdentityResponse(BaseModel):
    identity_id: str
    created_at: str
    num_photos: int
    faces: list[FaceInfo]
    embedding_dim: int = 512
    thumbnail: Optional[str] = Field(None, description="Base64 JPEG crop of the first photo's face.")


class IdentitySummary(BaseModel):
    identity_id: str
    created_at: Optional[str] = None


class IdentityList(BaseModel):
    identities: list[IdentitySummary]


class ModelInfo(BaseModel):
    name: str
    loras: list[str]
    controls: list[str] = Field(default_factory=list, description="Control types a request may use in "
                                                                  "`controls` with this model.")
    default: bool


class ModelList(BaseModel):
    models: list[ModelInfo]
    schedulers: list[str]
    styles: list[str]
    output_formats: list[str]
    delivery: list[str]
    profile: str = Field(description="tiny: random weights where none are configured (images are noise); real.")


class ErrorDetail(BaseModel):
    code: str
    message: str
    field: Optional[str] = None
    details: Optional[list[dict[str, Any]]] = None


class ErrorBody(BaseModel):
    error: ErrorDetail


class Health(BaseModel):
    status: str


class Readiness(BaseModel):
    ready: bool
    deployments: dict[str, str] = Field(default_factory=dict)
    message: Optional[str] = None
