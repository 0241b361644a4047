"""The application builder: ``deployments.app:build_app`` (the ``import_path`` of serve/*.yaml and the chart).

    Ingress (FastAPI, CPU) --handle--> FaceAnalyzer (insightface, CPU, own autoscaling)
            \\--handle, multiplexed by model--> Generator (InstantID pipeline, GPU; @serve.batch)

``build_app(args)`` validates ``args`` with ``AppArgs`` once; in the tiny profile it builds the random-weight
bundle and points the unconfigured weights at it; then it binds the three deployments with the resolved
arguments as plain data. Per-deployment scaling comes from the Serve config's ``deployments:`` section
(serve/local.yaml, serve/production.yaml, the Helm chart), applied over the code defaults.
"""

from __future__ import annotations

from ray.serve import Application

from deployments.config import AppArgs
from deployments.tiny_profile import resolve_args

APP_NAME = "instantid"
DEPLOYMENT_NAMES = ("Ingress", "FaceAnalyzer", "Generator")


def bind(args: AppArgs, options: dict[str, dict] | None = None) -> Application:
    """Bind the graph for already-resolved ``args``; ``options`` overrides deployment options by name
    (what a Serve config's ``deployments:`` section does; used by tests and the benchmark)."""
    from deployments.face_analyzer.deployment import FaceAnalyzerDeployment
    from deployments.generator.deployment import Generator
    from deployments.ingress.deployment import Ingress

    options = options or {}
    unknown = set(options) - set(DEPLOYMENT_NAMES)
    if unknown:
        raise ValueError(f"unknown deployments {sorted(unknown)}; expected {DEPLOYMENT_NAMES}")
    data = args.model_dump(mode="json")
    face = FaceAnalyzerDeployment.options(**options.get("FaceAnalyzer", {})).bind(data)
    generator = Generator.options(**options.get("Generator", {})).bind(data)
    return Ingress.options(**options.get("Ingress", {})).bind(data, face, generator)


def build_app(args: dict) -> Application:
    """Serve application builder: ``serve run deployments.app:build_app profile=tiny`` or a config's args."""
    return bind(resolve_args(args))
