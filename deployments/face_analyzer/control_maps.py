"""Control maps derived on a FaceAnalyzer replica (the CPU face group), beside the same request's face analysis:
photos decoded with the face photos' bounds, resized as the demo resizes its photo, maps derived at that size."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time

import numpy as np

from deployments.errors import INVALID_IMAGE, from_exception
from deployments.messages import ControlMaps

MAP_THREADS = 2


class ControlMapsCore:
    """Derives maps on CPU: canny needs no model; depth and pose load on first use (``instantid.controls``)."""

    def __init__(self, depth: str, pose: str):
        from instantid.controls import Preprocessors

        self.preprocessors = Preprocessors(depth=depth, pose=pose)
        self.pool = concurrent.futures.ThreadPoolExecutor(MAP_THREADS, thread_name_prefix="control-maps")
        self._lock = threading.Lock()  # one map at a time: torch and onnxruntime already use the cores

    def derive(self, items: list[tuple[str, str, bytes]], should_stop=None) -> ControlMaps:
        from instantid.errors import InvalidImageError
        from instantid.face import load_image, resize_for_analysis

        started = time.perf_counter()
        maps = []
        for field, kind, data in items:
            try:
                photo = load_image(data, name=field, should_stop=should_stop)
            except InvalidImageError as exc:
                raise INVALID_IMAGE(str(exc).splitlines()[0], field=field) from None
            with self._lock:
                maps.append(np.asarray(self.preprocessors.derive(kind, resize_for_analysis(photo)), dtype=np.uint8))
        return ControlMaps(maps, {"control_maps_s": time.perf_counter() - started})

    async def run(self, items: list[tuple[str, str, bytes]]) -> ControlMaps:
        gone = threading.Event()
        try:
            return await asyncio.wrap_future(self.pool.submit(self.derive, items, gone.is_set))
        except asyncio.CancelledError:
            gone.set()
            raise
        except Exception as exc:
            raise from_exception(exc) from None
