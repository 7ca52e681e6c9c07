"""The terminal chat: slash commands, multi-line input, and the live rendering of reasoning and answer.

One job per module: `commands` (slash commands parsed into typed values, /help, completion), `input` (a line or a
\"\"\" block, from prompt_toolkit on a terminal or from a pipe), `markdown` (the answer rendered while it streams),
`thinking` (the collapsing reasoning block), `view` (one turn on screen), `tools` (confirming tool calls),
`stats` (statistics), `session` (the chat's state, commands and turns) and `loop` (the read-answer loop).

On a terminal the answer is rendered as Markdown while it arrives and the reasoning streams in a dim block that
collapses to one line when the answer starts. When stdout (or stderr) is not a terminal the same stream is written
as plain text, byte for byte what the model said, so scripts keep working.
"""

from cascade_local.cli.chat.commands import (
    ALIASES,
    BLOCK,
    COMMANDS,
    TOGGLES,
    Command,
    SlashError,
    help_text,
    parse_slash,
    slash_completer,
)
from cascade_local.cli.chat.input import (
    CONTINUATION,
    PROMPT,
    block_is_open,
    history_file,
    interpret,
    plain_reader,
    read_message,
    terminal_reader,
)
from cascade_local.cli.chat.loop import Reader, run_chat
from cascade_local.cli.chat.markdown import MarkdownAnswer, MarkdownBlocks, MarkdownStream, is_live, terminal_safe
from cascade_local.cli.chat.session import ChatSession, Outcome
from cascade_local.cli.chat.stats import Totals, model_text, process_rss, stats_text, turn_stats
from cascade_local.cli.chat.thinking import ThinkingBlock, thought_summary
from cascade_local.cli.chat.tools import answer_result, ask_to_run, exchange_messages
from cascade_local.cli.chat.view import TurnView

__all__ = [
    "ALIASES", "BLOCK", "COMMANDS", "CONTINUATION", "PROMPT", "TOGGLES", "ChatSession", "Command", "MarkdownAnswer",
    "MarkdownBlocks", "MarkdownStream", "Outcome", "Reader", "SlashError", "ThinkingBlock", "Totals", "TurnView",
    "answer_result", "ask_to_run", "block_is_open", "exchange_messages", "help_text", "history_file", "interpret",
    "is_live",
    "model_text", "parse_slash", "plain_reader", "process_rss", "read_message", "run_chat", "slash_completer",
    "stats_text", "terminal_reader", "terminal_safe", "thought_summary", "turn_stats",
]
