"""Schedulers by name. Each generation gets a fresh instance, so concurrent requests never share state."""

from __future__ import annotations

from diffusers import (
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LCMScheduler,
)

from .errors import InvalidParameterError

# name -> (class, config overrides)
SCHEDULERS = {
    "euler": (EulerDiscreteScheduler, {}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "dpmpp_2m_karras": (DPMSolverMultistepScheduler, {"use_karras_sigmas": True, "algorithm_type": "dpmsolver++"}),
    "lcm": (LCMScheduler, {}),
}
NAMES = ("default", *SCHEDULERS)


def make_scheduler(name: str, base_config):
    """A new scheduler named ``name`` ('default' = the model's own) built from the model's scheduler config."""
    if name == "default":
        import diffusers

        return getattr(diffusers, base_config["_class_name"]).from_config(base_config)
    if name not in SCHEDULERS:
        raise InvalidParameterError("scheduler", f"unknown scheduler {name!r}; choose one of {list(NAMES)}")
    cls, overrides = SCHEDULERS[name]
    return cls.from_config(base_config, **overrides)
