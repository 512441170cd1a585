"""``retinaedge serve --model DIR --host H --port P``: the local HTTP service under uvicorn."""

from __future__ import annotations

import argparse
import logging
import os
import signal
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from retinaedge.service.settings import Settings

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Path, help="model bundle directory (or RETINAEDGE_MODEL)")
    p.add_argument(
        "--host", help="bind address (default 127.0.0.1; beyond loopback needs RETINAEDGE_API_TOKEN)"
    )
    p.add_argument("--port", type=int, help="port (default 8080)")
    p.add_argument("--config", type=Path, help="JSON settings file (environment variables override it)")


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Settings from the environment, ``--config`` and the command line (raises ConfigError)."""
    from retinaedge.service.settings import load_settings

    if args.config:
        os.environ["RETINAEDGE_CONFIG_FILE"] = str(args.config)
    settings = load_settings(model=args.model, host=args.host, port=args.port)
    if getattr(args, "log_level", None) is None:  # not on the command line: the setting applies
        logging.getLogger().setLevel(settings.log_level)
    return settings


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(0)


def serve(settings: Settings) -> int:
    """Run the service under uvicorn until SIGINT/SIGTERM (graceful: 30 s for requests in flight)."""
    import uvicorn
    from retinaedge.service.app import create_app
    from retinaedge.service.http.protocol import protocol_class
    from retinaedge.service.http.tls import uvicorn_options

    tls = uvicorn_options(settings)  # a certificate that cannot be used is refused before anything starts
    app = create_app(settings)
    scheme = "https" if tls else "http"
    served = ", ".join(str(entry.path) for entry in settings.bundles())
    log.info("serving %s on %s://%s:%d", served, scheme, settings.host, settings.port)
    # uvicorn (0.54 here) captures SIGTERM for its graceful shutdown, then restores the handler it
    # found and raises the captured signal again (Server.capture_signals). Under the default handler
    # that kills the process with SIGTERM after a clean shutdown: status 143 through tini, which a
    # supervisor reads as a failure. This handler turns that SIGTERM (and one that arrives before
    # uvicorn has installed its own handlers) into exit status 0. SIGINT keeps Python's default.
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        uvicorn.run(
            app,
            host=settings.host,
            port=settings.port,
            access_log=False,
            log_config=None,
            timeout_graceful_shutdown=30,
            http=protocol_class(settings.request_header_timeout_s),
            **tls,
        )
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


def run(args: argparse.Namespace) -> int:
    return serve(settings_from_args(args))
