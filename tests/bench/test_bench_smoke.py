"""CI runs every benchmark script at tiny size: it checks that they run and report, not how fast anything is."""

import importlib.util
import json
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"


def script(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_generate_tiny_runs_both_implementations(tmp_path, capsys):
    out = tmp_path / "gpu.json"
    script("gpu_generate").main(["--tiny", "--batch", "1", "--steps", "1", "--repeats", "1", "--memory-curve", "1",
                                 "--lcm-steps", "1", "--precision-steps", "1", "--out", str(out)])
    res = json.loads(out.read_text())
    assert res["config"]["tiny"] and res["environment"]["device"] == "cpu"
    for impl in ("reference", "ours"):
        r = res[impl]["1"]
        assert r["median_s"] > 0 and r["images_per_s"] > 0 and r["fraction_of_peak"] > 0
    assert res["flops"]["1"]["per_step"] > 0 and res["flops"]["1"]["total"] >= res["flops"]["1"]["per_step"]
    assert res["speedup"]["1"] > 0 and "1" in res["memory_curve"]
    assert any(a.startswith("fuse_qkv") for a in res["optimizations"]) and "channels_last" in res["optimizations"]
    assert list(res["quality_changing"]) == ["lcm_1_steps_no_cfg_batch1"]  # reported apart from "ours"
    precision = res["precision"]
    assert precision["float16_finite"] and precision["bfloat16_finite"]
    assert precision["ours_vs_reference_latents_rel_l2"] < 1e-3  # same semantics: float32 rounding only
    table = capsys.readouterr().out
    assert "reference" in table and "ours" in table and "speedup" in table


def test_face_throughput_tiny(tmp_path, capsys):
    out = tmp_path / "face.json"
    script("face_throughput").main(["--tiny", "--images", "1", "--repeats", "1", "--out", str(out)])
    res = json.loads(out.read_text())
    assert res["faces_per_image"] >= 1 and res["images_per_s"] > 0 and res["embedding_finite"]
    assert "analyze (per image)" in capsys.readouterr().out


def test_face_throughput_real_size_graphs_have_the_real_architecture(tmp_path):
    """The built antelopev2-shaped graphs: real parameter counts and cost, routed by insightface, one face."""
    from instantid.face import FaceModel

    face = script("face_throughput")
    info = face.build_pack(tmp_path / "pack")
    assert 65.0e6 < info["recognizer"]["params"] < 65.5e6  # iresnet100 / glintr100: 65.2 M
    assert 23 < info["recognizer"]["gflops"] < 25.5  # ~24 GFLOPs per 112x112 face
    assert 4.0e6 < info["detector"]["params"] < 4.5e6  # SCRFD-10G: 4.2 M
    # "10G" is 10 G multiply-adds at 640x480: 2 x 10 x (640*640)/(640*480) ~ 26.7 GFLOPs at 640x640
    assert 24 < info["detector"]["gflops"] < 29
    analyzer = FaceModel(str(tmp_path / "pack"), providers=["CPUExecutionProvider"])
    faces = analyzer.analyze(face.photo())
    assert len(faces) == 1 and faces[0].embedding.shape == (512,)


def test_cold_start_tiny_s3(tiny_bundle, tmp_path, capsys):
    """Two replica starts through moto: first (download + load), second (cache hit + load). The 'local' phase
    runs the same replica code on the local path, so CI leaves it out to save a process start."""
    out = tmp_path / "cold.json"
    res = script("cold_start").main(["--tiny", "--root", str(tiny_bundle), "--keep", "--repeats", "1", "--no-cold",
                                     "--phases", "raw,s3", "--s3-server", "moto", "--out", str(out)])
    assert json.loads(out.read_text())["summary"] == res["summary"]
    s = res["summary"]
    assert s["raw_warm_s"] > 0
    for name in ("s3_first", "s3_second"):
        assert s[name]["ready_s"] >= s[name]["load_s"] > 0 and s[name]["load_vs_raw"] > 0
    assert (tiny_bundle / "sdxl" / "model_index.json").exists()  # --keep: the shared bundle is left alone
    assert "s3_second" in capsys.readouterr().out


def test_cold_start_writes_real_layouts_as_diffusers_reads_them(tmp_path):
    """The streamed safetensors writer: a file diffusers/safetensors read back with the declared shapes."""
    import torch
    from safetensors import safe_open

    cold = script("cold_start")
    shapes = {"a.weight": (3, 5), "b.bias": (7,), "c": (2, 2, 2)}
    size = cold.write_safetensors(tmp_path / "x.safetensors", shapes, "float16", cold._Pool(torch.float16))
    with safe_open(str(tmp_path / "x.safetensors"), "pt") as f:
        assert {k: tuple(f.get_tensor(k).shape) for k in f.keys()} == shapes
        assert all(f.get_tensor(k).dtype == torch.float16 for k in f.keys())
    assert size == (tmp_path / "x.safetensors").stat().st_size


def test_disk_s3_server_speaks_the_protocol_weights_uses(tiny_bundle, tmp_path, monkeypatch):
    """The full-size S3 stand-in: instantid.weights downloads through it exactly as from moto."""
    from instantid.weights import download_s3

    cold = script("cold_start")
    server = cold.DiskS3(tiny_bundle).start()
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", server.endpoint)
        for k, v in (("AWS_ACCESS_KEY_ID", "x"), ("AWS_SECRET_ACCESS_KEY", "x"), ("AWS_DEFAULT_REGION", "us-east-1")):
            monkeypatch.setenv(k, v)
        monkeypatch.setenv("INSTANTID_CACHE", str(tmp_path / "cache"))
        local = download_s3("s3://weights/instantid")
        for name in ("ip-adapter.bin", "ControlNetModel/diffusion_pytorch_model.safetensors"):
            assert (local / name).read_bytes() == (tiny_bundle / "instantid" / name).read_bytes()
    finally:
        server.stop()


def test_download_verify_tiny(tmp_path, capsys):
    out = tmp_path / "verify.json"
    script("download_verify").main(["--tiny", "--out", str(out)])
    res = json.loads(out.read_text())
    assert res["bytes"] == 1 << 20 and set(res["runs"]) == {"cold", "warm"}
    assert all(r["seconds"] > 0 for r in res["runs"].values())
    assert "verify" in capsys.readouterr().out


def test_identity_score_tiny(tmp_path):
    out = tmp_path / "score.json"
    script("identity_score").main(["--tiny", "--sizes", "1024x1024", "--images", "1", "--repeats", "1",
                                   "--out", str(out)])
    res = json.loads(out.read_text())["sizes"]["1024x1024"]
    # the photo scored against its own embedding: a face, and (resized, re-analysed) nearly the same embedding
    assert res["face_found"] and res["similarity"] > 0.9 and res["median_s"] > 0
