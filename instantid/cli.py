"""The ``instantid`` command: generate, score, analyze, make-tiny, download.

Bad input gets one line on stderr and a non-zero exit, and nothing is written. Inputs are checked before any
model is loaded, so a typo costs milliseconds, not a model load.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import secrets
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np

from . import defaults
from .errors import InstantIDError, InvalidParameterError

EXIT_INPUT = 1  # the user's input or configuration is wrong
EXIT_INTERNAL = 3  # a bug or an environment failure
FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}


def _lora(value: str) -> tuple[str, float]:
    """PATH[:SCALE]; the scale is split off only when the last ':' part is a number (s3:// has colons)."""
    path, sep, scale = value.rpartition(":")
    if sep:
        try:
            return path, float(scale)
        except ValueError:
            pass
    return value, 1.0


def _person(value: str) -> tuple[list[str], int | None, tuple | None, str | None]:
    """IMG[,IMG...] then optionally :N (group face index), @X1,Y1,X2,Y2 (box) or @K.json (keypoints file)."""
    photos, index, box, kps = value, None, None, None
    if "@" in value:
        photos, where = value.rsplit("@", 1)
        if where.lower().endswith(".json"):
            kps = where
        else:
            try:
                box = tuple(float(v) for v in where.split(","))
            except ValueError:
                box = ()
            if len(box) != 4:
                raise argparse.ArgumentTypeError(f"{where!r} is not a box X1,Y1,X2,Y2 nor a keypoints .json file")
    else:
        head, _, tail = value.rpartition(":")
        if head and tail.isdigit():
            photos, index = head, int(tail)
    paths = [p for p in photos.split(",") if p]
    if not paths:
        raise argparse.ArgumentTypeError(f"no face photo in {value!r}")
    return paths, index, box, kps


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="instantid", description="InstantID identity-preserving generation.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for internal errors")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate images of the person in --face")
    models = gen.add_argument_group("models (hub id, local path or s3://)")
    models.add_argument("--base-model", default="stabilityai/stable-diffusion-xl-base-1.0",
                        help="SDXL diffusers dir/repo or a single .safetensors checkpoint")
    models.add_argument("--base-config", default=None,
                        help="diffusers layout to take configs from when --base-model is a single file")
    models.add_argument("--instantid", default="InstantX/InstantID",
                        help="directory/repo with ControlNetModel/ and ip-adapter.bin")
    models.add_argument("--face-model", default="antelopev2",
                        help="insightface pack name, directory, hub repo id or s3:// (InstantID's adapter was "
                             "trained on antelopev2 embeddings: another recogniser loses the identity)")
    models.add_argument("--lora", action="append", default=[], type=_lora, metavar="PATH[:SCALE]")
    models.add_argument("--controlnet", action="append", default=[], metavar="REF",
                        help="extra spatial ControlNet; pair each with --control-image")
    models.add_argument("--control-image", action="append", default=[], metavar="IMG",
                        help="the control map itself, or with --control-type the photo to derive it from")
    models.add_argument("--control-type", action="append", default=[], choices=["canny", "depth", "pose"],
                        help="derive each --controlnet's map from its --control-image (default: the --pose photo, "
                             "else the first --face) as the multi-ControlNet demo does; one per --controlnet")
    models.add_argument("--control-scale", action="append", default=[], type=float, metavar="F",
                        help="default: the demo's per type (pose 0.4, canny 0.3, depth 0.5), 1.0 for a ready map")
    models.add_argument("--depth-model", default="Intel/dpt-hybrid-midas", metavar="REF",
                        help="depth estimator for --control-type depth (transformers DPT layout)")
    models.add_argument("--pose-model", default="yzd-v/DWPose", metavar="REF",
                        help="DWPose ONNX files (yolox_l.onnx, dw-ll_ucoco_384.onnx) for --control-type pose")

    who = gen.add_argument_group("identity and pose")
    who.add_argument("--face", action="append", default=[], metavar="IMG",
                     help="reference photo; repeat for several (their embeddings are averaged)")
    who.add_argument("--face-embedding", metavar="E.npy", help="a saved 512-d embedding instead of --face")
    who.add_argument("--face-kps", metavar="K.json", help="five [x, y] points on the output canvas")
    who.add_argument("--pose", metavar="IMG", help="take the keypoints from this photo instead (with --person: "
                                                   "the group photo whose faces, left to right, --person picks)")
    who.add_argument("--person", action="append", default=[], type=_person, metavar="IMG[,IMG][:N|@BOX|@K.json]",
                     help="one of 2-4 people in one picture, repeated (instead of --face): their photos, then "
                          "where they go: :N the N-th face (0-based, left to right) of the --pose group photo "
                          "(default: the person's position among the --person options), @X1,Y1,X2,Y2 a face box "
                          "on the output canvas, or @K.json five keypoints on it. Each identity acts only in its "
                          "face box grown by 25%% per side; regions may not overlap")

    who.add_argument("--combine", choices=defaults.COMBINE_MODES, default=defaults.COMBINE,
                     help="how several --face photos combine: average (the demo's mean raw embedding), norm_average "
                          "(mean of unit vectors at their mean length: every photo pulls equally), concat (16 ID "
                          "tokens per photo side by side); ComfyUI_InstantID's combine_embeds")
    who.add_argument("--noise", type=float, default=defaults.NOISE, metavar="F",
                     help="0-1: uniform noise of this size in the unconditional identity embedding instead of zeros, "
                          "seeded by --seed (ComfyUI_InstantID's noise, which it sets to 0.35 against the 'burnt' "
                          "look); 0 (default): the demo's")
    who.add_argument("--det-size", type=int, default=None, metavar="N",
                     help=f"face detector input side, a multiple of 32 from {defaults.DET_SIZE_MIN} to "
                          f"{defaults.DET_SIZE_MAX} (default {defaults.DET_SIZE}): larger finds smaller faces, slower")
    who.add_argument("--det-retry", action="store_true",
                     help="when no face is found, retry 64 pixels smaller at a time down to 192 (faces filling the "
                          "photo), as ComfyUI_InstantID does")
    who.add_argument("--face-index", type=int, default=None, metavar="N",
                     help="use the N-th face (0-based, left to right) of each --face photo instead of the largest")
    who.add_argument("--pose-face-index", type=int, default=None, metavar="N",
                     help="take the keypoints from the N-th face (0-based, left to right) of the --pose photo")

    what = gen.add_argument_group("generation")
    what.add_argument("--prompt", default="", help="text prompt (empty: image-only)")
    what.add_argument("--negative-prompt", default=None)
    what.add_argument("--style", default=None, help="named style preset (see instantid/styles.json)")
    what.add_argument("--width", type=int, default=None,
                      help="default: the init image's or pose photo's size after the demo's resize (1024 for bare "
                           "--face-kps); another aspect gets the pose by cover-fit, never stretched")
    what.add_argument("--height", type=int, default=None)
    what.add_argument("--prompt-weighting", choices=["none", "lpw"], default=None,
                      help="lpw (default): the demo's (text:1.3) weighting, no 77-token limit; none: plain CLIP")
    what.add_argument("--enhance-face-region", action=argparse.BooleanOptionalAction, default=None,
                      help="identity and pose act only in the face box (on by default when a photo gives one)")
    what.add_argument("--control-mask", metavar="IMG", help="explicit region mask, white = face (resized to fit)")
    what.add_argument("--init-image", metavar="IMG", help="img2img: restyle this picture keeping the identity")
    what.add_argument("--strength", type=float, default=defaults.IMG2IMG_STRENGTH, help="img2img: share of the schedule run, (0, 1]")
    what.add_argument("--save-pose-image", metavar="PATH", help="also write the keypoint image IdentityNet got")
    what.add_argument("--save-control-maps", metavar="DIR",
                      help="also write each extra ControlNet's map as DIR/control<N>-<type>.png")
    what.add_argument("--steps", type=int, default=defaults.STEPS)
    what.add_argument("--guidance-scale", type=float, default=defaults.GUIDANCE_SCALE)
    what.add_argument("--ip-adapter-scale", type=float, default=defaults.IP_ADAPTER_SCALE)
    what.add_argument("--controlnet-conditioning-scale", type=float,
                      default=defaults.CONTROLNET_CONDITIONING_SCALE)
    what.add_argument("--control-guidance-start", type=float, default=0.0)
    what.add_argument("--control-guidance-end", type=float, default=1.0)
    what.add_argument("--num-images", type=int, default=1)
    what.add_argument("--seed", type=int, default=None, help="random when absent (printed)")
    what.add_argument("--scheduler", default="default",
                      help="default (the model's own), euler, euler_a, dpmpp_2m_karras, lcm")
    what.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    what.add_argument("--dtype", choices=["auto", "float32", "float16", "bfloat16"], default="auto")
    what.add_argument("--output", required=True, help="PATH.png/.jpg/.webp; -N suffixes for several images")
    what.add_argument("--no-score", dest="score", action="store_false",
                      help="skip the identity score printed (on stderr) next to each file written (without the "
                           "face model, e.g. with --face-embedding, it is skipped with a note, exit 0)")

    ana = sub.add_parser("analyze", help="detect faces; print JSON and save embeddings")
    ana.add_argument("images", nargs="+", metavar="IMG")
    ana.add_argument("--face-model", default="antelopev2",
                     help="as for generate (InstantID's adapter was trained on antelopev2 embeddings)")
    ana.add_argument("--output-dir", default=".", help="where <image>.face<N>.npy embeddings are saved")

    tiny = sub.add_parser("make-tiny", help="write a tiny random-weight bundle (plumbing tests, not images)")
    tiny.add_argument("directory")

    _add_download_parser(sub)
    _add_score_parser(sub)
    return parser


