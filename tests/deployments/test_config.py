"""serve/local.yaml and serve/production.yaml agree with what the application builder produces.

``serve build deployments.app:build_app`` itself refuses builder functions in Ray 2.60 ("Expected ... to be an
Application"), so ``serve_build`` below does what that command does, with the builder called on the
config's args the way ``serve run``/``serve deploy`` call it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from deployments.app import APP_NAME, DEPLOYMENT_NAMES
from deployments.config import AppArgs

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = {"local": ROOT / "serve" / "local.yaml", "production": ROOT / "serve" / "production.yaml"}


def serve_build(import_path: str, args: dict, name: str) -> dict:
    from ray._common.utils import import_attr
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve._private.build_app import build_app
    from ray.serve.deployment import deployment_to_schema
    from ray.serve.schema import ServeApplicationSchema

    app = call_user_app_builder_with_args_if_necessary(import_attr(import_path), args)
    built = build_app(app, name=name)
    schema = ServeApplicationSchema(name=name, route_prefix="/", import_path=import_path, runtime_env={},
                                    deployments=[deployment_to_schema(d) for d in built.deployments])
    return {"schema": schema.model_dump(exclude_unset=True), "ingress": built.ingress_deployment_name}


@pytest.fixture(params=sorted(CONFIGS))
def config(request) -> tuple[str, dict]:
    return request.param, yaml.safe_load(CONFIGS[request.param].read_text())


def test_config_is_a_valid_serve_config(config):
    from ray.serve.schema import ServeDeploySchema

    _, data = config
    ServeDeploySchema.model_validate(data)
    [app] = data["applications"]
    assert app["name"] == APP_NAME
    assert app["import_path"] == "deployments.app:build_app"
    assert app["route_prefix"] == "/"
    AppArgs.model_validate(app["args"])


def test_config_agrees_with_the_builder(config, tiny_bundle):
    _, data = config
    [app] = data["applications"]
    args = dict(app["args"])
    if args.get("profile") == "tiny":
        args["tiny_dir"] = str(tiny_bundle)  # the session's bundle instead of building one under ~/.cache
    built = serve_build(app["import_path"], args, app["name"])
    built_names = [d["name"] for d in built["schema"]["deployments"]]
    config_names = [d["name"] for d in app["deployments"]]
    assert sorted(built_names) == sorted(config_names) == sorted(DEPLOYMENT_NAMES)
    assert built["ingress"] == "Ingress"
    assert built["schema"]["import_path"] == app["import_path"] and built["schema"]["name"] == app["name"]
    # every setting the config overrides is a deployment option the built deployment has
    for entry in app["deployments"]:
        built_entry = next(d for d in built["schema"]["deployments"] if d["name"] == entry["name"])
        from ray.serve.schema import DeploymentSchema

        DeploymentSchema.model_validate({**built_entry, **entry})


def test_local_fits_two_cpus_without_gpu():
    data = yaml.safe_load(CONFIGS["local"].read_text())
    [app] = data["applications"]
    assert app["args"]["profile"] == "tiny" and app["args"]["device"] == "cpu"
    assert data["http_options"] == {"host": "127.0.0.1", "port": 8000}
    cpus = sum(d["ray_actor_options"]["num_cpus"] * d.get("num_replicas", 1) for d in app["deployments"])
    assert cpus <= 2
    assert all(d["ray_actor_options"].get("num_gpus", 0) == 0 for d in app["deployments"])
    assert all(d.get("num_replicas") == 1 for d in app["deployments"])


def test_production_generator_is_gpu_and_autoscaled():
    data = yaml.safe_load(CONFIGS["production"].read_text())
    [app] = data["applications"]
    assert app["args"]["profile"] == "real"
    deps = {d["name"]: d for d in app["deployments"]}
    gen = deps["Generator"]
    assert gen["ray_actor_options"]["num_gpus"] == 1
    scaling = gen["autoscaling_config"]
    assert 0 <= scaling["min_replicas"] <= scaling["max_replicas"] and scaling["max_replicas"] >= 1
    for key in ("target_ongoing_requests", "upscale_delay_s", "downscale_delay_s"):
        assert key in scaling
    assert gen["max_ongoing_requests"] >= app["args"]["batch"]["max_batch_size"]
    assert gen["max_queued_requests"] > 0
    assert deps["FaceAnalyzer"]["ray_actor_options"].get("num_gpus", 0) == 0
    assert "autoscaling_config" in deps["FaceAnalyzer"]
