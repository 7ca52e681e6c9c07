"""`cascade-local batch`: answer every prompt of a file into a JSONL file, resumable after a crash."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from cascade_local.cli import options
from cascade_local.cli.console import err_console

if TYPE_CHECKING:
    from cascade_local.batch import BatchSummary, ItemSettings
    from cascade_local.runtime import PlacementOptions


def batch(
    model: str | None = typer.Argument(None, show_default=False, metavar="MODEL", help="Registry name (default: "
                                       "nemotron-cascade-2) or a .gguf path, as in run and chat; with --endpoint, "
                                       "the served model's name. May be left out."),
    input: str | None = typer.Argument(None, show_default=False, metavar="INPUT",
                                       help="Prompts: JSONL ({\"id\", \"prompt\" | \"messages\", options...} per "
                                       "line) or one prompt per line."),
    output: Path = typer.Option(..., "--output", "-o", show_default=False, metavar="OUTPUT",
                                help="JSONL file of answers, one record per item as it completes."),
    model_option: str | None = typer.Option(None, "--model", "-m", hidden=True, help="The old spelling of MODEL."),
    resume: bool | None = typer.Option(None, "--resume/--no-resume", show_default=False, help="Continue an existing "
                                       "OUTPUT (the default): skip ids answered there, retry those that failed. "
                                       "--no-resume refuses an existing OUTPUT."),
    force: bool = typer.Option(False, "--force", help="Overwrite OUTPUT instead of resuming it."),
    parallel: int = typer.Option(1, "--parallel", min=1, help="Items decoded at once (requests in flight with "
                                 "--endpoint)."),
    endpoint: str | None = typer.Option(None, "--endpoint", metavar="URL|NAME", help="Ask an OpenAI-compatible "
                                        "server instead of loading a model: a URL or an \\[endpoints] name. --model, "
                                        "if given, is the served model's name."),
    think: bool = typer.Option(True, "--think/--no-think", help="Let the model reason (an item's \"think\" wins)."),
    budget: int | None = typer.Option(None, "--budget", min=1, help="Close the reasoning after N tokens."),
    max_tokens: int = typer.Option(4096, "--max-tokens", min=1, help="Most tokens per item (reasoning included)."),
    system: str | None = typer.Option(None, "--system", help="System prompt for items without their own."),
    temperature: float | None = options.TEMPERATURE,
    top_p: float | None = options.TOP_P,
    top_k: int | None = options.TOP_K,
    min_p: float | None = options.MIN_P,
    repeat_penalty: float | None = options.REPEAT_PENALTY,
    seed: int | None = options.SEED,
    ignore_eos: bool = options.IGNORE_EOS,
    ctx: str = options.CTX,
    kv_type: str = options.KV_TYPE,
    cache_size: str = typer.Option("4GiB", "--cache-size", help="Disk for prompt states: a prefix every item "
                                   "shares (a document) is read once and kept; 0: off."),
    cache_min_tokens: int = typer.Option(2048, "--cache-min-tokens", min=1, help="Share and keep prefixes of at "
                                         "least N tokens."),
    threads: int | None = options.THREADS,
    gpu_mem: str = options.GPU_MEM,
    cpu_moe: bool = options.CPU_MOE,
    n_cpu_moe: int | None = options.N_CPU_MOE,
    override_tensor: list[str] = options.OVERRIDE_TENSOR,
    rpc: str | None = options.RPC,
) -> None:
    """Answer every prompt of INPUT into OUTPUT (JSONL), resuming where a stopped or crashed run left off.

    Each record is on disk once written; bad lines and failed items are recorded with their error and the
    job goes on. Resuming skips the ids answered in OUTPUT, retries those that failed or were cut off by
    --max-tokens while reasoning, and cuts off a half-written last line. Prints OUTPUT's path on stdout, a
    summary on stderr. Exit codes: 0 every item answered, 1 usage error, 2 model error, 3 some items failed or
    were cut off (their records say why), 130 interrupted.

    Example: cascade-local batch questions.jsonl -o answers.jsonl --parallel 4 --max-tokens 1024
    """
    from cascade_local.batch import ItemSettings
    from cascade_local.cli.run_cmd import write_stdout
    from cascade_local.errors import UsageError
    from cascade_local.placement import parse_size
    from cascade_local.runtime import PlacementOptions, parse_ctx

    if force and resume:
        raise UsageError("--force overwrites OUTPUT and --resume continues it: choose one")
    model, prompts = _model_and_input(model, input, model_option)
    settings = ItemSettings(think, budget, max_tokens, temperature, top_p, top_k, min_p, repeat_penalty, seed, system,
                            ignore_eos)
    load = _Load(parse_ctx(ctx), kv_type, parse_size(cache_size), cache_min_tokens, threads,
                 PlacementOptions(gpu_mem, cpu_moe, n_cpu_moe, tuple(override_tensor), (rpc,) if rpc else ()))
    try:
        summary = _answer_all(prompts, output, model, endpoint, parallel, settings, resume, force, load)
    except KeyboardInterrupt:
        # Every record written is on disk; say how to go on rather than just "interrupted".
        err_console.print(f"interrupted: the answers so far are in {output}; run the same command again to resume",
                          style="yellow", highlight=False, markup=False, soft_wrap=True)
        raise typer.Exit(130) from None
    err_console.print(f"{summary.line()} -> {output}", highlight=False, markup=False, soft_wrap=True)
    write_stdout(f"{output}\n")
    if summary.unanswered:
        raise typer.Exit(3)  # the job ran to the end, but not every item has an answer: scripts must hear it


def _model_and_input(first: str | None, second: str | None, option: str | None) -> tuple[str | None, Path]:
    """[MODEL] INPUT: one argument is INPUT; --model (the old spelling) may give the model instead."""
    from cascade_local.errors import UsageError

    model, given = (first, second) if second is not None else (None, first)
    if given is None:
        raise UsageError("missing INPUT: cascade-local batch [MODEL] INPUT -o OUTPUT")
    if model is not None and option is not None:
        raise UsageError("give the model once: as MODEL or with --model")
    path = Path(given)
    if not path.is_file():
        raise UsageError(f"INPUT {given} is {'a folder' if path.is_dir() else 'not a file that exists'}")
    return model if model is not None else option, path


@dataclass(frozen=True)
class _Load:
    """How a local model is loaded for the job, and the disk its shared prompt prefixes may use."""

    ctx: int | None  # None: --ctx auto
    kv_type: str
    cache_bytes: int
    cache_min_tokens: int
    threads: int | None
    placement: PlacementOptions


def _answer_all(input: Path, output: Path, model: str | None, endpoint: str | None, parallel: int,
                settings: ItemSettings, resume: bool | None, force: bool, load: _Load) -> BatchSummary:
    """Opens the job, the engine or the server, and answers what is left; returns the BatchSummary."""
    from cascade_local.batch import RemoteBackend, open_batch, run_batch
    from cascade_local.engine import Engine
    from cascade_local.runtime import open_engine

    disk = None

    with open_batch(input, output, resume=resume is not False, force=force) as job, contextlib.ExitStack() as owned:
        engine: Engine | RemoteBackend | None = None
        if job.todo and endpoint:
            from cascade_local.endpoints import resolve_endpoint

            remote = owned.enter_context(resolve_endpoint(endpoint).engine())  # closed with its connections
            if model:
                remote.model = model
            engine = RemoteBackend(remote, parallel)
        elif job.todo:  # everything answered already: no need to load a model
            with err_console.status("loading"):
                local, _ = open_engine(model, ctx=load.ctx, parallel=parallel, threads=load.threads,
                                       kv_type=load.kv_type, placement=load.placement)
            engine = owned.enter_context(local)  # freed (context, then model) before the output is closed
            from cascade_local.prompt_store import open_store

            disk = open_store(local.model.path, load.kv_type, load.cache_bytes)
        with _Progress() as progress:
            return run_batch(job, engine, settings, observer=progress, disk=disk, min_tokens=load.cache_min_tokens)


class _Progress:
    """Items done/total, tokens/s and ETA on stderr; only when stderr is a terminal (logs stay clean)."""

    def __init__(self) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self._bar = Progress(TextColumn("batch"), BarColumn(), MofNCompleteColumn(),
                             TextColumn("{task.fields[rate]:.1f} tok/s"), TimeRemainingColumn(),
                             console=err_console, transient=True, disable=not err_console.is_terminal)
        self._task = self._bar.add_task("batch", total=0, rate=0.0)
        self._tokens, self._started = 0, time.perf_counter()

    def start(self, total: int) -> None:
        self._bar.update(self._task, total=total)

    def record(self, record: dict[str, Any], completion_tokens: int) -> None:
        self._tokens += completion_tokens
        self._bar.update(self._task, advance=1, rate=self._tokens / max(time.perf_counter() - self._started, 1e-9))

    def __enter__(self) -> _Progress:
        self._bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._bar.stop()
