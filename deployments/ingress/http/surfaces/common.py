"""Pieces the non-native surfaces share: authentication inside their own error shape, size strings."""

from __future__ import annotations

import re

from deployments.errors import INVALID_PARAMETER

SIZE = re.compile(r"(\d{1,5})x(\d{1,5})")  # fullmatch: "$" would let "64x64\n" through


def authenticate(edge, request) -> str | None:
    """The /v1 API keys, rate limit, failed-login throttle and in-flight bound; sets ``request.state.api_key``.
    Raises ServiceError: the surface re-raises it in its own shape."""
    if not edge.service.args.auth.enabled:
        request.state.api_key = None
        return None
    return edge.access.admit(request)


def parse_size(size, field: str = "size") -> tuple[int, int] | None:
    """'WxH' -> (W, H); 'auto' or absent -> None (the photo's size)."""
    if size is None or size == "auto":
        return None
    match = SIZE.fullmatch(size) if isinstance(size, str) else None
    if match is None:
        raise INVALID_PARAMETER(f"{field}: expected 'WIDTHxHEIGHT' (e.g. '1024x1024') or "
                           "'auto'", field=field)
    return int(match.group(1)), int(match.group(2))
