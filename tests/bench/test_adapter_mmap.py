"""The cold-start fix in instantid.loading: ip-adapter.bin is memory-mapped (zip files), legacy files still load."""

import torch

from instantid.loading import load_adapter_state


def _state():
    g = torch.Generator().manual_seed(0)
    return {"image_proj": {"latents": torch.randn(1, 4, 8, generator=g)},
            "ip_adapter": {"1.to_k_ip.weight": torch.randn(8, 6, generator=g)}}


def test_zip_file_is_memory_mapped_and_equal(tmp_path):
    state = _state()
    torch.save(state, tmp_path / "ip-adapter.bin")
    loaded = load_adapter_state(tmp_path)
    torch.testing.assert_close(loaded, state, rtol=0, atol=0)
    # the mapping is private (copy-on-write): writing to a loaded tensor never changes the file
    loaded["ip_adapter"]["1.to_k_ip.weight"].zero_()
    again = load_adapter_state(tmp_path)
    torch.testing.assert_close(again, state, rtol=0, atol=0)


def test_legacy_file_is_read_without_mmap(tmp_path):
    state = _state()
    torch.save(state, tmp_path / "ip-adapter.bin", _use_new_zipfile_serialization=False)
    torch.testing.assert_close(load_adapter_state(tmp_path), state, rtol=0, atol=0)
