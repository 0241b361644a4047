"""The private Ray Serve hooks this application relies on, in one place.

Ray may change any of them in a release without notice; each is used only through this module, and
tests/deployments/test_ray_compat.py fails when an upgrade breaks one (the attribute or keyword is gone, or no
longer does what we rely on). Written against Ray 2.60.

- ``DeploymentHandle._init(_run_router_in_separate_loop=False)``: the handle's router runs on the calling event
  loop instead of a thread of its own (two thread hand-offs less per call, ~0.45 ms; docs/benchmarks.md).
- ``handle.options(_by_reference=...)``: False sends arguments by value over Serve's gRPC data plane straight to
  the replica (3.8 -> 2.3 ms per call); True makes it an actor call whose large arguments and results go through
  Ray's object store (the gRPC plane refuses messages over 4 MiB; docs/reliability.md).
- ``__serve_multiplex_wrapper``: the attribute where ``@serve.multiplexed`` keeps its per-replica LRU
  (``.models``, least recently used first) on the decorated function; the Generator reports its resident
  models from it.
"""

from __future__ import annotations

MULTIPLEX_WRAPPER_ATTR = "__serve_multiplex_wrapper"


def loop_local_handle(handle):
    """``handle`` for calls from this replica's event loop, the cheapest way Serve offers: the router on the
    calling loop and arguments by value (``by_reference`` switches large calls back)."""
    if not handle.is_initialized:
        handle._init(_run_router_in_separate_loop=False)
    return handle.options(_by_reference=False)


def by_reference(handle, **options):
    """``handle.options(**options)`` whose calls go as actor calls, large arguments and results through Ray's
    object store."""
    return handle.options(_by_reference=True, **options)


def multiplexed_models(load_fn) -> list[str]:
    """Model ids in the ``@serve.multiplexed`` LRU of this replica for the (undecorated) ``load_fn``, least
    recently used first; empty before the first load."""
    wrapper = getattr(load_fn, MULTIPLEX_WRAPPER_ATTR, None)
    return list(wrapper.models) if wrapper is not None else []
