"""bench/people_cost.py at toy size: it runs and reports, and IdentityNet runs once per identity per step."""

import json

from test_bench_smoke import script


def test_people_cost_tiny(tmp_path):
    out = tmp_path / "people.json"
    script("people_cost").main(["--size", "128", "--steps", "2", "--repeats", "1", "--flops-size", "128", "--out", str(out)])
    res = json.loads(out.read_text())
    for k in ("1", "2", "3", "4"):
        r = res["tiny_cpu"][k]
        assert r["calls"] == {"identitynet": 2 * int(k), "unet": 2} and r["seconds"] > 0
    assert res["tiny_cpu"]["1"]["ratio_to_one"] == 1.0
    flops = res["real_architecture_flops"]
    assert 0 < flops["identitynet_tflops_per_step"] < flops["unet_tflops_per_step"]
    ratios = [flops["predicted_ratio_to_one"][k] for k in ("1", "2", "3", "4")]
    assert ratios[0] == 1.0 and ratios == sorted(ratios)
