"""`cascade-local rpc-server`: serve this machine's memory and compute to other processes over llama.cpp's RPC."""

from __future__ import annotations

import signal
import socket
import threading

import typer

from cascade_local.cli import options
from cascade_local.cli.console import err_console
from cascade_local.rpc import DEFAULT_PORT

UNAUTHENTICATED = "--i-understand-this-is-unauthenticated"


def rpc_server(
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on. Anything but loopback needs "
                             f"{UNAUTHENTICATED}: the protocol has no authentication."),
    port: int = typer.Option(DEFAULT_PORT, "--port", min=1, max=65535, help="TCP port to listen on."),
    threads: int | None = options.THREADS,
    cache: str | None = typer.Option(None, "--cache", metavar="DIR", help="Keep tensors clients send in DIR, so "
                                     "a model loads faster the next time (llama.cpp's rpc-server -c)."),
    unauthenticated: bool = typer.Option(False, UNAUTHENTICATED, help="Listen on a non-loopback address although "
                                         "anyone who reaches the port can use this machine's memory."),
) -> None:
    """Serve this machine's CPU (or GPU, in a GPU build) to cascade-local or llama.cpp on other machines.

    A client pools it with `--rpc HOST:PORT` (chat, run, batch, plan): the plan puts the GPU's part of the model
    there. WARNING: llama.cpp's RPC protocol has no authentication and no encryption; anyone who can reach the
    port can read and write this process's memory and run computations. Bind to loopback (the default) or a
    trusted network only. Ctrl-C stops the server. Exit codes: 0 stopped, 1 usage error, 2 cannot serve.

    Example: cascade-local rpc-server --port 50052
    """
    from cascade_local.errors import UsageError
    from cascade_local.ggml import default_threads
    from cascade_local.rpc import RpcError, _require, hello, is_loopback, serve

    if not is_loopback(host):
        if not unauthenticated:
            raise UsageError(f"--host {host} would let anyone who reaches it use this machine: the RPC protocol has "
                             f"no authentication. Add {UNAUTHENTICATED} on a trusted network only")
        err_console.print(f"warning: serving on {host}:{port} without authentication or encryption; anyone who "
                          "reaches this port can read and write this process's memory", style="bold yellow",
                          highlight=False)
    _require()
    _check_port(host, port)
    failed: list[BaseException] = []

    def run() -> None:
        try:
            serve(host, port, threads=threads or default_threads(), cache_dir=cache)
        except BaseException as exc:  # handed to the main thread, which reports it
            failed.append(exc)

    # Ctrl-C may come at any moment from here on, even while the server thread starts: a handler that only sets
    # an event means it is never raised as a KeyboardInterrupt somewhere between two statements.
    stop = threading.Event()
    previous = signal.signal(signal.SIGINT, lambda signum, frame: stop.set())
    try:
        # ggml's server loop never returns; in a daemon thread it leaves the main thread free to take Ctrl-C.
        server = threading.Thread(target=run, name="rpc-server", daemon=True)
        server.start()
        # Announced once the server answers the protocol's HELLO: a client that reads the line can connect.
        while server.is_alive() and not stop.is_set():
            try:
                hello(f"{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}", timeout=1)
            except RpcError:
                stop.wait(0.05)
                continue
            err_console.print(f"rpc-server: serving on {host}:{port}; Ctrl-C stops it", highlight=False)
            break
        while server.is_alive() and not stop.wait(0.2):
            pass
    finally:
        signal.signal(signal.SIGINT, previous)
    if stop.is_set():
        err_console.print("rpc-server: stopped", highlight=False)
        return
    raise failed[0] if failed else RpcError("the RPC server stopped")


def _check_port(host: str, port: int) -> None:
    """One line instead of ggml's bare 'Failed to create server socket' for a port already in use."""
    from cascade_local.rpc import RpcError

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise RpcError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