def _add_score_parser(sub) -> None:
    score = sub.add_parser("score", help="identity similarity (FaceSim) of images to reference photos")
    score.add_argument("images", nargs="+", metavar="IMG", help="generated images to score")
    score.add_argument("--reference", action="append", default=[], metavar="IMG",
                       help="reference photo; repeat for several (scored against their averaged embedding, "
                            "and against each)")
    score.add_argument("--face-embedding", metavar="E.npy", help="a saved 512-d embedding instead of --reference")
    score.add_argument("--face-model", default="antelopev2", help="as for generate")


def _add_download_parser(sub) -> None:
    from .sources import BASE_MODEL, FACE_MODEL, INSTANTID, describe_sources

    down = sub.add_parser(
        "download", help="fetch the models a configuration needs into the local caches (then run offline)",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=describe_sources(),
        description=textwrap.fill(
            "Fetch the SDXL base (only the weight variant --dtype loads), InstantID's ControlNetModel/ and "
            "ip-adapter.bin, and the face pack into the caches the service reads: the Hugging Face cache "
            "($HF_HOME), $INSTANTID_CACHE (s3://) and $INSIGHTFACE_HOME (a named face pack). Progress bars; a "
            "dropped connection resumes within the file, and a run again fetches only what is not complete yet; "
            "every file is checked against its hash; the face pack is checked to be one InstantID can use. Prints the terms of what it fetched. Afterwards everything "
            "loads with HF_HUB_OFFLINE=1.", 100))
    down.add_argument("--config", metavar="FILE",
                      help="a service configuration (YAML/JSON: a Serve config such as serve/production.yaml, or "
                           "the application's args; - reads standard input): fetch every model it names, i.e. "
                           "each base model, InstantID, the face pack, extra ControlNets, LoRAs, the safety checker "
                           "when enabled and the depth/pose preprocessors its ControlNets need. Not with "
                           "--base-model/--weights/--face-model")
    down.add_argument("--base-model", default=None, metavar="REF",
                      help=f"SDXL diffusers repo, directory or s3:// (default {BASE_MODEL.ref})")
    down.add_argument("--weights", default=None, metavar="REF",
                      help="InstantID repo, directory or s3:// with ControlNetModel/ and ip-adapter.bin "
                           f"(default {INSTANTID.ref})")
    down.add_argument("--face-model", default=None, metavar="REF",
                      help=f"insightface pack: a name (installed under $INSIGHTFACE_HOME/models; {FACE_MODEL.ref} "
                           f"comes from {FACE_MODEL.hub_repo}), a hub repo id, a directory or s3://. InstantID's "
                           f"adapter was trained on {FACE_MODEL.ref} embeddings (default {FACE_MODEL.ref})")
    down.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default="float16",
                      help="the dtype the service will run in: float16/bfloat16 fetch the SDXL fp16 files only "
                           "(default %(default)s)")


