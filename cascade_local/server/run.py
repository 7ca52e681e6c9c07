"""Runs the server until SIGINT or SIGTERM, then lets in-flight requests finish and returns."""

from __future__ import annotations

import errno
import socket
import sys
from types import FrameType
from typing import TYPE_CHECKING

from cascade_local.engine import Engine
from cascade_local.errors import UsageError
from cascade_local.server.app import ServeOptions, Service, create_app

if TYPE_CHECKING:
    import uvicorn

LOOPBACK = ("127.0.0.1", "::1", "localhost")


def check_exposure(host: str, api_key: str | None, no_auth: bool) -> None:
    """Anything beyond this machine needs a key, or a deliberate --no-auth."""
    if host not in LOOPBACK and api_key is None and not no_auth:
        raise UsageError(f"--host {host} lets other machines in: give --api-key-env VAR (a variable holding the "
                         "key clients must send) or, on a trusted network, --no-auth")


def bind(host: str, port: int) -> socket.socket:
    """The server's socket, listening (port 0: any free port), so that a taken port is one clear error before the
    model loads. Clients that connect while it loads wait in the backlog until the app is ready."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise UsageError(f"port {port} on {host} is taken: choose another with --port") from None
        raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.listen(128)
    return sock


def make_server(engine: Engine, options: ServeOptions, *, announce: str | None = None) -> uvicorn.Server:
    """A uvicorn server for the app. SIGINT/SIGTERM drain it; tests running it in a thread set `should_exit`."""
    import uvicorn

    service = Service(engine, options)
    config = uvicorn.Config(create_app(service), log_level="warning", access_log=False, lifespan="on",
                            timeout_graceful_shutdown=None)

    class Server(uvicorn.Server):
        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets)
            if announce and self.started:
                print(announce, file=sys.stderr, flush=True)

        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            # Drain and return normally (exit 0); uvicorn would re-raise the signal after shutting down.
            # A second Ctrl-C stops waiting for open requests.
            if self.should_exit:
                self.force_exit = True
            self.should_exit = True

    return Server(config)


def serve(engine: Engine, options: ServeOptions, sock: socket.socket) -> None:
    """Serves on `sock` (from `bind`) until SIGINT/SIGTERM; in-flight requests are answered before it returns."""
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    announce = f"listening on http://{shown}:{port} (model {options.name}, {engine.n_seq_max} parallel)"
    try:
        make_server(engine, options, announce=announce).run(sockets=[sock])
    finally:
        sock.close()
