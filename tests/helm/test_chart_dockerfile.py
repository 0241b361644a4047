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
    assert "['optional-dependencies']['serve']" in runs and "'gpu'" not in runs, \
        "the serve extra only: no onnxruntime-gpu (face analysis runs on CPU pods)"
    assert "onnxruntime-gpu" not in runs
    assert re.search(r"--index-url \"\$\{TORCH_INDEX_URL\}\" \"torch==\$\{TORCH_VERSION\}\"", runs)
    assert arg_default("TORCH_INDEX_URL").startswith("https://download.pytorch.org/whl/cu")
    tested = re.search(r"pip install --quiet torch==([0-9.]+)", (REPO / "scripts" / "test").read_text()).group(1)
    assert arg_default("TORCH_VERSION") == tested, "the image's torch is the one the test suite runs"
    assert f"ray=={arg_default('RAY_VERSION')}" in (REPO / "constraints.txt").read_text().splitlines()


def test_image_keeps_only_headless_opencv_and_smoke_imports_it():
    """insightface requires the GUI opencv-python (libGL, absent from Ray images): the image replaces it and the
    smoke step imports cv2 and insightface, so a broken cv2 fails the build, not the replicas."""
    runs = [rest for word, rest in instructions() if word == "RUN"]
    install = next(r for r in runs if "-r requirements.txt" in r)
    assert install.index("sh use-headless-opencv python") > install.index("pip install")
    smoke = smoke_step()
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


# -- layers, constraints and the smoke step -------------------------------------------------------------------
def smoke_step() -> str:
    runs = [rest for word, rest in instructions() if word == "RUN"]
    return next(r for r in runs if "pip install --no-cache-dir --no-deps ." in r)


def test_a_code_change_does_not_reinstall_dependencies():
    """Docker reuses a layer until an input of it changes: the dependency install must come before any COPY of
    code, with only pyproject.toml and constraints.txt (and the OpenCV script) as inputs; the code after it,
    installed without dependencies."""
    steps = instructions()
    final = max(i for i, (word, rest) in enumerate(steps) if word == "FROM")
    steps = steps[final:]
    deps = next(i for i, (word, rest) in enumerate(steps) if word == "RUN" and "-r requirements.txt" in rest)
    code = [i for i, (word, rest) in enumerate(steps) if word == "COPY" and re.search(r"\b(instantid|deployments)\b", rest)]
    assert code and min(code) > deps, "code is copied before the dependencies are installed"
    before = [rest for word, rest in steps[:deps] if word == "COPY"]
    sources = {s for rest in before for s in rest.split()[:-1] if not s.startswith("--")}
    assert sources <= {"/home/ray/wheels", "/tmp/wheels", "pyproject.toml", "constraints.txt",
                       "scripts/use-headless-opencv"}, sources
    assert "-c constraints.txt" in steps[deps][1]
    assert re.search(r"pip install --no-cache-dir --no-deps \.", smoke_step())
    torch_step = next(i for i, (word, rest) in enumerate(steps) if word == "RUN" and "torch==" in rest)
    assert torch_step < deps, "the CUDA torch must be there before the requirements (torch>=2.4) are resolved"


def test_constraints_are_generated_from_this_environment_and_current():
    """scripts/constraints.py walks the project's runtime requirements through this environment's metadata;
    scripts/test installs with the same file, so the test environment and the image agree."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, str(REPO / "scripts" / "constraints.py"), "--check"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "-c constraints.txt" in (REPO / "scripts" / "test").read_text()


def test_constraints_satisfy_pyproject_and_each_other():
    """What `pip check` would say of an environment installed from constraints.txt: every direct requirement of
    the image (dependencies + serve extra, torch aside) pinned within its range, and every pinned package's own
    requirements (read from its installed metadata) pinned within theirs."""
    import importlib.metadata as metadata

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = version
    assert "torch" not in pins and not any(n.startswith("nvidia-") for n in pins)
    assert "opencv-python" not in pins and "opencv-python-headless" in pins
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    for text in project["dependencies"] + project["optional-dependencies"]["serve"]:
        req = Requirement(text)
        name = canonicalize_name(req.name)
        if name == "torch":
            continue
        assert name in pins, f"{name} is not pinned"
        assert req.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} outside {req.specifier}"
    unmet = []
    for name, version in pins.items():
        dist = metadata.distribution(name)
        assert dist.version == version, f"{name}: installed {dist.version}, pinned {version} (scripts/test -c)"
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            dep = canonicalize_name(req.name)
            if dep in pins and not req.specifier.contains(pins[dep], prereleases=True):
                unmet.append(f"{name} needs {req}, pinned {pins[dep]}")
    assert not unmet, unmet


def test_pip_accepts_the_constraints_offline():
    """pip itself resolves the image's direct requirements under constraints.txt against this environment without
    fetching anything (--no-index: every pin is already what is installed). --no-deps: insightface and rtmlib
    declare the GUI opencv-python, removed on purpose (use-headless-opencv); the closure is checked above."""
    import subprocess
    import sys

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = project["dependencies"] + project["optional-dependencies"]["serve"]
    result = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--no-index", "--no-deps", "--quiet",
                             "-c", str(REPO / "constraints.txt"), *reqs], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


def test_smoke_step_imports_every_deployment_module_and_loads_the_tiny_profile():
    smoke = smoke_step()
    for module in ("diffusers", "transformers", "insightface", "cv2"):
        assert re.search(rf"import [^;]*\b{module}\b", smoke), module
    assert "pkgutil.walk_packages(deployments.__path__, 'deployments.')" in smoke
    assert "import deployments.generator" in smoke
    assert "instantid make-tiny /tmp/tiny" in smoke and "load_pipeline('/tmp/tiny/sdxl', '/tmp/tiny/instantid'" in smoke


def test_smoke_step_passes_here(tiny_bundle):
    """The smoke step's Python, run in this environment (the image's versions): every deployments.* module
    imports, and the tiny profile loads as written."""
    import subprocess
    import sys

    smoke = smoke_step()
    snippets = re.findall(r'python -c "(.*?)"(?: &&|$)', smoke)
    assert len(snippets) == 2
    imports = snippets[0].replace("${RAY_VERSION}", arg_default("RAY_VERSION")).replace(
        "${TORCH_VERSION}", arg_default("TORCH_VERSION"))
    subprocess.run([sys.executable, "-c", imports], check=True, timeout=300, cwd=REPO)
    load = snippets[1].replace("/tmp/tiny", str(tiny_bundle))  # what `instantid make-tiny /tmp/tiny` writes
    subprocess.run([sys.executable, "-c", load], check=True, timeout=300, cwd=REPO)