# -- generate -------------------------------------------------------------------------------------------
def _check_generate_args(args) -> None:
    """Everything that can be checked without loading a model."""
    from .schedulers import NAMES

    for name in ("width", "height"):
        value = getattr(args, name)
        if value is not None and (value <= 0 or value % 8):
            raise InvalidParameterError(f"--{name}", f"must be a positive multiple of 8, got {value}")
    if args.steps < 1:
        raise InvalidParameterError("--steps", "must be at least 1")
    if args.num_images < 1:
        raise InvalidParameterError("--num-images", "must be at least 1")
    if args.scheduler not in NAMES:
        raise InvalidParameterError("--scheduler", f"unknown {args.scheduler!r}; choose one of {list(NAMES)}")
    if args.person:
        _check_people(args)
    elif bool(args.face) == bool(args.face_embedding):
        raise InvalidParameterError("--face", "give either --face IMG (repeatable) or --face-embedding E.npy")
    if args.face_embedding and not (args.face_kps or args.pose):
        raise InvalidParameterError("--face-kps", "--face-embedding needs --face-kps K.json or --pose IMG")
    if args.control_type and len(args.control_type) != len(args.controlnet):
        raise InvalidParameterError("--control-type", "give one --control-type per --controlnet, or none")
    if len(args.control_image) != len(args.controlnet) and not (args.control_type and not args.control_image):
        raise InvalidParameterError("--control-image", "give one --control-image per --controlnet (with "
                                                       "--control-type they may all be left out: the pose photo)")
    if args.save_control_maps and not Path(args.save_control_maps).expanduser().is_dir():
        raise InvalidParameterError("--save-control-maps", f"{args.save_control_maps} is not a directory")
    if args.control_scale and len(args.control_scale) != len(args.controlnet):
        raise InvalidParameterError("--control-scale", "give one --control-scale per --controlnet, or none")
    suffix = Path(args.output).suffix.lower()
    if suffix not in FORMATS:
        raise InvalidParameterError("--output", f"extension must be one of {sorted(FORMATS)}, got {suffix!r}")
    if not Path(args.output).expanduser().resolve().parent.is_dir():
        raise InvalidParameterError("--output", f"directory {Path(args.output).parent} does not exist")
    if not 0 < args.strength <= 1:
        raise InvalidParameterError("--strength", f"must be in (0, 1], got {args.strength}")
    _check_face_options(args)
    if args.enhance_face_region and args.control_mask:
        raise InvalidParameterError("--control-mask", "give --control-mask or --enhance-face-region, not both")
    if args.enhance_face_region and not (args.face or args.pose):
        raise InvalidParameterError("--enhance-face-region", "needs a face box: --face or --pose photos (bare "
                                                             "--face-kps have none; use --control-mask)")
    if args.save_pose_image:
        pose_path = Path(args.save_pose_image).expanduser()
        if pose_path.suffix.lower() not in FORMATS:
            raise InvalidParameterError("--save-pose-image", f"extension must be one of {sorted(FORMATS)}")
        if not pose_path.resolve().parent.is_dir():
            raise InvalidParameterError("--save-pose-image", f"directory {pose_path.parent} does not exist")


