"""ASGI middleware: request body size limit, HTTP metrics."""

from __future__ import annotations

import time

from .errors import ApiError
from .metrics import ServerMetrics

KNOWN_METHODS = {"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"}


class BodySizeLimit:
    """Answer 413 to a body over max_bytes: at once from Content-Length, or as soon as a chunked one passes it."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = ApiError(413, f"The request body is larger than {self.max_bytes} bytes.", code="request_too_large")
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:
            if not length.isdigit():
                invalid = ApiError(400, "Invalid Content-Length header.", code="invalid_request")
                return await invalid.response()(scope, receive, send)
            if int(length) > self.max_bytes:
                return await too_large.response()(scope, receive, send)
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise too_large
            return message

        await self.app(scope, limited_receive, send)


class HttpMetrics:
    """Count every answer by method, route template and status; time it to the last byte."""

    def __init__(self, app, metrics: ServerMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        status = 500

        async def send_with_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        finally:
            method = scope["method"] if scope["method"] in KNOWN_METHODS else "OTHER"
            route = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.http_requests.labels(method=method, route=route, status=str(status)).inc()
            self.metrics.http_duration.labels(method=method, route=route).observe(time.perf_counter() - started)
