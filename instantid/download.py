"""``instantid download``: everything a configuration needs, fetched once into the caches the service reads.

- SDXL base: from the hub, only the weight variant the serving dtype loads (fp16 files for float16/bfloat16),
  plus configs and tokenizers, into the Hugging Face cache (``$HF_HOME``);
- InstantID: ``ControlNetModel/`` and ``ip-adapter.bin``, into the Hugging Face cache;
- the face pack: a name (``antelopev2``) is installed under ``$INSIGHTFACE_HOME/models/<name>`` from its hub
  copy; a hub repo id stays in the Hugging Face cache; ``s3://`` goes to ``$INSTANTID_CACHE``.

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


def cache_locations() -> list[str]:
    from huggingface_hub import constants

    from .face import insightface_home

    return [f"Hugging Face cache: {constants.HF_HUB_CACHE}", f"INSTANTID_CACHE: {weights.cache_root()}",
            f"INSIGHTFACE_HOME: {insightface_home()}"]