def _check_face_options(args) -> None:
    from .face import check_det_size

    if not 0 <= args.noise <= 1:
        raise InvalidParameterError("--noise", f"must be in [0, 1], got {args.noise}")
    if args.det_size is not None:
        check_det_size(args.det_size, "--det-size")
    for flag, value in (("--face-index", args.face_index), ("--pose-face-index", args.pose_face_index)):
        if value is not None and value < 0:
            raise InvalidParameterError(flag, f"must be 0 or more, got {value}")
    if args.face_index is not None and not args.face:
        raise InvalidParameterError("--face-index", "picks a face of the --face photos; give --face")
    if args.pose_face_index is not None and (not args.pose or args.person):
        raise InvalidParameterError("--pose-face-index", "picks the face of a --pose photo (with --person, each "
                                                         "person's :N does)")
    if args.combine == "concat" and args.person:
        raise InvalidParameterError("--combine", "concat is for one identity; with --person use average or "
                                                 "norm_average")


def _detection(args, index: int | None = None):
    from .identity import Detection

    return Detection(det_size=args.det_size, retry=args.det_retry, face_index=index)


def _check_people(args) -> None:
    from .people import MAX_PEOPLE

    for flag, given in (("--face", args.face), ("--face-embedding", args.face_embedding),
                        ("--face-kps", args.face_kps), ("--control-mask", args.control_mask),
                        ("--enhance-face-region", args.enhance_face_region is not None)):
        if given:
            raise InvalidParameterError(flag, "not with --person (each person brings its face and region)")
    if len(args.person) > MAX_PEOPLE:
        raise InvalidParameterError("--person", f"at most {MAX_PEOPLE} people, got {len(args.person)}")
    for i, (_, index, box, kps) in enumerate(args.person):
        if box is None and kps is None and not args.pose:
            raise InvalidParameterError("--person", f"person {i + 1} needs --pose GROUP.jpg (a face index), "
                                                    "@X1,Y1,X2,Y2 or @K.json")


