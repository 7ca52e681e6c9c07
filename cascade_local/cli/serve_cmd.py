"""`cascade-local serve`: the model behind OpenAI- and Anthropic-compatible HTTP endpoints."""

from __future__ import annotations

import os

import typer

from cascade_local.cli import options
from cascade_local.cli.console import err_console


def serve(
    model: str | None = typer.Argument(None, show_default=False, metavar="MODEL", help="Registry name (default: "
                                       "nemotron-cascade-2) or a .gguf path."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on. Anything but loopback needs "
                             "--api-key-env or --no-auth."),
    port: int = typer.Option(8080, "--port", min=0, max=65535, help="TCP port (0: any free port; the "
                             "'listening on' line says which)."),
    parallel: int = typer.Option(4, "--parallel", min=1, help="Requests decoded at once; more wait in a queue."),
    ctx: str = options.CTX,
    kv_type: str = options.KV_TYPE,
    queue: int = typer.Option(64, "--queue", min=0, help="Requests that may wait for a free sequence; beyond "
                              "that the answer is 429 with Retry-After."),
    name: str | None = typer.Option(None, "--name", help="The model id clients use (default: the model's name)."),
    api_key_env: str | None = typer.Option(None, "--api-key-env", metavar="VAR", help="Require the key held in "
                                           "environment variable VAR (Authorization: Bearer, or x-api-key)."),
    no_auth: bool = typer.Option(False, "--no-auth", help="Allow a non-loopback --host without a key."),
    reasoning_format: str = typer.Option("reasoning_content", "--reasoning-format", help="How OpenAI replies "
                                         "carry the reasoning: reasoning_content, reasoning, or inline (<think> "
                                         "tags in the content)."),
    cache_mem: str = typer.Option("2GiB", "--cache-mem", help="Memory for prompt snapshots reused across "
                                  "requests (least recently used dropped first; 0: off)."),
    cache_size: str = typer.Option("4GiB", "--cache-size", help="Disk for prompt states of long prompts, kept "
                                   "across restarts and shared with run and batch (0: off)."),
    cache_min_tokens: int = typer.Option(2048, "--cache-min-tokens", min=1, help="Keep on disk the states of "
                                         "prompts of at least N tokens."),
    max_body: str = typer.Option("8MiB", "--max-body", help="Largest request body accepted."),
    threads: int | None = options.THREADS,
    gpu_mem: str = options.GPU_MEM,
    cpu_moe: bool = options.CPU_MOE,
    n_cpu_moe: int | None = options.N_CPU_MOE,
    override_tensor: list[str] = options.OVERRIDE_TENSOR,
    rpc: str | None = options.RPC,
) -> None:
    """Serve the model over HTTP: /v1/chat/completions, /v1/messages, /v1/models, /health and /metrics.

    Logs and the 'listening on' line go to stderr. Ctrl-C or SIGTERM lets open requests finish, then exits 0.
    Exit codes: 0 stopped, 1 usage error (port taken, bad option), 2 model error.

    Example: cascade-local serve model.gguf --port 8080 --parallel 4
    """
    from pathlib import Path

    from cascade_local.errors import UsageError
    from cascade_local.placement import parse_size
    from cascade_local.registry import load_registry
    from cascade_local.runtime import PlacementOptions, open_engine, parse_ctx
    from cascade_local.server.app import ServeOptions
    from cascade_local.server.chat import REASONING_FORMATS
    from cascade_local.server.run import bind, check_exposure, serve

    if reasoning_format not in REASONING_FORMATS:
        raise UsageError(f"--reasoning-format must be one of {', '.join(REASONING_FORMATS)}")
    api_key = None
    if api_key_env is not None:
        api_key = os.environ.get(api_key_env)
        if not api_key:
            raise UsageError(f"--api-key-env {api_key_env}: that environment variable is empty or not set")
    check_exposure(host, api_key, no_auth)
    cache_bytes, max_body_bytes, disk_bytes = parse_size(cache_mem), parse_size(max_body), parse_size(cache_size)
    registry = load_registry()
    defaults = {mode: registry.get(None).sampling_defaults(mode) for mode in (True, False)}
    sock = bind(host, port)  # a taken port is refused before minutes of loading
    try:
        with err_console.status("loading"):
            engine, _ = open_engine(model, ctx=parse_ctx(ctx), parallel=parallel, threads=threads, kv_type=kv_type,
                                    placement=PlacementOptions(gpu_mem, cpu_moe, n_cpu_moe, tuple(override_tensor),
                                                               (rpc,) if rpc else ()))
        path = Path(engine.model.path)
        from cascade_local.prompt_store import open_store

        store = open_store(path, kv_type, disk_bytes)
        served = name or (model if model and model in registry.models else path.stem)
        opts = ServeOptions(served, (path.name, path.stem), api_key, reasoning_format,  # type: ignore[arg-type]
                            queue_limit=queue, cache_bytes=cache_bytes, prompt_store=store,
                            cache_min_tokens=cache_min_tokens,
                            max_body_bytes=max_body_bytes, sampling_defaults=defaults)
        serve(engine, opts, sock)
    finally:
        sock.close()
    err_console.print("stopped", style="dim", highlight=False)
