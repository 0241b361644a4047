"""The default models, where they come from, and the terms their publishers state for them.

One place for these facts: the loaders' defaults, ``instantid download`` (which prints the terms of what it
fetched), its ``--help`` and the "Models and licences" sections of README.md and docs/deploy.md all follow this
table. The terms are summaries with a link to the publisher's own text, which is what binds; they are not legal
advice.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass


@dataclass(frozen=True)
class ModelSource:
    role: str  # what the model is in InstantID
    ref: str  # the default reference (a hub repo id, or an insightface pack name)
    hub_repo: str  # where `instantid download` fetches it from
    terms: str  # the licence or terms, as the publisher states them
    terms_url: str  # the publisher's text
    commercial: str  # what a commercial deployment must do about it


BASE_MODEL = ModelSource(
    role="SDXL base model",
    ref="stabilityai/stable-diffusion-xl-base-1.0",
    hub_repo="stabilityai/stable-diffusion-xl-base-1.0",
    terms="CreativeML Open RAIL++-M licence (Stability AI): commercial use allowed, subject to the use-based "
          "restrictions of its Attachment A, which must be passed on to your users",
    terms_url="https://huggingface.co/stabilityai/stable-diffusion-xl-base-1.0/blob/main/LICENSE.md",
    commercial="allowed under the licence; include its use restrictions in your terms of service",
)

INSTANTID = ModelSource(
    role="InstantID weights (IdentityNet ControlNetModel/ and ip-adapter.bin)",
    ref="InstantX/InstantID",
    hub_repo="InstantX/InstantID",
    terms="research purposes only: the official README's Disclaimer says \"Our released checkpoints are also "
          "for research purposes only\" (the hub model card is tagged apache-2.0; InstantID's code is "
          "Apache-2.0)",
    terms_url="https://github.com/instantX-research/InstantID#disclaimer",
    commercial="get a commercial licence from the InstantX team, or train your own adapter and IdentityNet",
)

FACE_MODEL = ModelSource(
    role="face analysis pack (insightface antelopev2: SCRFD-10G detector, glintr100 ArcFace recogniser)",
    ref="antelopev2",
    # insightface's own download link for antelopev2 is dead; the official InstantID README points to a
    # community copy, which is also on the hub here
    hub_repo="DIAMONIK7777/antelopev2",
    terms="non-commercial research purposes only: insightface's README says its models, \"both manual-"
          "downloading ... and auto-downloading\", are for non-commercial research purposes only (its code is "
          "MIT); the hub copy is a community mirror of insightface's pack under the same terms",
    terms_url="https://github.com/deepinsight/insightface#license",
    commercial="license the models from insightface (insightface.ai), or replace the pack; InstantID's adapter "
               "was trained on antelopev2's embeddings, so a different recogniser needs a retrained adapter",
)

SOURCES = (BASE_MODEL, INSTANTID, FACE_MODEL)


def source_for(ref: str) -> ModelSource | None:
    """The default whose weights ``ref`` names (its default reference or its hub repo), if any."""
    for source in SOURCES:
        if str(ref) in (source.ref, source.hub_repo):
            return source
    return None


def describe_sources(width: int = 100) -> str:
    """Each default, its source and terms: the text `instantid download --help` ends with."""
    lines = ["default models, their sources and terms (read them before you deploy):"]
    for source in SOURCES:
        lines += [f"  {source.role}", f"    default {source.ref}, from https://huggingface.co/{source.hub_repo}",
                  textwrap.fill(f"terms: {source.terms}", width, initial_indent="    ", subsequent_indent="      "),
                  f"    see {source.terms_url}"]
    return "\n".join(lines)
