"""The private Ray hooks of deployments/ray_compat.py still exist and do what the application relies on. These
fail on a Ray upgrade that renames, removes or changes one: fix ray_compat.py (and only it) then."""

from __future__ import annotations

import pytest
from ray.serve.handle import DeploymentHandle

from deployments import ray_compat


class _StubRouter:
    """Stands in for the router a handle builds on first use (that needs a running Serve)."""


@pytest.fixture()
def handle():
    made = []

    def create_router(**kwargs):
        made.append(kwargs["handle_options"])
        return _StubRouter()

    h = DeploymentHandle("Generator", "instantid", _create_router=create_router)
    h.made = made
    return h


def test_loop_local_handle_runs_the_router_on_the_calling_loop_and_sends_by_value(handle):
    assert not handle.is_initialized
    fast = ray_compat.loop_local_handle(handle)
    assert handle.is_initialized and len(handle.made) == 1
    assert handle.init_options._run_router_in_separate_loop is False
    assert handle._is_router_running_in_separate_loop() is False
    assert fast.handle_options._by_reference is False
    assert fast._router is handle._router  # the options copy shares the loop-local router
    again = ray_compat.loop_local_handle(fast)  # an initialised handle is not initialised twice
    assert again.handle_options._by_reference is False and len(handle.made) == 1


def test_by_reference_keeps_the_other_options(handle):
    fast = ray_compat.loop_local_handle(handle)
    large = ray_compat.by_reference(fast, multiplexed_model_id="tiny")
    assert large.handle_options._by_reference is True
    assert large.handle_options.multiplexed_model_id == "tiny"
    assert fast.handle_options._by_reference is False  # options() copies; the by-value handle is unchanged


def test_multiplex_wrapper_is_where_serve_keeps_the_lru():
    """``@serve.multiplexed`` keeps its wrapper, with an ordered ``models`` mapping, under the attribute
    ray_compat reads (creating one needs a replica: checked on the decorator's code and the wrapper class)."""
    import inspect

    from ray.serve import api
    from ray.serve.multiplex import _ModelMultiplexWrapper

    assert repr(ray_compat.MULTIPLEX_WRAPPER_ATTR) in inspect.getsource(api.multiplexed).replace('"', "'")
    init = inspect.getsource(_ModelMultiplexWrapper.__init__)
    assert "self.models = OrderedDict()" in init
    assert "move_to_end" in inspect.getsource(_ModelMultiplexWrapper)  # an LRU: used last, evicted last

    def load(model_id):  # not decorated, or never called: nothing resident
        return model_id

    assert ray_compat.multiplexed_models(load) == []


@pytest.mark.serve
def test_the_generator_reports_its_resident_model_through_the_hook(serve_env):
    """On a running replica: the default model, loaded at start, is in the multiplex LRU ray_compat reads."""
    from ray import serve

    stats = serve.get_deployment_handle("Generator", app_name="instantid").stats.remote().result(timeout_s=120)
    assert stats["ready"] and stats["resident_models"] == ["tiny"]
