"""`cascade-local chat`: a conversation in the terminal."""

from __future__ import annotations

import contextlib
import sys

import typer

from cascade_local.cli import options
from cascade_local.cli.console import err_console


def chat(
    model: str | None = typer.Argument(None, metavar="MODEL", show_default=False, help="Registry name (default: "
                                       "nemotron-cascade-2) or a .gguf path."),
    message: str | None = typer.Argument(None, metavar="MESSAGE", show_default=False, help="A first message, asked "
                                         "at once (as `ollama run MODEL PROMPT`); the chat goes on after it."),
    think: bool = typer.Option(True, "--think/--no-think", help="Start with thinking on or off."),
    budget: int | None = typer.Option(None, "--budget", min=1, help="Close the reasoning after N tokens."),
    system: str | None = typer.Option(None, "--system", help="System prompt."),
    show_thinking: bool | None = options.SHOW_THINKING,
    ctx: str = options.CTX,
    kv_type: str = options.KV_TYPE,
    cache_size: str = options.CACHE_SIZE,
    cache_min_tokens: int = options.CACHE_MIN_TOKENS,
    temperature: float | None = options.TEMPERATURE,
    top_p: float | None = options.TOP_P,
    top_k: int | None = options.TOP_K,
    min_p: float | None = options.MIN_P,
    repeat_penalty: float | None = options.REPEAT_PENALTY,
    seed: int | None = options.SEED,
    ignore_eos: bool = options.IGNORE_EOS,
    max_tokens: int = typer.Option(4096, "--max-tokens", min=1, help="Most tokens per answer."),
    endpoint: str | None = typer.Option(None, "--endpoint", metavar="URL|NAME", help="Chat with an OpenAI-compatible "
                                        "server (vLLM, SGLang, llama-server): a URL or an \\[endpoints] name. MODEL, "
                                        "if given, is the served model's name."),
    threads: int | None = options.THREADS,
    gpu_mem: str = options.GPU_MEM,
    cpu_moe: bool = options.CPU_MOE,
    n_cpu_moe: int | None = options.N_CPU_MOE,
    override_tensor: list[str] = options.OVERRIDE_TENSOR,
    rpc: str | None = options.RPC,
    tools: str | None = typer.Option(None, "--tools", metavar="NAME", help="Let the model call tools while it "
                                     "reasons: python (runs its code in a local Jupyter kernel, asking before each "
                                     "call). /tools on|off switches them."),
    yes: bool = typer.Option(False, "--yes", help="Run every tool call without asking."),
    continue_: bool = typer.Option(False, "--continue", "-c", help="Go on with the last logged chat."),
    resume: int | None = typer.Option(None, "--resume", metavar="ID", help="Go on with logged conversation ID "
                                      "(cascade-local logs lists them)."),
    no_log: bool = typer.Option(False, "--no-log", help="Do not keep this chat in the history (to turn logging "
                                "off for good: \\[settings] log = false in models.toml)."),
) -> int:
    """Chat with a model in the terminal: the answer rendered as Markdown.

    The reasoning streams in a dim block that collapses to one line
    ("thought for 412 tokens, 9.1 s") when the answer starts.

    Slash commands (/help lists them, Tab completes them): /think on|off,
    /thinking show|hide, /budget N|off, /tools on|off, /system TEXT, /read FILE, /clear, /retry,
    /save FILE [--force], /load FILE|ID, /stats, /model, /exit.

    Multi-line: a line starting with \"\"\" opens a block; a line ending with
    \"\"\" closes and sends it. Inputs are remembered across sessions
    (chat_history under $CASCADE_LOCAL_HOME).

    With --tools python the model may run Python code in a local kernel that
    lives as long as the conversation (/clear and /tools off end it); each
    call's code and output are shown, and you confirm each call (y/N; from a
    pipe, the next input line answers) unless --yes.

    Ctrl-C stops an answer and keeps what was said. At the prompt Ctrl-C
    clears the typed line; on an empty line it warns, and a second Ctrl-C
    within 2 s leaves. Ctrl-D and /exit leave at once (exit code 0).

    Every chat is kept in the history as it goes (cascade-local logs), unless
    --no-log. --continue goes on with the last chat, --resume ID with any
    logged one (/load ID too).

    /read FILE puts a text file before the next message, as run -f does. A
    long one leaves its state on disk (--cache-size), so asking about it again,
    in a later chat or with run -f, does not read it again.

    Not on a terminal, the answer is written as plain text (stdout) and lines
    are read from stdin as they come, so the chat can be scripted.

    Example: cascade-local chat ./cascade2-q4.gguf "Hello!" --no-think
    """
    from cascade_local.cli.chat import ChatSession, history_file, plain_reader, run_chat, terminal_reader
    from cascade_local.cli.chat.input import first_then
    from cascade_local.cli.chat.record import open_recorder
    from cascade_local.cli.console import out_console
    from cascade_local.conversation import Conversation, TurnSettings
    from cascade_local.oneshot import sampling_for
    from cascade_local.paths import home
    from cascade_local.placement import parse_size
    from cascade_local.prompt_store import open_store
    from cascade_local.registry import load_registry
    from cascade_local.remote_conversation import RemoteConversation
    from cascade_local.runtime import PlacementOptions, open_engine, parse_ctx
    from cascade_local.sampling import SamplingParams

    plan = None
    remote = None
    cache_budget = parse_size(cache_size)  # a bad size is refused before the model loads
    conversation: Conversation | RemoteConversation
    if (continue_ or resume is not None) and no_log:
        from cascade_local.errors import UsageError

        raise UsageError("--continue and --resume read the history: leave out --no-log")
    if tools is not None:
        from cascade_local.errors import UsageError
        from cascade_local.tools import make_tools

        if endpoint:
            raise UsageError("--tools needs the local engine and the chat template: leave out --endpoint")
        make_tools(tools)  # an unknown name, or the tools extra missing, fails before the model loads
    with contextlib.ExitStack() as owned:  # what the chat opens, closed when it ends, however it ends
        if endpoint:
            from cascade_local.endpoints import resolve_endpoint
            from cascade_local.remote_conversation import RemoteConversation

            target = resolve_endpoint(endpoint)
            remote = owned.enter_context(target.engine())  # its HTTP connections
            if model:
                remote.model = model
            conversation = RemoteConversation(remote, system, target.url)
        else:
            placement = PlacementOptions(gpu_mem, cpu_moe, n_cpu_moe, tuple(override_tensor), (rpc,) if rpc else ())
            with err_console.status("loading"):
                engine, plan = open_engine(model, ctx=parse_ctx(ctx), threads=threads, placement=placement,
                                           kv_type=kv_type)
            owned.enter_context(engine)  # context, then model: never left to the order of __del__ at exit
            conversation = Conversation(engine, system, disk=open_store(engine.model.path, kv_type, cache_budget),
                                        disk_min_tokens=cache_min_tokens)
        entry = load_registry().get(None)  # the recommended sampling of the model family

        def sampling(thinking: bool) -> SamplingParams:
            return sampling_for(thinking, defaults=entry.sampling_defaults(thinking), temperature=temperature,
                                top_p=top_p, top_k=top_k, min_p=min_p, repeat_penalty=repeat_penalty, seed=seed,
                                ignore_eos=ignore_eos or None)

        model_name = str(conversation.model.path) if plan is not None else (model or endpoint)
        recorder = None if no_log else open_recorder(err_console, model_name)
        session = ChatSession(conversation, TurnSettings(think, budget, max_tokens, sampling(think)),  # type: ignore[arg-type]
                              sampling, show_thinking=show_thinking is not False, plan=plan, out=out_console,
                              err=err_console, yes=yes, recorder=recorder)
        resumed = session.resume(resume) if continue_ or resume is not None else None
        if tools is not None:
            session.enable_tools(tools)
        err_console.print(session.banner(), highlight=False)
        where = f"placement: {plan.verdict}" if plan is not None else f"served by {endpoint}"
        err_console.print(where, style="dim", highlight=False, markup=False)
        if resumed is not None:
            err_console.print(resumed.message, highlight=False, markup=False)
        read = terminal_reader(history_file(home())) if sys.stdin.isatty() else plain_reader()
        return run_chat(session, first_then(message, read, err_console) if message is not None else read)
