"""Named style presets: prompt templates, as the official demo offers (data in styles.json)."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from .errors import InvalidParameterError


@lru_cache(maxsize=1)
def presets() -> dict[str, dict[str, str]]:
    return json.loads((Path(__file__).with_name("styles.json")).read_text())


def apply_style(name: str | None, prompt: str, negative_prompt: str | None) -> tuple[str, str | None]:
    """Fill the preset's template with ``prompt`` and prepend its negative prompt, as the official demo does.

    With no style, both pass through unchanged (a None negative prompt means SDXL's zero negative embedding).
    """
    if name is None:
        return prompt, negative_prompt
    table = presets()
    if name not in table:
        raise InvalidParameterError("style", f"unknown style {name!r}; choose one of {sorted(table)}")
    style = table[name]
    return style["prompt"].replace("{prompt}", prompt), f"{style['negative_prompt']} {negative_prompt or ''}".strip()
