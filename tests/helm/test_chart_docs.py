"""docs/deploy.md stays true to the chart: its production Serve config block is the default render."""

from __future__ import annotations

import re

import yaml

from chart_helpers import CI_DIR, REPO, render_set

DOC = (REPO / "docs" / "deploy.md").read_text()


def test_documented_serve_config_is_the_default_render():
    match = re.search(r"<!-- serveConfigV2:begin -->\n```yaml\n(.*?)```\n<!-- serveConfigV2:end -->", DOC, re.S)
    assert match, "docs/deploy.md lost its serveConfigV2 block"
    rendered = render_set("default").rayservice["spec"]["serveConfigV2"]
    assert match.group(1) == rendered
    assert yaml.safe_load(match.group(1)) == render_set("default").serve_config


def test_docs_cover_the_journey():
    for heading in ("## 1. Cluster prerequisites", "## 2. Build the image", "## 3. Secrets", "## 5. Install and the first image",
                    "## 6. Upgrades", "## 7. Scaling knobs and their cost"):
        assert heading in DOC
    for path in CI_DIR.glob("*-values.yaml"):
        assert path.name.removesuffix("-values.yaml") in DOC, path.name
    assert "helm/render_k8s.py" in DOC and "kubectl apply -k" in DOC


def test_upgrade_table_does_not_promise_no_downtime_for_app_args():
    """Changing app.* restarts every replica in place; with one Generator that is a generation outage."""
    rows = [line for line in DOC.splitlines() if line.startswith("| `app.*` args")]
    assert len(rows) == 1, "the upgrade table lost its app.* row"
    row = rows[0]
    assert "restarts the replicas" in row and "yes" in row.split("|")[3]
    defaults = render_set("default")
    assert defaults.deployment("Generator")["autoscaling_config"]["min_replicas"] == 1 and "min 1" in row