def _read_people(args) -> list[tuple[list, "Placement"]]:
    """Each --person's photos (read) and placement, before any model loads."""
    from .face import load_image
    from .people import Placement

    out = []
    for i, (paths, index, box, kps) in enumerate(args.person):
        if box is not None:
            placement = Placement(box=box)
        elif kps is not None:
            placement = Placement(keypoints=_read_kps(kps, "--person"))
        else:
            placement = Placement(face_index=i if index is None else index)
        out.append(([(path, load_image(path)) for path in paths], placement))
    return out


def _people(persons, pose_photo, analyzer, width, height, args):
    """The --person options as pipeline people on the output canvas (and that canvas's size)."""
    from .identity import build_identity
    from .people import group_faces, place_people

    group = group_faces(analyzer, *pose_photo, args.det_size, args.det_retry) if pose_photo else None
    embeddings, placements, references = [], [], []
    for photos, placement in persons:
        identity = build_identity(analyzer, photos, detection=_detection(args), combine=args.combine)
        embeddings.append(identity.embedding)
        references.append(identity.pose)
        placements.append(placement)
    if group is None and (width is None or height is None):
        width, height = width or 1024, height or 1024
    people, size = place_people(embeddings, placements, width, height, group=group, references=references)
    return people, size, embeddings


def _read_embedding(path: str) -> np.ndarray:
    from .face import validate_embedding

    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise InvalidParameterError("--face-embedding", f"cannot read {path}: {exc}") from exc
    return validate_embedding(data)


def _read_kps(path: str, flag: str = "--face-kps") -> np.ndarray:
    from .face import validate_keypoints

    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise InvalidParameterError(flag, f"cannot read {path}: {exc}") from exc
    return validate_keypoints(data)


def _output_size(args, init_image) -> tuple[int | None, int | None]:
    """The explicit size; missing sides come from the init image after the demo's resize (img2img), else later
    from the pose canvas."""
    width, height = args.width, args.height
    if init_image is not None and (width is None or height is None):
        from .face import analysis_size

        canvas = analysis_size(*init_image.size)
        width, height = width or canvas[0], height or canvas[1]
    return width, height


def _output_paths(output: str, count: int) -> list[Path]:
    path = Path(output).expanduser()
    if count == 1:
        return [path]
    return [path.with_name(f"{path.stem}-{i + 1}{path.suffix}") for i in range(count)]


def _staging_file(path: Path) -> Path:
    """A new, empty temporary file beside ``path``, created with mode 0666 less the umask as any new file is
    (``mkstemp`` creates 0600, which ``os.replace`` would hand on to the output)."""
    while True:
        tmp = path.with_name(f".{path.stem}.{secrets.token_hex(6)}{path.suffix}")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue


def _save_all(images, paths: list[Path]) -> None:
    """Write every image to a temporary file first; rename only when all succeeded (nothing partial)."""
    staged = []
    try:
        for image, path in zip(images, paths):
            tmp = _staging_file(path)
            staged.append((tmp, path))
            image.save(tmp, format=FORMATS[path.suffix.lower()])
        for tmp, path in staged:
            os.replace(tmp, path)
        staged = []
    finally:
        for tmp, _ in staged:
            Path(tmp).unlink(missing_ok=True)


def _loading():
    """The loader module. Importing it imports diffusers' pipelines, which makes transformers log a notice per
    image processor when torchvision is absent; those are silenced so that stderr carries only our own line."""
    try:
        from transformers.utils import logging as transformers_logging
    except ImportError:  # pragma: no cover - transformers is a dependency
        from . import loading

        return loading
    level = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        from . import loading
    finally:
        transformers_logging.set_verbosity(level)
    return loading


