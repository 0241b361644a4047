#!/usr/bin/env python3
"""A small mutation audit: apply one realistic single-point bug at a time, run only the relevant in-process
(non-Ray) tests with -x, record whether they fail ("killed"), and restore the file. docs/testing.md has the
table of the last run and says how to add mutations.

    .venv/bin/python scripts/mutation_audit.py             # every mutation, a markdown table on stdout
    .venv/bin/python scripts/mutation_audit.py --only 7 12 # some, by number
    .venv/bin/python scripts/mutation_audit.py --list

Each mutation names a file, an exact snippet that must occur in it exactly once, its replacement, and the test
selection to run. The audit runs on a copy of the tree (``--copy DIR``, default a fresh temporary directory,
imported first through PYTHONPATH), so a mutation never sits in the working tree, where a commit could take it;
in the copy each file is restored in a ``finally`` and checked against its original bytes.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COPIED = ("instantid", "deployments", "tests", "serve", "pyproject.toml")
TI = "tests/instantid"


@dataclass(frozen=True)
class Mutation:
    what: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]


M = Mutation
KNOWN = f"{TI}/test_known_answers.py"
LIMITS = f"{TI}/test_decode_bombs.py"
GOLDEN = f"{TI}/test_golden.py::test_tiny_pipeline_matches_golden_values"
ROUND3 = "tests/deployments/ingress/http/test_hostile_round3.py"
STORE = "tests/deployments/ingress/jobs/test_job_store_transitions.py"
MUTATIONS = [
    # -- library: prompt weighting ---------------------------------------------------------------------------
    M("LPW: a weighted token scaled by w instead of moved from the end token",
      "instantid/prompt_weighting.py", "scaled = last + (embeds - last) * w16.to(embeds.dtype)[:, None]",
      "scaled = embeds * w16.to(embeds.dtype)[:, None]", (KNOWN + "::test_a_weighted_tokens_embedding_is_the_lpw_formula",)),
    M("LPW: weights below 1 ignored", "instantid/prompt_weighting.py", "weighted = w16 != 1.0", "weighted = w16 > 1.0",
      (KNOWN + "::test_a_weighted_tokens_embedding_is_the_lpw_formula",)),
    M("LPW: chunks of 76 tokens", "instantid/prompt_weighting.py", "CHUNK = 75", "CHUNK = 76",
      (KNOWN + "::test_a_long_weighted_prompt_is_encoded_per_75_token_chunk",)),
    M("LPW: (text) weighs 1.05", "instantid/prompt_weighting.py", "ROUND, SQUARE = 1.1, 1 / 1.1",
      "ROUND, SQUARE = 1.05, 1 / 1.1", (f"{TI}/test_demo_features.py",)),
    # -- library: attention and regions ----------------------------------------------------------------------
    M("region grid halved rounding down", "instantid/attention.py", "while h * w > tokens:\n        h, w = (h + 1) // 2, (w + 1) // 2",
      "while h * w > tokens:\n        h, w = h // 2, w // 2", (KNOWN + "::test_region_at_each_unet_resolution",)),
    M("region resized bilinear instead of nearest", "instantid/attention.py",
      'mask = F.interpolate(region[:, None], size=(h, w), mode="nearest")',
      'mask = F.interpolate(region[:, None], size=(h, w), mode="bilinear")',
      (KNOWN + "::test_region_at_each_unet_resolution",)),
    M("people: ID tokens owned modulo instead of by block", "instantid/attention.py",
      "token_owner = torch.arange(people * self.num_tokens, device=query.device) // self.num_tokens",
      "token_owner = torch.arange(people * self.num_tokens, device=query.device) % people",
      (KNOWN + "::test_decoupled_attention_with_regions_is_the_formula",)),
    M("single identity: region mask not applied", "instantid/attention.py",
      "id_out = id_out * self._region_at(id_out.shape[1]).to(id_out.dtype)", "id_out = id_out",
      (KNOWN + "::test_decoupled_attention_with_regions_is_the_formula",)),
    # -- library: pipeline -----------------------------------------------------------------------------------
    M("img2img runs the first steps of the schedule", "instantid/pipeline.py",
      "timesteps = schedulers[0].timesteps[begin:]", "timesteps = schedulers[0].timesteps[:steps - begin]",
      (KNOWN + "::test_img2img_runs_the_last_strength_share_of_the_schedule",)),
    M("img2img rounds strength x steps to nearest", "instantid/pipeline.py",
      "begin = (steps - min(int(steps * requests[0].strength), steps))",
      "begin = (steps - min(round(steps * requests[0].strength), steps))",
      (KNOWN + "::test_img2img_runs_the_last_strength_share_of_the_schedule",)),
    # (noising at timesteps[1:2] instead of [:1] was tried: equivalent, diffusers' add_noise uses the begin index)
    M("img2img init latents not scaled by the VAE's scaling factor", "instantid/pipeline.py",
      "init = (vae.config.scaling_factor * init.to(dtype)).repeat(r.num_images, 1, 1, 1)",
      "init = init.to(dtype).repeat(r.num_images, 1, 1, 1)",
      (KNOWN + "::test_img2img_starts_from_the_init_image_noised_at_the_first_kept_timestep",)),
    M("guidance window start inclusive on the wrong side", "instantid/pipeline.py",
      "float(i / n < start or (i + 1) / n > end)", "float(i / n <= start or (i + 1) / n > end)",
      (KNOWN + "::test_guidance_windows_pick_the_steps_each_request_gets_identitynet",)),
    M("guidance window end checked at the step's start", "instantid/pipeline.py",
      "float(i / n < start or (i + 1) / n > end)", "float(i / n < start or i / n > end)",
      (KNOWN + "::test_guidance_windows_pick_the_steps_each_request_gets_identitynet",)),
    M("seed 0 treated as no seed", "instantid/pipeline.py",
      'return torch.Generator("cpu").manual_seed(int(self.seed or 0))',
      'return torch.Generator("cpu").manual_seed(int(self.seed)) if self.seed else torch.Generator("cpu")',
      (KNOWN + "::test_a_seed_gives_torchs_own_noise_from_a_cpu_generator",)),
    M("CFG unconditional branch fed the real face embedding", "instantid/pipeline.py",
      "uncond = torch.zeros_like(emb) if not noise else (", "uncond = emb if not noise else (",
      (GOLDEN + "[defaults-cfg]",)),
    M("CFG combination around the conditional prediction", "instantid/pipeline.py",
      "pred = u + r.guidance_scale * (pred - u)", "pred = pred + r.guidance_scale * (pred - u)",
      (GOLDEN + "[defaults-cfg]",)),
    M("IdentityNet residual mask resized nearest", "instantid/pipeline.py",
      'masks[k] = [_resized(mask, x, "bilinear") for x in (*d, m)]', 'masks[k] = [_resized(mask, x, "nearest") for x in (*d, m)]',
      (GOLDEN + "[control-mask]",)),
    M("a control mask read at /256", "instantid/pipeline.py",
      "return torch.from_numpy(np.array(image)[:, :, 0]).float() / 255.0",
      "return torch.from_numpy(np.array(image)[:, :, 0]).float() / 256.0", (GOLDEN + "[control-mask]",)),
    M("decode check never asked", "instantid/pipeline.py",
      "results[position] = self._decode(x, output_type, _wanted_check(still_wanted, position))",
      "results[position] = self._decode(x, output_type)", (f"{TI}/test_abandoned_decode.py::test_a_request_abandoned_during_its_decode_stops_within_it",)),
    # -- library: coordinates --------------------------------------------------------------------------------
    M("cover fit uses the smaller scale (contain)", "instantid/keypoints.py", "scale = max(tw / sw, th / sh)",
      "scale = min(tw / sw, th / sh)", (KNOWN + "::test_cover_fit_onto_a_narrower_and_a_wider_canvas",)),
    M("cover fit centres the unscaled face", "instantid/keypoints.py",
      "offset.append(float(np.clip(t_len / 2 - c * scale, slack, 0.0)) if slack < 0 else 0.0)",
      "offset.append(float(np.clip(t_len / 2 - c, slack, 0.0)) if slack < 0 else 0.0)",
      (KNOWN + "::test_cover_fit_onto_a_narrower_and_a_wider_canvas",)),
    M("face mask rows and columns swapped", "instantid/keypoints.py", "mask[y1:y2, x1:x2] = 255",
      "mask[x1:x2, y1:y2] = 255", (KNOWN + "::test_cover_fit_onto_a_narrower_and_a_wider_canvas",)),
    M("region margin of y taken from the width", "instantid/people.py",
      "dx, dy = (x2 - x1) * REGION_MARGIN, (y2 - y1) * REGION_MARGIN",
      "dx, dy = (x2 - x1) * REGION_MARGIN, (x2 - x1) * REGION_MARGIN",
      (KNOWN + "::test_people_on_a_non_square_canvas_get_their_regions_by_hand",
       KNOWN + "::test_a_tall_face_box_grows_by_its_own_height_and_width")),
    M("people overlap needs both axes -> either", "instantid/people.py",
      "if min(ax2, bx2) > max(ax1, bx1) and min(ay2, by2) > max(ay1, by1):",
      "if min(ax2, bx2) > max(ax1, bx1) or min(ay2, by2) > max(ay1, by1):", (f"{TI}/test_people.py",)),
    M("analysis resize: long side from min", "instantid/face.py", "ratio = 1280 / max(h, w)", "ratio = 1280 / min(h, w)",
      (KNOWN + "::test_the_demos_analysis_size_for_non_square_photos",)),
    M("face coordinates: y scaled by x's factor", "instantid/face.py", '"bbox": [x1 * sx + ox, y1 * sy + oy, x2 * sx + ox, y2 * sy + oy]',
      '"bbox": [x1 * sx + ox, y1 * sx + oy, x2 * sx + ox, y2 * sx + oy]',
      (KNOWN + "::test_face_coordinates_map_back_to_a_non_square_photo",)),
    # -- library: image limits -------------------------------------------------------------------------------
    M("JPEG walk stops at junk again (the finding)", "instantid/image_limits.py",
      "        found = _ANY_MARKER.search(data, pos)\n        if found is None:\n            return  # no more markers",
      "        found = _ANY_MARKER.match(data, pos)\n        if found is None:\n            return  # no more markers",
      (LIMITS,)),
    M("decoder scan count off (x10)", "instantid/image_limits.py", "if self.scans > self.max_scans:",
      "if self.scans > 10 * self.max_scans:", (LIMITS,)),
    M("decoder scan budget ignores the pixel count", "instantid/image_limits.py",
      "reader.max_scans = max(1, min(MAX_SCAN_PIXELS // max(1, width * height), 10 * MAX_JPEG_SCANS))",
      "reader.max_scans = MAX_JPEG_SCANS", (LIMITS,)),
    M("load_image pixel limit not checked", "instantid/image_limits.py", "if width * height > max_pixels:\n        image.close()",
      "if False:\n        image.close()", (LIMITS,)),
    M("JPEG scan limit off by one", "instantid/image_limits.py", "if scans > MAX_JPEG_SCANS:", "if scans >= MAX_JPEG_SCANS:",
      (LIMITS,)),
    M("PNG: IDAT counted as ancillary", "instantid/image_limits.py", 'if kind != b"IDAT":', 'if kind == b"IDAT":',
      (LIMITS,)),
    # -- serving layer ---------------------------------------------------------------------------------------
    M("auth: X-Forwarded-For believed from any peer", "deployments/ingress/http/auth.py",
      "    if peer not in trusted:\n        return peer[:64]", "    if False:\n        return peer[:64]", (ROUND3,)),
    M("auth: failures not counted per presented credential", "deployments/ingress/http/auth.py",
      'buckets = [(self.failures, _credential(authorization)), (self.all_failures, "*")]',
      'buckets = [(self.all_failures, "*")]', (ROUND3,)),
    M("auth: no replica-wide failure bound", "deployments/ingress/http/auth.py",
      'buckets = [(self.failures, _credential(authorization)), (self.all_failures, "*")]',
      "buckets = [(self.failures, _credential(authorization))]", (ROUND3,)),
    M("auth: fails open when no key is configured", "deployments/ingress/http/auth.py",
      "        if found is None:\n", "        if found is None and self.hashes:\n", (ROUND3,)),
    M("auth: every key scoped as an admin", "deployments/ingress/http/auth.py", "        return api_key\n",
      "        return None\n", ("tests/deployments/ingress/test_identity_scope.py",)),
    M("auth: per-key rate limit skipped", "deployments/ingress/http/auth.py", "        self.limiter.take(name)\n",
      "", ("tests/deployments/ingress/test_units.py::test_api_keys_and_rate_limit",)),
    M("webhooks: port ignored", "deployments/ingress/jobs/webhooks.py",
      "            port_ok = port == DEFAULT_PORTS.get(scheme)", "            port_ok = True", (ROUND3,)),
    M("webhooks: a 3xx retried", "deployments/ingress/jobs/webhooks.py", "(200 <= status < 400 or",
      "(200 <= status < 300 or", (ROUND3,)),
    M("webhooks: wildcard matches a lookalike suffix", "deployments/ingress/jobs/webhooks.py",
      'if pattern.startswith("*.") and host.endswith(pattern[1:])',
      'if pattern.startswith("*.") and host.endswith(pattern[2:])', (ROUND3,)),
    M("webhooks: signature without the '.' separator", "deployments/ingress/jobs/webhooks.py",
      'f"{timestamp}.".encode() + body', 'f"{timestamp}".encode() + body', (ROUND3,)),
    M("webhooks: old timestamps accepted", "deployments/ingress/jobs/webhooks.py",
      "if abs((now or time.time()) - timestamp) > tolerance_s:", "if (now or time.time()) - timestamp < -tolerance_s:",
      (ROUND3,)),
    M("OpenAI size: match instead of fullmatch", "deployments/ingress/http/surfaces/common.py",
      "match = SIZE.fullmatch(size)", "match = re.match(r\"^(\\d{1,5})x(\\d{1,5})$\", size)", (ROUND3,)),
    M("JSON: item bound 100x looser", "deployments/ingress/http/readers.py", "if _count_items(text) > MAX_JSON_ITEMS:",
      "if _count_items(text) > 100 * MAX_JSON_ITEMS:", (ROUND3,)),
    M("multipart: truncation not checked", "deployments/ingress/http/readers.py",
      "        _check_complete_multipart(content_type, body)\n", "", (ROUND3,)),
    M("upload slots: the fastest body evicted", "deployments/ingress/http/readers.py",
      "and u.rate(now) < MIN_BODY_RATE]", "and u.rate(now) >= MIN_BODY_RATE]", (ROUND3,)),
    M("batch key: scheduler dropped", "deployments/messages.py",
      "return (self.model, self.width, self.height, self.steps, self.scheduler, self.guidance_scale > 1,",
      "return (self.model, self.width, self.height, self.steps, self.guidance_scale > 1,",
      ("tests/deployments/generator/test_batch_key.py",)),
    M("batch key: strength splits text-to-image too", "deployments/messages.py",
      "self.strength if self.init_image is not None else None,", "self.strength,",
      ("tests/deployments/generator/test_batch_key.py",)),
    M("memory store: a finished job finishes again", "deployments/ingress/jobs/store.py",
      'if job is None or job["status"] in TERMINAL:', "if job is None:", (STORE,)),
    M("memory store: one attempt more than allowed", "deployments/ingress/jobs/store.py",
      'elif job.get("attempts", 0) >= max_attempts:', 'elif job.get("attempts", 0) > max_attempts:', (STORE,)),
    M("redis store: a running job's cancel request lost", "deployments/ingress/jobs/store.py",
      "if s == 'running' then redis.call('HSET', KEYS[1], 'cancel', '1') end", "", (STORE,)),
    M("safety: refuse when any image is flagged", "deployments/generator/deployment.py",
      'if self.args.safety.action == "refuse" and all(nsfw):', 'if self.args.safety.action == "refuse" and any(nsfw):',
      ("tests/deployments/generator/test_safety_mixed_flags.py",)),
    M("generator: decode check not passed", "deployments/generator/deployment.py",
      "callback=on_step, still_wanted=still_wanted)", "callback=on_step)",
      ("tests/deployments/generator/test_decode_abandoned.py",)),
    M("ingress header check skips the framing walk", "instantid/image_limits.py",
      "    check_structure(data, label)\n    try:\n        with Image.open(io.BytesIO(data)) as image:",
      "    try:\n        with Image.open(io.BytesIO(data)) as image:", (LIMITS,)),
]


def run(mutation: Mutation, timeout: int, root: Path) -> tuple[bool, str, float]:
    path = root / mutation.path
    original = path.read_bytes()
    text = original.decode()
    if text.count(mutation.old) != 1:
        raise SystemExit(f"{mutation.path}: the snippet for {mutation.what!r} occurs {text.count(mutation.old)} times")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", RAY_USAGE_STATS_ENABLED="0",
               PYTHONPATH=str(root))
    started = time.monotonic()
    try:
        path.write_text(text.replace(mutation.old, mutation.new))
        try:
            out = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
                                  "-m", "not serve", *mutation.tests], cwd=root, env=env, capture_output=True,
                                 text=True, timeout=timeout)
            rc, tail = out.returncode, out.stdout
        except subprocess.TimeoutExpired:
            rc, tail = -1, "timeout"
    finally:
        path.write_bytes(original)
        assert path.read_bytes() == original
    failed = [line.split(" ")[1] for line in tail.splitlines() if line.startswith(("FAILED ", "ERROR "))]
    # rc 1: a test failed; 5 (nothing collected), 2-4 (usage, internal errors) say nothing about the mutation
    killed = rc == 1
    by = failed[0].split("::", 1)[-1] if failed else ("timeout" if rc == -1 else f"rc={rc}")
    return killed, by, time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", type=int, nargs="*", help="mutation numbers (1-based)")
    parser.add_argument("--list", action="store_true")
    parser.add_argument("--timeout", type=int, default=900)
    parser.add_argument("--copy", type=Path, help="where to copy the tree (default: a temporary directory)")
    args = parser.parse_args()
    chosen = [(i, m) for i, m in enumerate(MUTATIONS, 1) if not args.only or i in args.only]
    if args.list:
        for i, m in chosen:
            print(f"{i:3d}  {m.path}: {m.what}")
        return
    import tempfile

    root = args.copy or Path(tempfile.mkdtemp(prefix="mutation-audit-"))
    for name in COPIED:
        source, target = ROOT / name, root / name
        if source.is_dir():
            shutil.copytree(source, target, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, target)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the finally restores the file
    print("| # | mutation | file | tests run | killed by |\n|---|---|---|---|---|", flush=True)
    killed = 0
    for i, m in chosen:
        dead, by, seconds = run(m, args.timeout, root)
        killed += dead
        tests = ", ".join(t.replace("tests/", "") for t in m.tests)
        print(f"| {i} | {m.what} | `{m.path}` | {tests} | {'`' + by + '`' if dead else '**survived** (' + by + ')'} |",
              flush=True)
    print(f"\nkilled {killed} of {len(chosen)}", flush=True)


if __name__ == "__main__":
    main()
