"""The FastAPI application of one server process: the API routes (api roles) and /health, /ready, /metrics."""

from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import FastAPI

from .errors import install_error_handlers
from .middleware import BodySizeLimit, HttpMetrics
from .routes import FORM_FIELD_BYTES, api_router, ops_router
from .services import Services


def create_app(services: Services) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if services.worker is not None:
            services.worker.start()
        yield
        await services.close()

    app = FastAPI(
        title="nextstep-serve",
        summary="OpenAI-compatible image generation with NextStep models",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.services = services
    install_error_handlers(
        app, lambda err: services.metrics.request_errors.labels(reason=err.code or str(err.status)).inc()
    )
    app.include_router(ops_router)
    if services.queue is not None:
        app.include_router(api_router)
    # an edit body is one image plus a few small fields
    app.add_middleware(BodySizeLimit, max_bytes=services.settings.max_upload_bytes + FORM_FIELD_BYTES)
    app.add_middleware(HttpMetrics, metrics=services.metrics)  # added last: outermost, sees every answer
    return app
