"""The cold-start fix in instantid.loading: ip-adapter.bin is memory-mapped (zip files), legacy files still load."""

from pathlib import Path

import pytest
import torch

from instantid.loading import load_adapter_state

MAPS = Path("/proc/self/maps")  # Linux: this process's memory mappings, one per line with the file's path


def mapped(path: Path) -> bool:
    return str(path.resolve()) in MAPS.read_text()


def _state():
    g = torch.Generator().manual_seed(0)
    return {"image_proj": {"latents": torch.randn(1, 4, 8, generator=g)},
            "ip_adapter": {"1.to_k_ip.weight": torch.randn(8, 6, generator=g)}}


@pytest.mark.skipif(not MAPS.exists(), reason="needs Linux's /proc/self/maps to see the mapping")
def test_zip_file_is_memory_mapped_and_equal(tmp_path):
    state = _state()
    torch.save(state, tmp_path / "ip-adapter.bin")
    assert not mapped(tmp_path / "ip-adapter.bin")
    loaded = load_adapter_state(tmp_path)
    assert mapped(tmp_path / "ip-adapter.bin")  # the tensors are views of the file's pages, not a copy
    torch.testing.assert_close(loaded, state, rtol=0, atol=0)
    # the mapping is private (copy-on-write): writing to a loaded tensor never changes the file
    loaded["ip_adapter"]["1.to_k_ip.weight"].zero_()
    again = load_adapter_state(tmp_path)
    torch.testing.assert_close(again, state, rtol=0, atol=0)


def test_legacy_file_is_read_without_mmap(tmp_path):
    state = _state()
    torch.save(state, tmp_path / "ip-adapter.bin", _use_new_zipfile_serialization=False)
    loaded = load_adapter_state(tmp_path)
    torch.testing.assert_close(loaded, state, rtol=0, atol=0)
    assert not MAPS.exists() or not mapped(tmp_path / "ip-adapter.bin")
