"""`cascade-local chat`: a conversation in the terminal."""

from __future__ import annotations

import sys

import typer

from cascade_local.cli.console import err_console

HELP = ("/think on|off · /budget N|off · /system TEXT · /retry · /clear · /exit   "
        "(reasoning is dimmed; Ctrl-C stops an answer)")


def chat(
    model: str | None = typer.Argument(None, help="Registry name (default: nemotron-cascade-2) or a .gguf path."),
    think: bool = typer.Option(True, "--think/--no-think", help="Start with thinking on or off."),
    budget: int | None = typer.Option(None, "--budget", min=1, help="Close the reasoning after N tokens."),
    system: str | None = typer.Option(None, "--system", help="System prompt."),
    hide_thinking: bool = typer.Option(False, "--hide-thinking", help="Do not print the reasoning."),
    ctx: int = typer.Option(8192, "--ctx", min=256, help="Context length in tokens."),
    temperature: float | None = typer.Option(None, "--temperature", min=0.0, help="Sampling temperature (0: greedy; "
                                             "default from models.toml: 1.0 thinking, 0.6 without)."),
    top_p: float | None = typer.Option(None, "--top-p", min=0.0, max=1.0, help="Nucleus sampling threshold "
                                       "(default from models.toml: 0.95)."),
    seed: int | None = typer.Option(None, "--seed", help="Sampling seed, for repeatable answers."),
    max_tokens: int = typer.Option(4096, "--max-tokens", min=1, help="Most tokens per answer."),
    threads: int | None = typer.Option(None, "--threads", min=1, help="CPU threads (default: all cores)."),
    gpu_mem: str = typer.Option("auto", "--gpu-mem", help="GPU memory to use: auto, a size (8GiB), or 0."),
    cpu_moe: bool = typer.Option(False, "--cpu-moe", help="Keep all expert weights in RAM."),
    n_cpu_moe: int | None = typer.Option(None, "--n-cpu-moe", help="Keep the first N layers' experts in RAM."),
    override_tensor: list[str] = typer.Option([], "--override-tensor", "-ot", help="REGEX=DEVICE (CPU, CUDA0...), "
                                              "as llama.cpp's -ot. Repeatable."),
) -> None:
    """Chat with a model in the terminal; reasoning is shown dimmed, the answer plainly.

    Example: cascade-local chat ./cascade2-q4.gguf --no-think
    """
    from cascade_local.conversation import Conversation, TurnSettings
    from cascade_local.registry import load_registry
    from cascade_local.runtime import PlacementOptions, open_engine
    from cascade_local.sampling import SamplingParams

    placement = PlacementOptions(gpu_mem, cpu_moe, n_cpu_moe, tuple(override_tensor))
    with err_console.status("loading"):
        engine, plan = open_engine(model, ctx=ctx, threads=threads, placement=placement)
    path = engine.model.path
    chat_ = Conversation(engine, system)
    entry = load_registry().get(None)  # the recommended sampling of the model family

    def sampling(thinking: bool) -> SamplingParams:
        defaults = entry.sampling_defaults(thinking)
        return SamplingParams(temperature=temperature if temperature is not None else defaults.get("temperature", 1.0),
                              top_p=top_p if top_p is not None else defaults.get("top_p", 0.95), seed=seed)

    settings = TurnSettings(think, budget, max_tokens, sampling(think))
    err_console.print(f"[bold]{path.name}[/] · thinking {'on' if think else 'off'} · {HELP}", highlight=False)
    err_console.print(f"placement: {plan.verdict}", style="dim", highlight=False, markup=False)
    while True:
        try:
            text = input(">>> ")
        except EOFError:
            err_console.print()
            return
        command = text.strip()
        if not command:
            continue
        if command.startswith("/"):
            if command in ("/exit", "/quit", "/bye"):
                return
            if command == "/retry" and (previous := chat_.retry_last()) is not None:
                _answer(chat_, previous, settings, hide_thinking)
            else:
                err_console.print(_slash(command, chat_, settings), highlight=False)
                settings.sampling = sampling(settings.thinking)
            continue
        _answer(chat_, text, settings, hide_thinking)


def _slash(command: str, chat_: object, settings: object) -> str:
    """Applies a settings command; returns what to tell the user."""
    from cascade_local.conversation import Conversation, TurnSettings

    assert isinstance(chat_, Conversation) and isinstance(settings, TurnSettings)
    name, _, arg = command.partition(" ")
    arg = arg.strip()
    if name == "/think" and arg in ("on", "off"):
        settings.thinking = arg == "on"
        return f"thinking {arg}"
    if name == "/budget" and (arg == "off" or (arg.isdigit() and int(arg) > 0)):
        settings.thinking_budget = None if arg == "off" else int(arg)
        return f"thinking budget {arg}"
    if name == "/system":
        chat_.system = arg or None
        return "system prompt set" if arg else "system prompt cleared"
    if name == "/clear":
        chat_.clear()
        return "conversation cleared"
    return HELP


def _answer(chat_: object, text: str, settings: object, hide_thinking: bool) -> None:
    from cascade_local.conversation import Conversation, TurnSettings

    assert isinstance(chat_, Conversation) and isinstance(settings, TurnSettings)
    last = None
    try:
        for event in chat_.reply(text, settings):
            if event.kind == "reasoning":
                if not hide_thinking:
                    err_console.print(event.text, style="dim", end="", highlight=False, markup=False)
            elif event.kind == "content":
                if last == "reasoning" and not hide_thinking:
                    err_console.print()
                sys.stdout.write(event.text)
                sys.stdout.flush()
            last = event.kind
    except KeyboardInterrupt:
        err_console.print("\n[yellow]stopped[/]")
    sys.stdout.write("\n")
    sys.stdout.flush()
    if chat_.last is not None:
        r = chat_.last
        err_console.print(f"{r.completion_tokens} tokens ({r.reasoning_tokens} thinking), "
                          f"{r.generation_tokens_per_second:.1f} tok/s, prompt {r.prompt_tokens} "
                          f"({r.cached_tokens} reused)", style="dim", highlight=False)
