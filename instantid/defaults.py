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
PROMPT_WEIGHTING = "lpw"  # the demo and Replicate always weight; see docs/parity.md
