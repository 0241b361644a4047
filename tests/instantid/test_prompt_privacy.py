"""Prompts are personal data: never in a log, not even the part past CLIP's 77 tokens that diffusers reports
(issue 10, item 10)."""

from __future__ import annotations

import logging

from instantid.loading import load_pipeline


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


def test_a_long_prompt_never_reaches_the_log(tiny_bundle):
    pipe = load_pipeline(str(tiny_bundle / "sdxl"), str(tiny_bundle / "instantid"), device="cpu")
    secret = "zebracornflakes"
    prompt = " ".join(["portrait"] * 100 + [secret] * 5)
    # diffusers' own loggers do not propagate to the root logger: listen on the one that emits the warning
    logger = logging.getLogger(type(pipe).encode_prompt.__module__)
    records = _Records()
    logger.addHandler(records)
    try:
        pipe.encode_prompt(prompt, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True,
                           negative_prompt=prompt)
    finally:
        logger.removeHandler(records)
    messages = [r.getMessage() for r in records.records]
    assert messages, "diffusers no longer warns about truncation: nothing to redact, drop this test"
    assert not any(secret in m or "portrait" in m for m in messages), messages
