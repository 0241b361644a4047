"""HAProxy's hard stop: Ray 2.60 reloads HAProxy whenever the Ingress replica set changes (a cold start scales the
Ingress up), and the old HAProxy worker is killed `hard-stop-after` seconds later with every connection it still
holds (RAY_SERVE_HAPROXY_HARD_STOP_AFTER_S, default 120 in ray/serve/_private/constants.py). Requests may take
app.request_timeout_s (300; 900 with scale to zero), so wherever HAProxy runs the hard stop must be longer."""

from __future__ import annotations

import re

import pytest

from chart_helpers import REPO, effective_values, render, render_error, render_set

ENV = "RAY_SERVE_HAPROXY_HARD_STOP_AFTER_S"
MARGIN_S = 30  # the answer (or the 504) still has to be written after the deadline


def env_of(template: dict) -> dict:
    return {e["name"]: e.get("value") for e in template["spec"]["containers"][0]["env"]}


def test_rays_default_is_the_one_that_cuts_requests():
    """The number this file is about, read from the installed Ray: if Ray changes it, revisit the chart."""
    import ray.serve._private.constants as constants

    text = open(constants.__file__).read()
    assert re.search(r'RAY_SERVE_HAPROXY_HARD_STOP_AFTER_S", "120"', text)


def test_every_ray_pod_outlives_the_longest_request(value_set):
    rendered = render_set(value_set)
    timeout = effective_values(value_set)["app"]["request_timeout_s"]
    for group, template in rendered.pod_templates().items():
        value = env_of(template).get(ENV)
        assert value is not None, f"{group}: HAProxy would run with Ray's 120 s hard stop"
        assert int(value) >= timeout + MARGIN_S, (group, value, timeout)


def test_derived_from_the_request_timeout_and_settable():
    assert env_of(render_set("scale-to-zero").head["template"])[ENV] == "930"  # request_timeout_s 900
    assert env_of(render().pod_templates()["generator"])[ENV] == "330"
    assert env_of(render({"serve": {"haproxy": {"hardStopAfterS": 1200}}}).pod_templates()["face"])[ENV] == "1200"


def test_warmup_has_no_haproxy_env():
    container = render({"modelCache": {"warmup": {"enabled": True}}}).head["template"]["spec"]["initContainers"][0]
    assert ENV not in {e["name"] for e in container["env"]}


@pytest.mark.parametrize("value", [120, 300, 329])
def test_refuses_a_hard_stop_shorter_than_the_longest_request(value):
    message = render_error({"serve": {"haproxy": {"hardStopAfterS": value}}})
    assert "serve.haproxy.hardStopAfterS" in message and "app.request_timeout_s" in message


def test_the_chart_and_ray_env_use_one_rule():
    """deployments/ray_env.py (tests, benchmarks, scripts/demo, `--local`) and the chart derive it alike."""
    from deployments.ray_env import CLUSTER_ENV, HARD_STOP_MARGIN_S, LOCAL_ENV, main

    assert HARD_STOP_MARGIN_S == MARGIN_S
    assert CLUSTER_ENV[ENV] == env_of(render().head["template"])[ENV] == "330"
    assert LOCAL_ENV[ENV] == "330"
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        main(["--local"])
    assert f"export {ENV}=330" in out.getvalue()
    import shutil

    state = re.search(r"export RAY_SERVE_HAPROXY_SERVER_STATE_BASE=(\S+)", out.getvalue()).group(1)
    shutil.rmtree(state.strip("'"), ignore_errors=True)


def test_image_sets_it_for_serve_run_outside_kubernetes():
    """The image's launcher (serve run/deploy outside the chart) gets the value the chart derives from the
    production config's timeout."""
    import yaml

    dockerfile = (REPO / "Dockerfile").read_text()
    found = re.search(rf"{ENV}=(\d+)", dockerfile)
    assert found, "the Dockerfile does not set the hard stop"
    production = yaml.safe_load((REPO / "serve" / "production.yaml").read_text())
    timeout = production["applications"][0]["args"]["request_timeout_s"]
    assert int(found.group(1)) >= timeout + MARGIN_S
    from deployments.ray_env import CLUSTER_ENV

    assert found.group(1) == CLUSTER_ENV[ENV]


RENDER_RAYS_CONFIG = """
import sys
from ray.serve._private.haproxy import HAProxyApi, HAProxyConfig
api = HAProxyApi(HAProxyConfig(), config_file_path=sys.argv[1])
api._generate_config_file_internal()
print(open(sys.argv[1]).read())
"""


def rays_haproxy_config(tmp_path, env: dict) -> str:
    """The HAProxy configuration Ray 2.60 itself writes in a process with `env` (its constants read it at import)."""
    import os
    import subprocess
    import sys

    private = {"RAY_SERVE_HAPROXY_SOCKET_PATH": str(tmp_path / "admin.sock"),
               "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(tmp_path),
               "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(tmp_path / "server-state")}
    base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_SERVE_")}
    result = subprocess.run([sys.executable, "-c", RENDER_RAYS_CONFIG, str(tmp_path / "haproxy.cfg")],
                            env={**base, **env, **private}, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_rays_own_haproxy_config_carries_the_charts_hard_stop(tmp_path):
    """Known answer from the other side: Ray's config generator, run with a GPU pod's environment exactly as the
    chart renders it, writes `hard-stop-after 330s`; without it, Ray's 120 s. And the hardened HAProxy
    (deployments/haproxy_guard.py rewrites Ray's config before each start and reload) keeps the line."""
    from pathlib import Path

    from deployments.haproxy_guard import harden, write_error_files

    template = render().pod_templates()["generator"]
    pod_env = {e["name"]: e["value"] for e in template["spec"]["containers"][0]["env"] if "value" in e}
    (tmp_path / "chart").mkdir()
    (tmp_path / "ray-default").mkdir()
    ours = rays_haproxy_config(tmp_path / "chart", pod_env)
    default = rays_haproxy_config(tmp_path / "ray-default", {})
    assert re.findall(r"^\s*hard-stop-after (\d+)s$", default, re.M) == ["120"]
    assert re.findall(r"^\s*hard-stop-after (\d+)s$", ours, re.M) == ["330"]
    hardened = harden(ours, write_error_files(Path(tmp_path / "errors")))
    assert re.findall(r"^\s*hard-stop-after (\d+)s$", hardened, re.M) == ["330"]
