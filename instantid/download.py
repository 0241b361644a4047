"""``instantid download``: everything a configuration needs, fetched once into the caches the service reads.

- SDXL base: from the hub, only the weight variant the serving dtype loads (fp16 files for float16/bfloat16),
  plus configs and tokenizers, into the Hugging Face cache (``$HF_HOME``);
- InstantID: ``ControlNetModel/`` and ``ip-adapter.bin``, into the Hugging Face cache;
- the face pack: a name (``antelopev2``) is installed under ``$INSIGHTFACE_HOME/models/<name>`` from its hub
  copy; a hub repo id stays in the Hugging Face cache; ``s3://`` goes to ``$INSTANTID_CACHE``;
- with a service configuration (``download_config``, ``instantid download --config``): also every base model,
  extra ControlNet and LoRA it names, the safety checker when it is on, and the depth/pose preprocessors of the
  control types its models offer, each resolved exactly as the replicas resolve it.

Hub downloads show huggingface_hub's progress bars; a dropped connection resumes within the file (a ranged
request for the rest), and a run after a failed one fetches only the files not yet complete (huggingface_hub
no longer keeps partial files between runs; S3 prefixes already complete are reused). Each file is then
checked against the hash the hub gives it (weights.verify_hub_snapshot), S3 objects by size and MD5
(weights.download_s3). The face pack is loaded once and checked to be one InstantID can
use before it is installed. Afterwards the service starts with no network (HF_HUB_OFFLINE=1 works).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from . import weights
from .errors import InvalidParameterError, WeightsError
from .sources import BASE_MODEL, FACE_MODEL, INSTANTID, ModelSource, source_for

DTYPES = ("float16", "bfloat16", "float32")
INSTANTID_FILES = ["ControlNetModel/config.json", "ControlNetModel/diffusion_pytorch_model.safetensors",
                   "ip-adapter.bin"]


@dataclass
class Fetched:
    """One model now on this machine."""

    role: str
    ref: str
    path: Path
    detail: str  # what was fetched and how it was checked
    source: ModelSource | None  # the default it is, when it is one (its terms are known)

    def terms(self) -> list[str]:
        if self.source is not None:
            return [f"terms: {self.source.terms}", f"see {self.source.terms_url}"]
        if weights.is_hub_ref(self.ref):
            return [f"terms: not known to instantid; read https://huggingface.co/{self.ref} (its model card and "
                    "licence) before you use it"]
        return ["terms: those under which you obtained this copy"]


def _size(path: Path, patterns: list[str] | None = None) -> int:
    """Bytes of the files under ``path`` (following the hub cache's links) that match ``patterns``."""
    import fnmatch

    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and (
        not patterns or any(fnmatch.fnmatch(p.relative_to(path).as_posix(), pat) for pat in patterns)))


def _checked(path: Path, ref: str, patterns: list[str]) -> str:
    if not weights.is_hub_ref(ref):
        return "S3 objects checked by size and MD5" if weights.is_s3(ref) else "local, used in place"
    files, _ = weights.verify_hub_snapshot(path, patterns)
    return f"{files} files checked against the hub's sha256/git hashes"


def fetch_base(ref: str, dtype: str) -> Fetched:
    variant = weights.variant_for_dtype(dtype)
    path, got = weights.resolve_base(ref, variant)
    if path.is_file():  # a single-file checkpoint: the load takes its configs from the default layout
        weights.resolve(BASE_MODEL.ref, allow_patterns=weights.SINGLE_FILE_CONFIG_PATTERNS)
        return Fetched(BASE_MODEL.role, ref, path, f"single file, {path.stat().st_size / 1e9:.2f} GB; configs "
                       f"from {BASE_MODEL.ref}", source_for(ref))
    missing = [rel for rel in ["model_index.json", *weights.base_weights(got)] if not (path / rel).is_file()]
    if missing:
        raise WeightsError(f"{ref} is not a complete SDXL diffusers model: missing {', '.join(missing)}")
    patterns = weights.base_patterns(got)
    checked = _checked(path, ref, patterns)
    label = f"{got} weights" if got else "full-precision weights"
    return Fetched(BASE_MODEL.role, ref, path, f"{label}, {_size(path, patterns) / 1e9:.2f} GB; {checked}",
                   source_for(ref))


def fetch_instantid(ref: str) -> Fetched:
    path = weights.resolve(ref, allow_patterns=weights.INSTANTID_PATTERNS)
    missing = [rel for rel in INSTANTID_FILES if not (path / rel).is_file()]
    if missing:
        raise WeightsError(f"{ref} is not InstantID's layout: missing {', '.join(missing)}")
    checked = _checked(path, ref, weights.INSTANTID_PATTERNS)
    size = _size(path, weights.INSTANTID_PATTERNS)
    return Fetched(INSTANTID.role, ref, path, f"{size / 1e9:.2f} GB; {checked}", source_for(ref))


