"""`cascade-local run`: one prompt in, the answer out on stdout, for scripts and pipes."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from cascade_local.cli import options
from cascade_local.cli.console import err_console

if TYPE_CHECKING:
    from cascade_local.engine import Engine, Event, Result
    from cascade_local.oneshot import OneShot


def run(
    model: str | None = typer.Argument(None, show_default=False, metavar="MODEL", help="Registry name or .gguf "
                                       "path. May be left "
                                       "out: a single argument that is not an existing path, a registry name or a "
                                       "*.gguf name is the PROMPT, and the default model answers it."),
    prompt: str | None = typer.Argument(None, show_default=False, metavar="PROMPT", help="The instruction. Text "
                                        "piped on stdin (and -f files) comes first, as context, then a blank line "
                                        "and PROMPT."),
    file: list[Path] = typer.Option([], "--file", "-f", exists=True, dir_okay=False, metavar="FILE",
                                    help="Read prompt context "
                                    "from FILE (repeatable; placed before stdin and PROMPT)."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object (content, reasoning, usage, "
                                  "timings, finish_reason, model) instead of streaming the answer."),
    show_thinking: bool | None = options.SHOW_THINKING,
    think: bool = typer.Option(True, "--think/--no-think", help="Let the model reason before answering."),
    budget: int | None = typer.Option(None, "--budget", min=1, help="Close the reasoning after N tokens."),
    system: str | None = typer.Option(None, "--system", help="System prompt."),
    raw: bool = typer.Option(False, "--raw", help="Send the prompt as is, without the chat template; all output "
                             "is content."),
    max_tokens: int = typer.Option(4096, "--max-tokens", min=1, help="Most tokens to generate (reasoning included)."),
    temperature: float | None = options.TEMPERATURE,
    top_p: float | None = options.TOP_P,
    top_k: int | None = options.TOP_K,
    min_p: float | None = options.MIN_P,
    repeat_penalty: float | None = options.REPEAT_PENALTY,
    seed: int | None = options.SEED,
    ignore_eos: bool = options.IGNORE_EOS,
    ctx: str = options.CTX,
    kv_type: str = options.KV_TYPE,
    threads: int | None = options.THREADS,
    gpu_mem: str = options.GPU_MEM,
    cpu_moe: bool = options.CPU_MOE,
    n_cpu_moe: int | None = options.N_CPU_MOE,
    override_tensor: list[str] = options.OVERRIDE_TENSOR,
    rpc: str | None = options.RPC,
    endpoint: str | None = typer.Option(None, "--endpoint", metavar="URL|NAME", help="Ask an OpenAI-compatible "
                                        "server (vLLM, SGLang, llama-server) instead of loading a model: a URL or "
                                        "an \\[endpoints] name from models.toml. MODEL, if given, is the served name."),
    tools: str | None = typer.Option(None, "--tools", metavar="NAME", help="Let the model call tools while it "
                                     "reasons: python (runs its code in a local Jupyter kernel; needs --yes)."),
    yes: bool = typer.Option(False, "--yes", help="Run every tool call without asking (run cannot ask)."),
    cache_size: str = options.CACHE_SIZE,
    cache_min_tokens: int = options.CACHE_MIN_TOKENS,
    log: bool = typer.Option(False, "--log", help="Keep this exchange in the chat history (cascade-local logs); "
                             "run is not logged otherwise."),
) -> None:
    """Answer one prompt: the answer goes to stdout, everything else to stderr.

    Stdin is read when it is not a terminal. Exit codes: 0 done, 1 usage error, 2 model error, 3 no answer (the
    token limit ended the reasoning: raise --max-tokens or set --budget), 130 interrupted.

    Example: cascade-local run model.gguf "Explain this diff" < change.diff
    """
    from cascade_local import oneshot
    from cascade_local.placement import parse_size
    from cascade_local.prompt_store import open_store
    from cascade_local.runtime import PlacementOptions, open_engine, parse_ctx

    if endpoint:
        spec, instruction = (model, prompt) if prompt is not None else (None, model)
    else:
        spec, instruction = oneshot.split_positionals(model, prompt)
    piped = None if sys.stdin is None or sys.stdin.isatty() else oneshot.decode_text(sys.stdin.buffer.read(), "stdin")
    sampling = oneshot.sampling_for(think and not raw, temperature=temperature, top_p=top_p, top_k=top_k,
                                    min_p=min_p, repeat_penalty=repeat_penalty, seed=seed,
                                    ignore_eos=ignore_eos or None)
    show_thinking = bool(show_thinking)  # run hides the reasoning unless asked
    job = oneshot.OneShot(oneshot.compose_prompt(instruction, piped, file), system, think and not raw, budget,
                          max_tokens, sampling, raw)
    if tools is not None:
        _check_tools(tools, yes, endpoint, raw)
    cache_budget = parse_size(cache_size)  # a bad size is refused before the model loads
    if endpoint:
        _run_remote(endpoint, spec, job, json_out, show_thinking, log)
        return
    with err_console.status("loading"):
        engine, _ = open_engine(spec, ctx=parse_ctx(ctx), threads=threads, kv_type=kv_type,
                                placement=PlacementOptions(gpu_mem, cpu_moe, n_cpu_moe, tuple(override_tensor),
                                                           (rpc,) if rpc else ()),
                                # With tools the prompt grows by each call's output: room to grow, as chat gets.
                                prompt_tokens=None if tools is not None
                                else lambda model: len(oneshot.prompt_tokens(model, job)),
                                max_tokens=max_tokens)
    with engine:  # context, then model, freed here: never left to the order of __del__ at exit
        if tools is not None:
            _run_tools(engine, job, tools, json_out, show_thinking, log)
            return
        disk = open_store(engine.model.path, kv_type, cache_budget)
        result = _show(oneshot.stream(engine, job, disk=disk, question=instruction, min_tokens=cache_min_tokens,
                                      progress=_reading_progress()), json_out, show_thinking)
        for why in disk.removed if disk is not None else ():
            err_console.print(f"warning: removed a damaged prompt state: {why}", style="yellow", highlight=False,
                              markup=False, soft_wrap=True)
        if log:
            _log_exchange(str(engine.model.path), job, [], result)
        if json_out:
            write_stdout(json.dumps(oneshot.result_json(result, engine.model.path.name), ensure_ascii=False) + "\n")
        elif err_console.is_terminal:
            err_console.print(f"{result.completion_tokens} tokens ({result.reasoning_tokens} thinking), "
                              f"{result.generation_tokens_per_second:.1f} tok/s, {result.finish_reason}",
                              style="dim", highlight=False)
        _require_answer(result)


def _reading_progress() -> Callable[[int, int], None] | None:
    """One updating stderr line while a long prompt is read (tokens, tokens/s, time left); terminals only."""
    if not err_console.is_terminal:
        return None
    from cascade_local.reading import LONG_PROMPT, ReadingRate

    rate = ReadingRate()

    def show(done: int, total: int) -> None:
        if total < LONG_PROMPT:
            return
        line = rate.line(done, total)
        sys.stderr.write("\r\x1b[K" + (line if done < total else ""))  # the line goes when reading is done
        sys.stderr.flush()

    return show


def _run_remote(endpoint: str, served: str | None, job: OneShot, json_out: bool, show_thinking: bool,
                log: bool = False) -> None:
    """`run --endpoint`: the same job, answered by a server that applies its own chat template."""
    from cascade_local import oneshot
    from cascade_local.endpoints import resolve_endpoint
    from cascade_local.errors import UsageError

    if job.raw or job.budget:
        raise UsageError("--raw and --budget need the local engine; leave them out with --endpoint")
    target = resolve_endpoint(endpoint)
    with target.engine() as engine:
        if served:
            engine.model = served
        events = engine.stream_chat(oneshot.build_messages(job.prompt, job.system), thinking=job.thinking,
                                    sampling=job.sampling, max_tokens=job.max_tokens)
        result = _show(events, json_out, show_thinking)
    if log:
        _log_exchange(engine.model or target.url, job, [], result)
    if json_out:
        name = engine.model or target.url
        write_stdout(json.dumps(oneshot.result_json(result, name), ensure_ascii=False) + "\n")
    _require_answer(result)


def _require_answer(result: Result) -> None:
    """A run cut off while reasoning printed nothing: say so, and exit 3 so that scripts can tell."""
    from cascade_local.errors import NoAnswerError
    from cascade_local.oneshot import cut_off_while_reasoning, no_answer_message

    if cut_off_while_reasoning(result):
        raise NoAnswerError(no_answer_message(result))


def _check_tools(tools: str, yes: bool, endpoint: str | None, raw: bool) -> None:
    from cascade_local.errors import UsageError

    if not yes:
        raise UsageError("--tools python runs the model's code on this machine, and run cannot ask before each "
                         "call: add --yes to allow them all")
    if endpoint or raw:
        raise UsageError("--tools needs the local engine and the chat template: leave out --endpoint and --raw")


def _run_tools(engine: Engine, job: OneShot, tools: str, json_out: bool, show_thinking: bool,
               log: bool = False) -> None:
    """`run --tools`: the answer as usual; each call's code and output go to stderr."""
    from cascade_local.oneshot import build_messages
    from cascade_local.tools import ToolLoop, make_tools

    answer, started = None, False
    with ToolLoop(engine, make_tools(tools), thinking=job.thinking, sampling=job.sampling,
                  max_tokens=job.max_tokens, budget=job.budget, yes=True) as loop:
        last = None
        for event in loop.stream(build_messages(job.prompt, job.system)):
            if event.kind == "reasoning" and show_thinking:
                if last != "reasoning":
                    _thinking_label()
                err_console.print(event.text, style="dim", end="", highlight=False, markup=False)
            elif event.kind == "content" and not json_out:
                text = event.text if started else event.text.lstrip()
                started = started or bool(text)
                write_stdout(text)
            elif event.kind == "tool_call":
                err_console.print(f"\n[python]\n{event.text}", style="cyan", highlight=False, markup=False)
            elif event.kind == "tool_result":
                err_console.print(f"[output]\n{event.text}", style="dim", highlight=False, markup=False)
            elif event.kind == "done":
                answer = event.answer
            last = event.kind
    assert answer is not None
    from cascade_local.cli.chat.tools import answer_result

    if log:
        asked = len(build_messages(job.prompt, job.system))  # the calls and their output come after the question
        _log_exchange(str(engine.model.path), job, answer.messages[asked:], answer_result(answer))
    if json_out:
        write_stdout(json.dumps({**answer.to_dict(), "model": engine.model.path.name}, ensure_ascii=False) + "\n")
    elif started:
        write_stdout("\n")
    _require_answer(answer_result(answer))