def cmd_generate(args) -> int:
    from .face import load_image
    from .identity import Pose, build_identity, build_pose
    from .styles import apply_style

    _check_generate_args(args)
    prompt, negative = apply_style(args.style, args.prompt, args.negative_prompt)
    faces = [(path, load_image(path)) for path in args.face]
    pose_photo = (args.pose, load_image(args.pose)) if args.pose else None
    controls = [load_image(path, f"--control-image {path}") for path in args.control_image]
    control_mask = load_image(args.control_mask, f"--control-mask {args.control_mask}") if args.control_mask else None
    init_image = load_image(args.init_image, f"--init-image {args.init_image}") if args.init_image else None
    embedding = _read_embedding(args.face_embedding) if args.face_embedding else None
    kps = _read_kps(args.face_kps) if args.face_kps else None
    persons = _read_people(args)
    loading = _loading()
    loading.pick_dtype(args.dtype, loading.pick_device(args.device))  # before any model (face model too) loads

    width, height = _output_size(args, init_image)
    people = []
    if args.person:
        from .face import FaceModel
        from .people import keypoints_overview

        analyzer = FaceModel(args.face_model)
        people, (width, height), person_embeddings = _people(persons, pose_photo, analyzer, width, height, args)
        embedding = keypoint_image = None
    else:
        pose = Pose(kps, (width or 1024, height or 1024)) if kps is not None else None
        if faces or pose_photo:
            from .face import FaceModel

            analyzer = FaceModel(args.face_model)
            if faces:
                identity = build_identity(analyzer, faces, detection=_detection(args, args.face_index),
                                          combine=args.combine)
                embedding, pose = identity.embedding, pose or identity.pose
            if pose_photo:
                pose = build_pose(analyzer, *pose_photo, _detection(args, args.pose_face_index))

        width, height = width or pose.size[0], height or pose.size[1]  # default: the pose photo's analysed canvas
        keypoint_image = pose.draw(width, height)
        if args.enhance_face_region is not False and pose.bbox is not None and control_mask is None:
            control_mask = pose.face_mask(width, height)  # on by default wherever a face box is known, as the demo

    scorer, unscored = _scorer(args, analyzer if (faces or pose_photo or people) else None)

    from .pipeline import GenerationRequest
    from .prompt_weighting import DEFAULT

    loras = {f"lora{i}": path for i, (path, _) in enumerate(args.lora)}
    controlnets = {f"control{i}": ref for i, ref in enumerate(args.controlnet)}
    # maps before the pipeline: a bad preprocessor reference fails before the big load
    control_inputs = _control_inputs(args, controlnets, controls, faces, pose_photo, (width, height))
    pipe = loading.load_pipeline(args.base_model, args.instantid, device=args.device, dtype=args.dtype,
                                 controlnets=controlnets, loras=loras, base_config=args.base_config)
    pipe.set_loras({f"lora{i}": scale for i, (_, scale) in enumerate(args.lora)})
    seed = args.seed if args.seed is not None else random.randint(0, defaults.MAX_SEED)
    request = GenerationRequest(
        face_embedding=embedding, keypoint_image=keypoint_image, prompt=prompt,
        negative_prompt=negative, num_images=args.num_images, seed=seed, guidance_scale=args.guidance_scale,
        ip_adapter_scale=args.ip_adapter_scale, controlnet_conditioning_scale=args.controlnet_conditioning_scale,
        control_guidance_start=args.control_guidance_start, control_guidance_end=args.control_guidance_end,
        controls=control_inputs,
        prompt_weighting=args.prompt_weighting or DEFAULT, control_mask=control_mask, init_image=init_image,
        strength=args.strength, people=people, noise=args.noise,
    )
    images = pipe.generate([request], width=width, height=height, steps=args.steps, scheduler=args.scheduler)[0]
    paths = _output_paths(args.output, len(images))
    outputs = list(zip(images, paths))  # what gets a score: not the keypoint image
    if args.save_pose_image:
        pose_image = keypoints_overview(people) if people else keypoint_image
        images, paths = [*images, pose_image], [*paths, Path(args.save_pose_image).expanduser()]
    if args.save_control_maps:
        maps = Path(args.save_control_maps).expanduser()
        kinds = args.control_type or ["map"] * len(control_inputs)
        images = [*images, *(c.image for c in control_inputs)]
        paths = [*paths, *(maps / f"control{i}-{kind}.png" for i, kind in enumerate(kinds))]
    _save_all(images, paths)
    for path in paths:
        print(path)
    print(f"seed: {seed}", file=sys.stderr)
    if args.score:
        references = [face.embedding for face in identity.faces] if faces else None
        try:
            if scorer is None:
                raise unscored
            lines = [f"{path}: {_people_score_line(scorer, image, people, person_embeddings)}" if people
                     else f"{path}: identity {_score_line(scorer, image, embedding, references)}"
                     for image, path in outputs]
        except Exception as exc:  # the images are written: the score is extra, never a failure after them
            if args.debug and exc is not unscored:
                raise
            reason = str(exc) if isinstance(exc, InstantIDError) else f"{type(exc).__name__}: {exc}"
            lines = [f"identity score skipped: {reason}".splitlines()[0]]
        for line in lines:
            print(line, file=sys.stderr)
    return 0


