"""serveConfigV2: parses, is a valid Ray Serve config, names the project's application and its builder, and
its args pass the application's own validation (deployments/config.py:AppArgs) for every value set."""

from __future__ import annotations

import importlib

import pytest
import yaml

from chart_helpers import REPO, VALUE_SET_NAMES, effective_values, render, render_set

IMPORT_PATH = "deployments.app:build_app"
DEPLOYMENTS = ["Ingress", "FaceAnalyzer", "Generator"]


def test_serve_config_is_a_valid_ray_serve_config(value_set):
    from ray.serve.schema import ServeDeploySchema

    config = render_set(value_set).serve_config
    schema = ServeDeploySchema.model_validate(config)
    assert [app.name for app in schema.applications] == ["instantid"]
    assert schema.http_options.port == 8000
    assert config["proxy_location"] == effective_values(value_set)["serve"]["proxyLocation"]


def test_application_identity(value_set):
    app = render_set(value_set).app
    assert app["name"] == "instantid"
    assert app["import_path"] == IMPORT_PATH
    assert app["route_prefix"] == "/"
    assert [d["name"] for d in app["deployments"]] == DEPLOYMENTS


def test_args_pass_appargs(value_set):
    """AppArgs (the application's own model) accepts the rendered args as they are."""
    from deployments.config import AppArgs

    rendered = render_set(value_set)
    args = rendered.app["args"]
    parsed = AppArgs.model_validate(args)
    wanted = effective_values(value_set)["app"]
    assert parsed.profile == wanted["profile"]
    assert [m.name for m in parsed.models] == [m["name"] for m in wanted["models"]]
    assert parsed.default_model == (wanted["default_model"] or wanted["models"][0]["name"])
    assert parsed.identity_store == wanted["identity_store"]
    assert parsed.output_bucket == wanted["output_bucket"]
    assert parsed.auth.enabled is wanted["auth"]["enabled"]
    # The chart wires the key hashes through this env var (from the API-key Secret).
    assert parsed.auth.key_hashes_env == "INSTANTID_API_KEY_HASHES"


def test_args_are_the_values_verbatim(value_set):
    """Nothing is lost or invented between values.app and the args (only key_hashes_env is added; Helm drops
    keys whose value is null, which leaves AppArgs' default of None in place)."""
    args = render_set(value_set).app["args"]
    wanted = {k: v for k, v in effective_values(value_set)["app"].items() if v is not None}
    expected = {**wanted, "auth": {**wanted["auth"], "key_hashes_env": "INSTANTID_API_KEY_HASHES"}}
    assert args == expected


def test_import_path_loads_the_app_builder():
    """deployments.app:build_app exists and is callable, and AppArgs accepts every rendered value set.

    (deployments/app.py is written alongside this chart; until it lands this one test fails for that reason.)
    """
    from deployments.config import AppArgs

    module_name, _, attr = IMPORT_PATH.partition(":")
    module = importlib.import_module(module_name)
    builder = getattr(module, attr)
    assert callable(builder)
    for name in VALUE_SET_NAMES:
        app = render_set(name).app
        assert f"{module_name}:{attr}" == app["import_path"]
        AppArgs.model_validate(app["args"])


def test_deployment_settings_follow_values(value_set):
    rendered = render_set(value_set)
    values = effective_values(value_set)
    pool = values["faceWorker"]["customResource"]["name"]
    for name in DEPLOYMENTS:
        deployment = rendered.deployment(name)
        wanted = values["serve"]["deployments"][name]
        assert deployment["autoscaling_config"] == wanted["autoscaling_config"]
        assert deployment["max_ongoing_requests"] == wanted["max_ongoing_requests"]
        assert deployment.get("max_queued_requests") == wanted.get("max_queued_requests")
        options = dict(deployment["ray_actor_options"])
        resources = options.pop("resources", None)
        assert options == wanted["ray_actor_options"]
        assert resources == ({pool: 1} if name in ("Ingress", "FaceAnalyzer") else None)


def test_generator_batches_can_fill():
    """Generator's max_ongoing_requests admits a whole batch (otherwise batches never reach max_batch_size)."""
    rendered = render_set("default")
    generator = rendered.deployment("Generator")
    assert generator["max_ongoing_requests"] >= rendered.app["args"]["batch"]["max_batch_size"]


def test_production_config_matches_the_chart():
    """serve/production.yaml (kept by the Serve side) describes the same application as the chart's default
    serveConfigV2: import path, deployments and their settings, and args. Two things may differ because they
    depend on where the cluster runs: tiny_dir (unused by the real profile) and the custom resources in
    ray_actor_options (placement, which the chart decides from its worker groups)."""
    path = REPO / "serve" / "production.yaml"
    if not path.is_file():
        pytest.skip("serve/production.yaml is not written yet")
    from deployments.config import AppArgs

    production = yaml.safe_load(path.read_text())
    chart = render_set("default").serve_config
    for key in ("proxy_location", "http_options"):
        assert production.get(key) == chart[key], key
    prod_apps = {a["name"]: a for a in production["applications"]}
    assert set(prod_apps) == {"instantid"}
    prod, ours = prod_apps["instantid"], chart["applications"][0]
    assert prod["import_path"] == ours["import_path"]
    assert prod.get("route_prefix", "/") == ours["route_prefix"]
    prod_args = AppArgs.model_validate(prod.get("args", {})).model_dump()
    our_args = AppArgs.model_validate(ours["args"]).model_dump()
    assert our_args["profile"] == "real"
    prod_args.pop("tiny_dir"), our_args.pop("tiny_dir")
    assert prod_args == our_args
    prod_deps = {d["name"]: d for d in prod["deployments"]}
    ours_deps = {d["name"]: d for d in ours["deployments"]}
    assert set(prod_deps) == set(ours_deps)
    differences = []
    for name, ours_dep in ours_deps.items():
        for key in sorted(set(ours_dep) | set(prod_deps[name])):
            mine, theirs = ours_dep.get(key), prod_deps[name].get(key)
            if key == "ray_actor_options":
                mine = {k: v for k, v in (mine or {}).items() if k != "resources"}
                theirs = {k: v for k, v in (theirs or {}).items() if k != "resources"}
            if mine != theirs:
                differences.append(f"{name}.{key}: production.yaml {theirs} != chart {mine}")
    assert differences == []


def test_tiny_profile_renders_valid_args():
    """The plumbing profile (random weights) is expressible too."""
    from deployments.config import AppArgs

    args = render({"app": {"profile": "tiny", "tiny_dir": "/models/tiny"}}).app["args"]
    assert AppArgs.model_validate(args).profile == "tiny"