def _log_exchange(model: str, job: OneShot, calls: list[dict], result: Result) -> None:
    """`run --log`: the question, any tool calls with their output, and the answer, as one logged conversation.

    The answer was given either way: a history that cannot be written is one warning line, not a failure.
    """
    import sqlite3

    from cascade_local.conversation import TurnSettings
    from cascade_local.history import ConversationLog, HistoryError, connect

    messages = [{"role": "user", "content": job.prompt}, *calls,
                {"role": "assistant", "content": result.content.strip(), "reasoning_content": result.reasoning.strip()}]
    try:
        log = ConversationLog(connect(), source="run", model=model)
        log.sync(messages, system=job.system, settings=TurnSettings(job.thinking, job.budget, job.max_tokens,
                                                                    job.sampling), result=result)
    except (HistoryError, sqlite3.Error) as exc:
        err_console.print(f"warning: the exchange was not logged: {exc}", style="yellow", highlight=False,
                          markup=False, soft_wrap=True)


def _show(events: Iterable[Event], json_out: bool, show_thinking: bool) -> Result:
    """Streams the answer to stdout (unless --json) and the reasoning to stderr (if asked); returns the Result."""
    from cascade_local.oneshot import trim_content

    last, wrote = None, False
    try:
        for event in trim_content(events):
            if event.kind == "done":
                assert event.result is not None
                if last == "reasoning" and show_thinking:
                    err_console.print()
                if wrote:
                    write_stdout("\n")
                return event.result
            if event.kind == "reasoning" and show_thinking:
                if last != "reasoning":
                    _thinking_label()
                err_console.print(event.text, style="dim", end="", highlight=False, markup=False)
            elif event.kind == "content" and not json_out:
                if last == "reasoning" and show_thinking:
                    err_console.print()
                write_stdout(event.text)
                wrote = True
            last = event.kind
    except KeyboardInterrupt:
        # End the lines written so far, so that the "interrupted" notice starts a line of its own.
        if wrote:
            write_stdout("\n")
        elif last == "reasoning" and show_thinking:
            err_console.print()
        raise
    raise AssertionError("the engine ended a stream without a result")


def _thinking_label() -> None:
    """On a terminal, the reasoning (dim) starts under a label, so it is not taken for the answer; a pipe gets the
    reasoning alone."""
    if err_console.is_terminal:
        err_console.print("thinking", style="dim italic", highlight=False)


def write_stdout(text: str) -> None:
    """Writes and flushes at once: readers see the answer as it comes, and a closed pipe is noticed here."""
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:
        # Typer catches an OSError with errno EPIPE around every command and exits 1 with it. One without
        # an errno passes through to the app's handler, which ends quietly with 0, as `| head -1` expects.
        raise BrokenPipeError() from None