def _scorer(args, analyzer):
    """(face model for the identity score, None) or (None, why not): a saved identity generates without the face
    pack, so a missing one skips the score instead of failing after the images are written."""
    if not args.score or analyzer is not None:
        return analyzer, None
    from .face import FaceModel

    try:
        return FaceModel(args.face_model), None
    except InstantIDError as exc:
        return None, exc


def _control_inputs(args, controlnets: dict, controls: list, faces: list, pose_photo, size) -> list:
    """Each --controlnet's input: its --control-image as the map, or with --control-type the map derived from it
    (default photo: the pose photo, else the first face photo, as the demo)."""
    from .controls import ControlSpec, Preprocessors, prepare_controls

    if not controlnets:
        return []
    kinds = args.control_type or [None] * len(controlnets)
    if not controls:
        default = pose_photo or (faces[0] if faces else None)
        if default is None:
            raise InvalidParameterError("--control-image", "--control-type needs a photo: --control-image, --pose "
                                                           "or --face")
        controls = [default[1]] * len(controlnets)
    scales = args.control_scale or [None if kind else 1.0 for kind in kinds]
    specs = [ControlSpec(kind or "map", photo=image if kind else None, map=None if kind else image, scale=scale)
             for kind, image, scale in zip(kinds, controls, scales)]
    inputs = prepare_controls(Preprocessors(depth=args.depth_model, pose=args.pose_model), specs, size)
    for control, name in zip(inputs, controlnets):
        control.name = name
    return inputs


def _score_line(analyzer, image, embedding, references) -> str:
    from .scoring import score_image

    score = score_image(analyzer, image, embedding, references)
    if not score.face_found:
        return "no face found"
    line = f"similarity {score.similarity:.4f}"
    if score.per_reference:
        line += " (per reference: " + ", ".join(f"{s:.4f}" for s in score.per_reference) + ")"
    return line


def _people_score_line(analyzer, image, people, embeddings) -> str:
    from .scoring import score_people

    parts = []
    for i, score in enumerate(score_people(analyzer, image, [p.region for p in people], embeddings)):
        parts.append(f"person {i + 1} " + (f"similarity {score.similarity:.4f}" if score.face_found
                                            else "no face found in its region"))
    return "; ".join(parts)


def cmd_score(args) -> int:
    from .face import FaceModel, load_image
    from .identity import build_identity

    if bool(args.reference) == bool(args.face_embedding):
        raise InvalidParameterError("--reference", "give either --reference IMG (repeatable) or --face-embedding")
    embedding = _read_embedding(args.face_embedding) if args.face_embedding else None
    references = [(path, load_image(path)) for path in args.reference]
    images = [(path, load_image(path)) for path in args.images]  # all readable before any model loads
    analyzer = FaceModel(args.face_model)
    per_photo = None
    if references:
        identity = build_identity(analyzer, references)
        embedding, per_photo = identity.embedding, [face.embedding for face in identity.faces]
    for path, image in images:
        print(f"{path}\t{_score_line(analyzer, image, embedding, per_photo)}")
    return 0


