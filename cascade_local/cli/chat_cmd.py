"""`cascade-local chat`: a conversation in the terminal."""

from __future__ import annotations

import sys

import typer

from cascade_local.cli.console import err_console

HELP = "/think on|off  thinking mode for the next turns · /clear  forget the conversation · /exit  quit"


def chat(
    model: str | None = typer.Argument(None, help="Registry name (default: nemotron-cascade-2) or a .gguf path."),
    think: bool = typer.Option(True, "--think/--no-think", help="Start with thinking on or off."),
    hide_thinking: bool = typer.Option(False, "--hide-thinking", help="Do not print the reasoning."),
    ctx: int = typer.Option(8192, "--ctx", min=256, help="Context length in tokens."),
    temperature: float = typer.Option(1.0, "--temperature", min=0.0, help="Sampling temperature."),
    top_p: float = typer.Option(0.95, "--top-p", min=0.0, max=1.0, help="Nucleus sampling threshold."),
    max_tokens: int = typer.Option(4096, "--max-tokens", min=1, help="Most tokens per answer."),
    threads: int | None = typer.Option(None, "--threads", min=1, help="CPU threads (default: all cores)."),
) -> None:
    """Chat with a model in the terminal; reasoning is shown dimmed, the answer plainly.

    Example: cascade-local chat ./cascade2-q8_0.gguf --no-think
    """
    from cascade_local.chat_session import ChatSession, Sampling
    from cascade_local.resolve import resolve_model

    path = resolve_model(model)
    with err_console.status(f"loading {path.name}"):
        session = ChatSession(path, n_ctx=ctx, threads=threads)
    sampling = Sampling(temperature=temperature, top_p=top_p, max_tokens=max_tokens)
    err_console.print(f"[bold]{path.name}[/] · thinking {'on' if think else 'off'} · {HELP}", highlight=False)
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
            if command in ("/think on", "/think off"):
                think = command.endswith("on")
                err_console.print(f"thinking {'on' if think else 'off'}")
            elif command == "/clear":
                session.clear()
                err_console.print("conversation cleared")
            else:
                err_console.print(HELP, highlight=False)
            continue
        _answer(session, text, think, hide_thinking, sampling)


def _answer(session: object, text: str, think: bool, hide_thinking: bool, sampling: object) -> None:
    from cascade_local.chat_session import ChatSession

    assert isinstance(session, ChatSession)
    last = None
    try:
        for piece in session.stream(text, enable_thinking=think, sampling=sampling):  # type: ignore[arg-type]
            if piece.kind == "reasoning":
                if not hide_thinking:
                    err_console.print(piece.text, style="dim", end="", highlight=False, markup=False)
            else:
                if last == "reasoning" and not hide_thinking:
                    err_console.print()
                sys.stdout.write(piece.text)
                sys.stdout.flush()
            last = piece.kind
    except KeyboardInterrupt:
        err_console.print("\n[yellow]stopped[/]")
    sys.stdout.write("\n")
    sys.stdout.flush()