def check_face_pack(path: Path, ref: str) -> None:
    """Load the pack as the service will (CPU) and refuse one InstantID cannot use (face.check_instantid_pack)."""
    from .face import FaceModel

    FaceModel(str(path), providers=["CPUExecutionProvider"])


def fetch_face_pack(ref: str, root: str | None = None) -> Fetched:
    from .face import PACK_PATTERNS, insightface_home, pack_dir

    ref = str(ref)
    named = not ("/" in ref or ref.startswith(("~", ".")) or Path(ref).expanduser().exists())  # "antelopev2"
    if not named:
        path = pack_dir(ref, root)
        checked = _checked(path, ref, PACK_PATTERNS)
        check_face_pack(path, ref)
        return Fetched(FACE_MODEL.role, ref, path, f"{_size(path, PACK_PATTERNS) / 1e6:.0f} MB; {checked}; "
                       "graphs checked", source_for(ref))
    target = insightface_home(root) / "models" / ref
    source = source_for(ref)
    if target.is_dir():  # installed before: check it, fetch nothing
        check_face_pack(target, ref)
        return Fetched(FACE_MODEL.role, ref, target, "already installed; graphs checked", source)
    if source is None or source.ref != ref:
        raise WeightsError(f"no known source for face pack {ref!r}: give a hub repo id (owner/name), an s3:// "
                           f"prefix or a directory, or install it under {target}")
    snapshot = pack_dir(source.hub_repo, root)
    checked = _checked(snapshot, source.hub_repo, PACK_PATTERNS)
    check_face_pack(snapshot, source.hub_repo)
    _install(snapshot, target)
    return Fetched(FACE_MODEL.role, ref, target, f"from {source.hub_repo}, {_size(target) / 1e6:.0f} MB; "
                   f"{checked}; graphs checked", source)