# -- analyze --------------------------------------------------------------------------------------------
def cmd_analyze(args) -> int:
    from .face import FaceModel, analysis_mapping, load_image, resize_for_analysis

    images = [(path, load_image(path)) for path in args.images]  # all readable before any work
    out_dir = Path(args.output_dir)
    if not out_dir.is_dir():
        raise InvalidParameterError("--output-dir", f"{out_dir} is not a directory")
    by_stem: dict[str, str] = {}
    for path, _ in images:  # embeddings are saved as <stem>.face<N>.npy: two files must not share a stem
        other = by_stem.setdefault(Path(path).stem, path)
        if Path(other).resolve() != Path(path).resolve():
            raise InvalidParameterError("images", f"{other} and {path} would save their embeddings under the same "
                                                  f"name {Path(path).stem}.face<N>.npy; analyze them separately")
    analyzer = FaceModel(args.face_model)
    report, arrays = [], []
    for path, image in images:
        canvas = resize_for_analysis(image)
        # report coordinates on the original photo; embeddings are computed on the analysed canvas
        mapping = analysis_mapping(*image.size)
        faces = []
        for i, face in enumerate(analyzer.analyze(canvas)):
            target = out_dir / f"{Path(path).stem}.face{i}.npy"
            arrays.append((target, face.embedding))
            found = face.to_dict(*mapping)
            faces.append({
                "bbox": np.round(found["bbox"], 2).tolist(),
                "score": round(found["score"], 4),
                "kps": np.round(found["kps"], 2).tolist(),
                "embedding": str(target),
            })
        report.append({"image": path, "width": image.size[0], "height": image.size[1], "faces": faces})
    for target, embedding in arrays:
        np.save(target, embedding)
    print(json.dumps(report, indent=2))
    return 0


def tiny_usage(root: Path) -> str:
    """How to generate with the tiny bundle at ``root``: the ``generate`` flags pointing at its folders."""
    import shlex

    def q(path: Path) -> str:
        return shlex.quote(str(path))

    return (
        "tiny random weights: outputs are noise, for plumbing tests only. Generate with it:\n"
        f"  instantid generate --base-model {q(root / 'sdxl')} --instantid {q(root / 'instantid')} \\\n"
        f"      --face-model {q(root / 'antelopev2')} --face PHOTO.jpg --prompt 'a person' \\\n"
        "      --width 64 --height 64 --steps 2 --output out.png\n"
        f"  optional: --lora {q(root / 'lora' / 'pytorch_lora_weights.safetensors')}:0.8 "
        f"--controlnet {q(root / 'controlnet-extra')} --control-image IMG\n"
        f"The service's tiny profile uses it as tiny_dir: {q(root)}"
    )


def cmd_make_tiny(args) -> int:
    from .tiny import make_tiny

    root = make_tiny(args.directory)
    print(root)  # stdout: the path alone, for scripts
    print(tiny_usage(Path(root)), file=sys.stderr)
    return 0


def cmd_download(args) -> int:
    from .download import cache_locations, download, download_config, load_config
    from .sources import BASE_MODEL, FACE_MODEL, INSTANTID

    named = [flag for flag, value in (("--base-model", args.base_model), ("--weights", args.weights),
                                      ("--face-model", args.face_model)) if value is not None]
    if args.config is not None:
        if named:
            raise InvalidParameterError("config", f"give the models in the config or as {', '.join(named)}, not both")
        fetched = download_config(load_config(args.config), dtype=args.dtype)
    else:
        fetched = download(args.base_model or BASE_MODEL.ref, args.weights or INSTANTID.ref,
                           args.face_model or FACE_MODEL.ref, dtype=args.dtype)
    for item in fetched:
        print(f"{item.role}: {item.ref}\n  at {item.path}\n  {item.detail}")
        for line in item.terms():
            print(f"  {line}")
    print("caches: " + "; ".join(cache_locations()))
    print("everything is local: the service and `instantid generate` now run with HF_HUB_OFFLINE=1")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    commands = {"generate": cmd_generate, "analyze": cmd_analyze, "make-tiny": cmd_make_tiny,
                "download": cmd_download, "score": cmd_score}
    try:
        with warnings.catch_warnings():
            if not args.debug:  # libraries' deprecation notices are not the user's business
                warnings.simplefilter("ignore", FutureWarning)
                warnings.simplefilter("ignore", DeprecationWarning)
            return commands[args.command](args)
    except InstantIDError as exc:
        print(f"instantid: error: {exc}", file=sys.stderr)
        return EXIT_INPUT
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # an environment failure or a bug: one line unless --debug
        if args.debug:
            raise
        print(f"instantid: internal error: {type(exc).__name__}: {exc}".splitlines()[0], file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
