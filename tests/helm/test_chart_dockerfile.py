"""The image the chart runs: based on the Ray GPU image of the pinned Ray version, non-root, GPU extras,
model cache under the path the chart mounts."""

from __future__ import annotations

import re
import tomllib

import yaml

from chart_helpers import CHART_DIR, REPO, render_set

DOCKERFILE = (REPO / "Dockerfile").read_text()


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuations joined and comments dropped."""
    out, current = [], ""
    for line in DOCKERFILE.splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        current += line.rstrip("\\").strip() + " "
        if not line.rstrip().endswith("\\"):
            word, _, rest = current.strip().partition(" ")
            out.append((word.upper(), rest))
            current = ""
    return out


def arg_default(name: str) -> str:
    for word, rest in instructions():
        if word == "ARG" and rest.startswith(name + "="):
            return rest.split("=", 1)[1].strip('"')
    raise AssertionError(f"ARG {name} has no default")


def test_base_image_is_the_pinned_ray_gpu_image():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    pin = next(d for d in project["project"]["optional-dependencies"]["serve"] if d.startswith("ray["))
    ray_version = pin.split("==")[1]
    assert arg_default("RAY_VERSION") == ray_version
    assert arg_default("PYTHON_TAG") == "py311"
    assert arg_default("RAY_PLATFORM") == "gpu"
    assert arg_default("BASE_IMAGE") == "rayproject/ray:${RAY_VERSION}-${PYTHON_TAG}-${RAY_PLATFORM}"
    froms = [rest for word, rest in instructions() if word == "FROM"]
    assert froms and all(f.split()[0] == "${BASE_IMAGE}" for f in froms)
    # The chart tells KubeRay the same Ray version.
    assert yaml.safe_load((CHART_DIR / "values.yaml").read_text())["rayVersion"] == ray_version
    assert ray_version in DOCKERFILE or "${RAY_VERSION}" in DOCKERFILE


def test_runs_as_non_root():
    users = [rest.strip() for word, rest in instructions() if word == "USER"]
    assert users[-1] == "ray", "the final image must run as the Ray image's non-root user"
    # The chart's pod security context agrees with the image's user (uid 1000, gid 100 in the Ray image).
    spec = render_set("default").head["template"]["spec"]
    assert spec["securityContext"]["runAsUser"] == 1000 and spec["securityContext"]["runAsNonRoot"] is True


def test_installs_the_project_with_cuda_torch_pinned_like_the_tests():
    runs = " ".join(rest for word, rest in instructions() if word == "RUN")
    assert "[serve]" in runs and "[serve,gpu]" not in runs, "no onnxruntime-gpu: face analysis runs on CPU pods"
    assert "onnxruntime-gpu" not in runs
    assert re.search(r"--index-url \"\$\{TORCH_INDEX_URL\}\" \"torch==\$\{TORCH_VERSION\}\"", runs)
    assert arg_default("TORCH_INDEX_URL").startswith("https://download.pytorch.org/whl/cu")
    tested = re.search(r"pip install --quiet torch==([0-9.]+)", (REPO / "scripts" / "test").read_text()).group(1)
    assert arg_default("TORCH_VERSION") == tested, "the image's torch is the one the test suite runs"
    assert 'ray[serve]==${RAY_VERSION}' in runs


def test_image_keeps_only_headless_opencv_and_smoke_imports_it():
    """insightface requires the GUI opencv-python (libGL, absent from Ray images): the image replaces it and the
    smoke step imports cv2 and insightface, so a broken cv2 fails the build, not the replicas."""
    runs = [rest for word, rest in instructions() if word == "RUN"]
    install = next(r for r in runs if "instantid_serve-*.whl" in r)
    assert install.index("sh /tmp/use-headless-opencv python") > install.index("pip install")
    smoke = install[install.index("python -c"):]
    for module in ("cv2", "insightface", "deployments.app", "onnxruntime", "torch", "ray"):
        assert re.search(rf"import [^;]*\b{re.escape(module)}\b", smoke), module
    copies = [rest for word, rest in instructions() if word == "COPY"]
    assert any("scripts/use-headless-opencv" in c for c in copies)


def test_installed_cv2_is_the_headless_build():
    """What the tests (and the image, through the same script) run: no GUI OpenCV, no GUI libraries linked."""
    import glob
    import importlib.metadata as metadata
    import os
    import shutil
    import subprocess

    import cv2

    installed = {d.metadata["Name"].lower() for d in metadata.distributions()}
    assert "opencv-python-headless" in installed
    assert "opencv-python" not in installed, "run scripts/use-headless-opencv"
    (extension,) = glob.glob(os.path.join(os.path.dirname(cv2.__file__), "cv2*.so"))
    if shutil.which("ldd"):
        linked = subprocess.run(["ldd", extension], capture_output=True, text=True, check=True).stdout
        assert not re.search(r"libGL|libgtk|libQt|libX11", linked, re.I), linked
    import insightface  # noqa: F401  (imports cv2 itself)


def test_every_install_path_keeps_headless_opencv():
    readme = (REPO / "README.md").read_text()
    assert "scripts/use-headless-opencv .venv/bin/python" in readme
    assert "scripts/use-headless-opencv .venv/bin/python" in (REPO / "scripts" / "test").read_text()
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert any(d.startswith("opencv-python-headless") for d in project)
    assert not any(re.match(r"opencv-python(?!-headless)", d) for d in project)


def test_model_cache_paths_match_the_chart():
    envs = " ".join(rest for word, rest in instructions() if word == "ENV")
    env = dict(re.findall(r"(\w+)=(\S+)", envs))
    mount = yaml.safe_load((CHART_DIR / "values.yaml").read_text())["modelCache"]["mountPath"]
    assert env["HF_HOME"] == f"{mount}/huggingface"
    assert env["INSTANTID_CACHE"] == f"{mount}/instantid"
    assert env["INSIGHTFACE_HOME"] == f"{mount}/insightface"
    chart_env = {e["name"]: e.get("value") for e in render_set("default").head["template"]["spec"]["containers"][0]["env"]}
    for key in ("HF_HOME", "INSTANTID_CACHE", "INSIGHTFACE_HOME"):
        assert chart_env[key] == env[key]


def test_dockerignore_keeps_the_context_small():
    lines = [l.strip() for l in (REPO / ".dockerignore").read_text().splitlines() if l.strip() and not l.startswith("#")]
    assert lines[0] == "*"
    allowed = {l[1:].rstrip("/") for l in lines if l.startswith("!")}
    assert {"pyproject.toml", "instantid", "deployments"} <= allowed
    assert not allowed & {".venv", ".git", "tests", "k8s", "helm", "outputs"}
    copies = [rest for word, rest in instructions() if word == "COPY" and "--from=" not in rest]
    assert copies
    for rest in copies:
        sources = [s for s in rest.split() if not s.startswith("--")][:-1]
        for source in sources:
            assert source.rstrip("*") in allowed, f"COPY {source} is excluded by .dockerignore"


def test_the_image_writes_the_hardened_haproxy_launcher_the_cluster_env_names():
    """CLUSTER_ENV (and so the chart) points Ray at deployments/haproxy_guard.py through a launcher: the image
    must write it at exactly that path, executable, running the guard module (else HAProxy never starts)."""
    from deployments.ray_env import CLUSTER_ENV

    path = CLUSTER_ENV["RAY_SERVE_HAPROXY_BINARY_PATH"]
    runs = [rest for word, rest in instructions() if word == "RUN" and path in rest]
    assert runs, f"no RUN writes {path}"
    assert "deployments.haproxy_guard" in runs[0] and f"chmod 755 {path}" in runs[0]
