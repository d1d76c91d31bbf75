"""``fewstep serve``: build the app from settings and run it on uvicorn with the deadlines for slow clients and
the SIGTERM drain of server/lifecycle.py; a drained shutdown exits 0."""

from __future__ import annotations

import logging

from fewstep.server.settings import ServeSettings


def serve(settings: ServeSettings) -> None:
    from fewstep.server.api import create_app
    from fewstep.server.lifecycle import build_server

    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    build_server(create_app(settings), settings).run()
