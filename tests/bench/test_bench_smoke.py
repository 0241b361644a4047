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
    assert res["phases_done"][:4] == ["build", "reference_batch1", "precision", "served_setup"]
    assert "headline" in res["phases_done"] and not res["skipped"]
    for impl in ("reference", "served"):
        r = res[impl]["1"]
        assert r["median_s"] > 0 and r["images_per_s"] > 0 and r["fraction_of_nominal_peak"] > 0
    flops = res["flops"]["1"]
    assert flops["per_step"] > 0 and flops["vae_decode"] > 0 and flops["total"] == flops["per_step"] + flops["vae_decode"]
    headline = res["headline"]
    assert headline["batch"] == 1 and headline["speedup"] > 0 and headline["eager_s_per_image"] > 0
    assert headline["vae_decode"] == {"eager": "float32", "served": "vae=bf16"}
    assert res["speedup"]["1"] > 0 and "1" in res["memory_curve"]
    applied = res["served_setup"]["applied"]
    assert any(a.startswith("fuse_qkv") for a in applied) and "channels_last" in applied
    assert list(res["quality_changing"]) == ["lcm_1_steps_no_cfg_batch1"]  # reported apart from "served"
    precision = res["precision"]
    assert precision["float16_finite"] and precision["bfloat16_finite"]
    assert precision["served_vs_reference_latents_rel_l2"] < 1e-3  # same semantics: float32 rounding only
    table = capsys.readouterr().out
    assert "HEADLINE" in table and "reference" in table and "served" in table and "speedup" in table


def test_gpu_generate_budget_keeps_the_headline_and_skips_the_rest(tmp_path):
    """--budget-s 0: the headline phases still run and are on disk; every later phase is skipped, and says so."""
    out = tmp_path / "gpu.json"
    script("gpu_generate").main(["--tiny", "--batch", "1", "2", "--steps", "1", "--memory-curve", "1",
                                 "--lcm-steps", "1", "--precision-size", "0", "--budget-s", "0", "--out", str(out)])
    res = json.loads(out.read_text())
    assert res["headline"]["eager_s_per_image"] > 0 and res["headline"]["served_s_per_image"] > 0
    assert set(res["skipped"]) == {"reference_batch2", "flops", "served_batch2", "memory_curve_batch1", "lcm_1"}
    assert "2" not in res["served"] and not res["memory_curve"]


def test_gpu_generate_reports_a_compile_failure_and_serves_eager(monkeypatch):
    import instantid.optimize

    gpu = script("gpu_generate")
    pipe = gpu.build_pipeline(True, "cpu", __import__("torch").float32)

    def broken(pipe, make_request):
        raise RuntimeError("inductor: triton kernel failed")

    monkeypatch.setattr(instantid.optimize, "warm_up", broken)
    setup = gpu.serve_compiled(pipe, batch_buckets=[2], sizes=[(64, 64)], backend="eager")
    assert setup["compile_error"] == "RuntimeError: inductor: triton kernel failed"
    assert pipe.serving.broken == setup["compile_error"]  # every later call runs eager, counted


def test_gpu_generate_serves_what_the_generator_serves(monkeypatch):
    """The bench's served setup and the Generator's (GeneratorCore.compile) call optimize() and warm_up() with the
    same plan, settings and warm-up requests."""
    from types import SimpleNamespace

    import instantid.optimize
    from deployments.config import AppArgs
    from deployments.generator.deployment import GeneratorCore

    calls = []

    def fake_optimize(pipe, **kw):
        calls.append(("optimize", kw))
        pipe.serving = SimpleNamespace(on_fallback=[], broken=None)
        return []

    def fake_warm_up(pipe, make_request):
        calls.append(("warm_up", [vars(make_request(1, 77, g)) for g in (True, False)]))
        return {"warmed": 0, "broken": None}

    monkeypatch.setattr(instantid.optimize, "optimize", fake_optimize)
    monkeypatch.setattr(instantid.optimize, "warm_up", fake_warm_up)
    args = AppArgs(compile={"enabled": True, "cache_dir": None})
    GeneratorCore(args).compile(SimpleNamespace())
    cfg = args.compile
    script("gpu_generate").serve_compiled(SimpleNamespace(), batch_buckets=cfg.batch_buckets, sizes=cfg.sizes,
                                          mode=cfg.mode, backend=cfg.backend, cache_dir=None)
    (_, generator_kw), (_, generator_requests), (_, bench_kw), (_, bench_requests) = calls
    assert bench_kw == generator_kw

    def comparable(request):
        return {k: (v.tolist() if hasattr(v, "tolist") else list(v.getdata()) if hasattr(v, "getdata") else v)
                for k, v in request.items()}

    assert [comparable(r) for r in bench_requests] == [comparable(r) for r in generator_requests]


def test_live_bytes_counts_storages_while_referenced():
    """Known answer: two 1 KiB storages alive at most (a view shares its base's storage and keeps it alive)."""
    import torch

    gpu = script("gpu_generate")
    with gpu.LiveBytes() as live:
        a = torch.empty(256, device="meta")  # 1 KiB
        b = a + 1  # 2 KiB live
        del a  # 1 KiB
        c = b.view(16, 16)
        del b  # c still holds the storage: 1 KiB
        d = c * 2  # 2 KiB
        assert live.now == 2048
        del c, d
    assert live.peak == 2048 and live.now == 0


def test_gpu_generate_memory_estimate_tiny(tmp_path):
    out = tmp_path / "estimate.json"
    res = script("gpu_generate").main(["--estimate-memory", "--tiny", "--batch", "1", "2", "--out", str(out)])
    est = json.loads(out.read_text())["estimate"]
    assert est == json.loads(json.dumps(res["estimate"])) and est["device"] == "meta"
    one, two = est["batches"]["1"], est["batches"]["2"]
    assert 0 < one["step_activations_gib"] < two["step_activations_gib"]
    # a float32 decode holds twice a bfloat16 decode's activations
    assert abs(one["vae_decode_fp32_activations_gib"] - 2 * one["vae_decode_bf16_activations_gib"]) < 1e-9
    assert one["peak_gib_vae_fp32"] > one["peak_gib_vae_bf16"] > one["peak_gib_vae_bf16_text_encoders_offloaded"]


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
