# syntax=docker/dockerfile:1.7
#
# InstantID Serve image: the official Ray GPU image of the pinned Ray version plus this project with its
# serve and GPU extras. The same image runs the Ray head, the CPU face workers and the GPU generator workers
# (KubeRay replaces the command with `ray start`), and the `helm test` pod.
#
#   docker build -t registry.example.com/ml/instantid-serve:0.1.0 .
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126 -t ...:0.1.0-cu126 .
#
# Ray images are tagged <ray version>-<python>-<platform>: "gpu" aliases the default CUDA build of that
# Ray release (cuXXX tags pin one). RAY_VERSION must equal ray[serve]==... in pyproject.toml and the chart's
# rayVersion (tests/helm/test_chart_dockerfile.py checks all three).
ARG RAY_VERSION=2.60.0
ARG PYTHON_TAG=py311
ARG RAY_PLATFORM=gpu
ARG BASE_IMAGE=rayproject/ray:${RAY_VERSION}-${PYTHON_TAG}-${RAY_PLATFORM}

# ---------------------------------------------------------------------------------------------------------
# Build stage: a wheel of insightface, which ships only an sdist and needs a compiler, at its constrained version.
FROM ${BASE_IMAGE} AS wheels
USER root
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential \
 && rm -rf /var/lib/apt/lists/*
USER ray
WORKDIR /home/ray/src
COPY --chown=ray:users constraints.txt ./
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /home/ray/wheels -c constraints.txt insightface

# ---------------------------------------------------------------------------------------------------------
FROM ${BASE_IMAGE}
ARG RAY_VERSION
# CUDA build of torch; match it to the CUDA of the base image and to the GPU nodes' driver.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
# Pinned: the torch the test suite runs (scripts/test); an unpinned build would take whatever is newest on the
# index that day, so two builds of one commit could differ. Change both together.
ARG TORCH_VERSION=2.13.0

LABEL org.opencontainers.image.title="instantid-serve" \
      org.opencontainers.image.description="InstantID identity-preserving generation on Ray Serve" \
      org.opencontainers.image.licenses="Apache-2.0" \
      io.ray.version="${RAY_VERSION}"

# Model cache: a mount point for the chart's PersistentVolumeClaim (an empty directory without one).
USER root
RUN mkdir -p /models/huggingface /models/instantid /models/insightface /models/identities \
 && chown -R ray:users /models \
 && chmod -R g+rwX /models

# From here on the image runs as the unprivileged "ray" user (uid 1000, gid 100) of the Ray image.
USER ray
ENV HF_HOME=/models/huggingface \
    INSTANTID_CACHE=/models/instantid \
    INSIGHTFACE_HOME=/models/insightface \
    HF_HUB_DISABLE_TELEMETRY=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# HAProxy's hard stop outside the chart (serve run/deploy in this image): Ray reloads HAProxy on every Ingress
# replica change and by default kills the old worker's connections 120 s later; serve/production.yaml's requests
# may take 300 s. 300 + 30, as the chart derives it (which sets it on every Ray pod from app.request_timeout_s).
ENV RAY_SERVE_HAPROXY_HARD_STOP_AFTER_S=330

# 1) torch from the CUDA index first, so the project's `torch>=2.4` is already satisfied by the CUDA build
#    (PyPI would otherwise be free to pick its default wheel).
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

# 2) The dependencies, before any code, at the versions of constraints.txt (generated from a resolved environment
#    by scripts/constraints.py; torch excluded: step 1's CUDA build satisfies `torch>=2.4`), so a code change reuses
#    this layer. The requirement list is pyproject.toml's `dependencies` plus its `serve` extra, read here from the
#    file (no second list to keep in step). Ray stays at the base image's version (pinned by the serve extra and
#    the constraints). No onnxruntime-gpu: face analysis runs on the CPU face group with onnxruntime's CPU
#    provider (deployments/face_analyzer/deployment.py), so the GPU build would only add weight. insightface and rtmlib pull
#    in the GUI OpenCV build (Qt/X11/libGL, absent here): use-headless-opencv keeps only the headless one and
#    fails if cv2 still links a GUI library.
WORKDIR /home/ray/build
COPY --from=wheels --chown=ray:users /home/ray/wheels /tmp/wheels
COPY --chown=ray:users pyproject.toml constraints.txt scripts/use-headless-opencv ./
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
print('\n'.join(p['dependencies'] + p['optional-dependencies']['serve']))" > requirements.txt \
 && pip install --no-cache-dir --find-links /tmp/wheels -c constraints.txt -r requirements.txt \
 && sh use-headless-opencv python \
 && rm -rf /tmp/wheels

# 3) The code, installed without dependencies (all there from step 2), then the smoke step: import every module
#    the replicas import (every deployments.* module, diffusers, transformers, insightface, cv2, onnxruntime),
#    check the Ray and torch versions, and load the tiny profile once (random weights in the real layouts: the
#    pipeline and the face pack load as the replicas load them, on CPU).
COPY --chown=ray:users README.md ./
COPY --chown=ray:users instantid ./instantid
COPY --chown=ray:users deployments ./deployments
RUN pip install --no-cache-dir --no-deps . \
 && python -c "import importlib, pkgutil, cv2, insightface, diffusers, transformers, onnxruntime, torch, ray, instantid, deployments; \
[importlib.import_module(m.name) for m in pkgutil.walk_packages(deployments.__path__, 'deployments.')]; \
import deployments.generator, deployments.app; \
assert ray.__version__ == '${RAY_VERSION}', ray.__version__; \
assert torch.__version__.split('+')[0] == '${TORCH_VERSION}', torch.__version__" \
 && instantid make-tiny /tmp/tiny > /dev/null \
 && python -c "from instantid.face import FaceModel; from instantid.loading import load_pipeline; \
load_pipeline('/tmp/tiny/sdxl', '/tmp/tiny/instantid', device='cpu', dtype='float32'); \
FaceModel('/tmp/tiny/antelopev2', providers=['CPUExecutionProvider'])" \
 && rm -rf /tmp/tiny

# Serve configs (serve/*.yaml) for `serve run` / `serve deploy` outside Kubernetes.
WORKDIR /home/ray/app
COPY --chown=ray:users serve ./serve
# The HAProxy Ray starts (RAY_SERVE_HAPROXY_BINARY_PATH, deployments/ray_env.py's CLUSTER_ENV): the hardened
# one, deployments/haproxy_guard.py, which rewrites Ray's config and execs Ray's bundled binary.
RUN printf '#!/bin/sh\nexec python -m deployments.haproxy_guard "$@"\n' > /home/ray/app/instantid-haproxy \
 && chmod 755 /home/ray/app/instantid-haproxy \
 && python -c "import deployments.haproxy_guard as g; g.real_binary()"

# The dashboard, GCS, client, Serve HTTP and metrics ports KubeRay wires up.
EXPOSE 8265 6379 10001 8000 8080
