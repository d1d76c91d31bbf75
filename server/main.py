"""``fewstep serve``: build the app from settings and run it on uvicorn (SIGTERM drains, then exits)."""

from __future__ import annotations

import logging

import uvicorn

from fewstep.server.settings import ServeSettings


def serve(settings: ServeSettings) -> None:
    from fewstep.server.api import create_app

    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=int(settings.request_timeout_s) + 5,
    )
    uvicorn.Server(config).run()
