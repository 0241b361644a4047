"""Generation defaults, the official demo's, in one place for the library (``GenerationRequest``, the
official-signature ``__call__``), the CLI and the service's request schema and messages. No torch: the
Ingress and the CLI's argument parser import it."""

STEPS = 30
GUIDANCE_SCALE = 5.0  # <= 1 turns classifier-free guidance off
IP_ADAPTER_SCALE = 0.8  # strength of the identity tokens
CONTROLNET_CONDITIONING_SCALE = 0.8  # strength of IdentityNet
IMG2IMG_STRENGTH = 0.8  # img2img: the share of the schedule that is run, (0, 1]
PROMPT_WEIGHTINGS = ("none", "lpw")
MAX_PEOPLE = 4  # identities in one picture (``people``)
MAX_SEED = 2**32 - 1  # seeds are 0..MAX_SEED everywhere (the API bounds them; the CLI and the service draw in it)
REGION_MARGIN = 0.25  # a person's region: its face box, each side moved out by this share of the box's size
# How several photos of one identity combine (identity.combine_embeddings): the mean raw embedding (the demo's),
# the mean of their unit vectors at the photos' mean length, or their ID tokens side by side (16 per photo)
COMBINE_MODES = ("average", "norm_average", "concat")
COMBINE = "average"
NOISE = 0.0  # share of uniform noise in the unconditional identity embedding (ComfyUI_InstantID's ``noise``), 0-1
DET_SIZE = 640  # the face detector's input side (insightface's det_size); larger finds smaller faces
DET_SIZE_MIN, DET_SIZE_MAX = 160, 1280  # multiples of 32 (the detector's largest stride)
DET_RETRY_MIN = 192  # retrying when no face is found goes down 64 at a time to here, as ComfyUI_InstantID
PROMPT_WEIGHTING = "lpw"  # the demo and Replicate always weight; see docs/parity.md
