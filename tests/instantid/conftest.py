"""Fixtures of the library's tests."""

import pytest

from instantid.loading import load_pipeline


@pytest.fixture(scope="module")
def pipe(tiny_bundle):
    """The tiny bundle's pipeline on the CPU, one per test module (tests set its LoRAs and options)."""
    p = load_pipeline(str(tiny_bundle / "sdxl"), str(tiny_bundle / "instantid"), device="cpu")
    p.set_progress_bar_config(disable=True)
    return p