def _install(snapshot: Path, target: Path) -> None:
    """Copy a pack's ONNX files into ``target`` all at once (staged, then renamed: never half there)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        for onnx in sorted(snapshot.glob("*.onnx")):
            shutil.copyfile(onnx, staging / onnx.name)  # follows the cache's link: a real file, not a link
        os.chmod(staging, 0o755)
        try:
            os.rename(staging, target)
        except OSError:
            if not target.is_dir():  # another process installing it at the same moment is fine
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def download(base_model: str = BASE_MODEL.ref, instantid: str = INSTANTID.ref, face_model: str = FACE_MODEL.ref,
             *, dtype: str = "float16", face_root: str | None = None) -> list[Fetched]:
    """Fetch, verify and check the three models of a configuration; return what is where."""
    if dtype not in DTYPES:
        raise InvalidParameterError("dtype", f"must be one of {', '.join(DTYPES)}, got {dtype!r}")
    # the face pack first: it is small and the check most likely to refuse (a wrong pack named by hand)
    face = fetch_face_pack(face_model, face_root)
    return [fetch_base(base_model, dtype), fetch_instantid(instantid), face]


# -- what a service configuration names -----------------------------------------------------------------------
CONTROL_TYPES_WITH_PREPROCESSOR = ("depth", "pose")  # canny derives its map with OpenCV, no model


def _fetch_dir(role: str, ref: str, patterns: list[str] | None, required: list[str]) -> Fetched:
    """A model directory as the service resolves it (the same ``allow_patterns``), checked complete."""
    path = weights.resolve(ref, allow_patterns=patterns)
    if required:
        missing = [rel for rel in required if not (path / rel).is_file()]
        if missing:
            raise WeightsError(f"{role} {ref} is incomplete: missing {', '.join(missing)}")
    checked = _checked(path, ref, patterns or ["*"])
    return Fetched(role, ref, path, f"{_size(path, patterns) / 1e6:.0f} MB; {checked}", source_for(ref))


def fetch_controlnet(ref: str) -> Fetched:
    return _fetch_dir("ControlNet", ref, weights.CONTROLNET_PATTERNS, weights.CONTROLNET_PATTERNS)


def fetch_lora(ref: str) -> Fetched:
    path = weights.resolve(ref)  # the whole repo or file, as pipeline.load_lora resolves it
    checked = _checked(path, ref, ["*"]) if path.is_dir() else "local, used in place"
    if weights.is_hub_ref(ref) and path.is_dir() and not any(path.rglob("*.safetensors")):
        raise WeightsError(f"LoRA {ref} has no .safetensors weights")
    return Fetched("LoRA", ref, path, f"{_size(path) / 1e6:.0f} MB; {checked}", source_for(ref))


def fetch_safety_checker(ref: str) -> Fetched:
    from .safety import PATTERNS

    return _fetch_dir("safety checker", ref, PATTERNS, ["config.json"])


def fetch_preprocessor(kind: str, ref: str) -> Fetched:
    from .controls import DEPTH_PATTERNS, POSE_PATTERNS

    if kind == "depth":
        return _fetch_dir("depth preprocessor", ref, DEPTH_PATTERNS, ["config.json"])
    return _fetch_dir("pose preprocessor", ref, POSE_PATTERNS, POSE_PATTERNS)


def config_refs(config: dict) -> list[tuple[str, str, str]]:
    """Every model a service configuration names, as (role, field, reference), in fetch order, each reference
    once. ``config`` is the application's args (``AppArgs``: models, instantid, face_model, safety,
    preprocessors) or a whole Serve config (every application's args). Preprocessors are named only where a
    model has a ControlNet of their control type (no request can use them otherwise); the safety checker only
    where it is enabled."""
    from .controls import DEFAULT_PREPROCESSORS
    from .safety import DEFAULT_MODEL as DEFAULT_SAFETY

    if not isinstance(config, dict):
        raise InvalidParameterError("config", "must be a mapping (the application's args or a Serve config)")
    if "applications" in config:
        out: list[tuple[str, str, str]] = []
        for i, app in enumerate(config["applications"] or []):
            for role, field, ref in config_refs(app.get("args") or {}):
                if all(ref != r or role != o for o, _, r in out):
                    out.append((role, f"applications[{i}].args.{field}", ref))
        return out
    models = config.get("models") or [{"name": "sdxl", "base_model": BASE_MODEL.ref}]
    refs = [(FACE_MODEL.role, "face_model", str(config.get("face_model") or FACE_MODEL.ref))]
    for i, model in enumerate(models):
        refs.append((BASE_MODEL.role, f"models[{i}].base_model", str(model["base_model"])))
    refs.append((INSTANTID.role, "instantid", str(config.get("instantid") or INSTANTID.ref)))
    kinds: set[str] = set()
    for i, model in enumerate(models):
        for kind, ref in sorted((model.get("controlnets") or {}).items()):
            refs.append(("ControlNet", f"models[{i}].controlnets.{kind}", str(ref)))
            kinds.add(kind)
        for name, ref in sorted((model.get("loras") or {}).items()):
            refs.append(("LoRA", f"models[{i}].loras.{name}", str(ref)))
    safety = config.get("safety") or {}
    if safety.get("enabled"):
        refs.append(("safety checker", "safety.model", str(safety.get("model") or DEFAULT_SAFETY)))
    preprocessors = config.get("preprocessors") or {}
    for kind in CONTROL_TYPES_WITH_PREPROCESSOR:
        if kind in kinds:
            refs.append((f"{kind} preprocessor", f"preprocessors.{kind}",
                         str(preprocessors.get(kind) or DEFAULT_PREPROCESSORS[kind])))
    seen, out = set(), []
    for role, field, ref in refs:
        if (role, ref) not in seen:
            seen.add((role, ref))
            out.append((role, field, ref))
    return out


def download_config(config: dict, *, dtype: str = "float16", face_root: str | None = None) -> list[Fetched]:
    """Fetch, verify and check every model a service configuration names (config_refs), so replicas started
    with HF_HUB_OFFLINE=1 find all of them; a failure names the config field."""
    if dtype not in DTYPES:
        raise InvalidParameterError("dtype", f"must be one of {', '.join(DTYPES)}, got {dtype!r}")
    fetchers = {FACE_MODEL.role: lambda ref: fetch_face_pack(ref, face_root),
                BASE_MODEL.role: lambda ref: fetch_base(ref, dtype),
                INSTANTID.role: fetch_instantid, "ControlNet": fetch_controlnet, "LoRA": fetch_lora,
                "safety checker": fetch_safety_checker,
                "depth preprocessor": lambda ref: fetch_preprocessor("depth", ref),
                "pose preprocessor": lambda ref: fetch_preprocessor("pose", ref)}
    fetched = []
    for role, field, ref in config_refs(config):
        try:
            fetched.append(fetchers[role](ref))
        except WeightsError as exc:
            raise WeightsError(f"{field} ({ref}): {exc}") from exc
    return fetched


def load_config(path: str) -> dict:
    """A YAML or JSON file (``-``: standard input) holding the application's args or a whole Serve config."""
    import sys

    import yaml

    text = sys.stdin.read() if path == "-" else Path(path).expanduser().read_text()
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise InvalidParameterError("config", f"not YAML or JSON: {exc}".splitlines()[0]) from exc
    if not isinstance(data, dict):
        raise InvalidParameterError("config", "must be a mapping (the application's args or a Serve config)")
    return data


def cache_locations() -> list[str]:
    from huggingface_hub import constants

    from .face import insightface_home

    return [f"Hugging Face cache: {constants.HF_HUB_CACHE}", f"INSTANTID_CACHE: {weights.cache_root()}",
            f"INSIGHTFACE_HOME: {insightface_home()}"]
