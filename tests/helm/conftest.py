"""Fixtures of the chart tests (helpers live in chart_helpers.py, importable by name from these tests)."""

from __future__ import annotations

import pytest
import yaml

from chart_helpers import CRD_MISSING, CRD_PATH, VALUE_SET_NAMES


@pytest.fixture(params=VALUE_SET_NAMES)
def value_set(request) -> str:
    """Each value set in turn: chart defaults plus every ci/*-values.yaml."""
    return request.param


@pytest.fixture(scope="session")
def crd_schema() -> dict:
    """openAPIV3Schema of the served+stored version of KubeRay's RayService CRD."""
    if not CRD_PATH.is_file():
        pytest.skip(CRD_MISSING)
    crd = yaml.load(CRD_PATH.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # 18k lines
    assert crd["kind"] == "CustomResourceDefinition" and crd["spec"]["names"]["kind"] == "RayService"
    versions = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    assert versions and versions[0]["served"] and versions[0]["storage"]
    return versions[0]["schema"]["openAPIV3Schema"]


@pytest.fixture(scope="session", autouse=True)
def _quiet_helm():
    import helm_python

    helm_python.disable_logging()
    yield


def pytest_terminal_summary(terminalreporter):
    """Say it at the end too: a skipped schema check must not pass unnoticed."""
    if not CRD_PATH.is_file():
        terminalreporter.write_line(f"NOTE: {CRD_MISSING}", yellow=True)
