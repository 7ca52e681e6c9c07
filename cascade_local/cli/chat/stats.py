"""Statistics: the line after each answer, session totals, /stats and /model."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:

    from cascade_local.engine import Result
    from cascade_local.placement import Plan


def turn_stats(r: Result, context: int | None = None) -> str:
    stopped = "stopped: " if r.finish_reason == "cancelled" else ""
    line = (f"{stopped}{r.completion_tokens} tokens ({r.reasoning_tokens} thinking), "
            f"{r.generation_tokens_per_second:.1f} tok/s, prompt {r.prompt_tokens} ({r.cached_tokens} reused)")
    if context:
        line += f", {context_fill(r, context)}"
    return line + (", cut at the token limit" if r.finish_reason == "length" else "")


def context_fill(r: Result, context: int) -> str:
    """How full the context was at the end of an answer: its prompt and what it generated."""
    used = r.prompt_tokens + r.completion_tokens
    return f"context {used * 100 // context}% full ({used}/{context})"



@dataclass
class Totals:
    """Counts over the answers of a session, those stopped with Ctrl-C included (and counted apart)."""

    answers: int = 0
    stopped: int = 0
    completion_tokens: int = 0
    reasoning_tokens: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    generation_seconds: float = 0.0

    def add(self, r: Result) -> None:
        self.answers += 1
        self.stopped += r.finish_reason == "cancelled"
        self.completion_tokens += r.completion_tokens
        self.reasoning_tokens += r.reasoning_tokens
        self.prompt_tokens += r.prompt_tokens
        self.cached_tokens += r.cached_tokens
        self.generation_seconds += r.generation_seconds


def process_rss() -> tuple[int, str] | None:
    """(bytes, what) for this process: the resident set on Linux, else the peak that getrusage reports."""
    try:
        with open("/proc/self/statm", encoding="ascii") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE"), "resident"
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak * (1 if sys.platform == "darwin" else 1024), "peak resident"


def stats_text(last: Result | None, totals: Totals, plan: Plan | None, context: int | None = None,
               left_out: int = 0) -> str:
    from cascade_local.placement import fmt_bytes

    rows = [f"last answer: {turn_stats(last)}" if last else "last answer: none finished yet"]
    if context:
        fill = context_fill(last, context) if last else f"context of {context} tokens"
        gone = (f"; the {left_out} oldest turn{'s' if left_out != 1 else ''} left out to fit (/clear starts afresh)"
                if left_out else "")
        rows.append(f"{fill}{gone}")
    rate = totals.completion_tokens / totals.generation_seconds if totals.generation_seconds else 0.0
    evaluated = totals.prompt_tokens - totals.cached_tokens
    stopped = f" ({totals.stopped} stopped)" if totals.stopped else ""
    rows.append(f"session: {totals.answers} answer{'' if totals.answers == 1 else 's'}{stopped}, "
                f"{totals.completion_tokens} tokens generated "
                f"({totals.reasoning_tokens} thinking) at {rate:.1f} tok/s, {evaluated} prompt tokens evaluated "
                f"({totals.cached_tokens} reused)")
    rss = process_rss()
    rows.append(f"memory: {fmt_bytes(rss[0])} {rss[1]} (this process)" if rss else "memory: unknown")
    if plan is not None:
        rows.append(f"placement: {plan.verdict}")
    return "\n".join(rows)


def _count(n: int) -> str:
    for unit, scale in (("T", 10**12), ("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return str(n)


def model_text(path: Path, metadata: dict[str, Any], n_ctx: int | None = None) -> str:
    from cascade_local.gguf_info import human_bytes, printable, read_gguf

    params = sum(t.n_elements for t in read_gguf(path).tensors)
    recipe = metadata.get("cascade_local.recipe")
    recipe = printable(recipe) if isinstance(recipe, str) else "not recorded (not converted by cascade-local)"

    def shown(key: str) -> str:
        value = metadata.get(key)
        return printable(value) if isinstance(value, str) else "unknown"

    rows = [f"file: {path} ({human_bytes(path.stat().st_size)})",
            f"name: {shown('general.name')}",
            f"architecture: {shown('general.architecture')}",
            f"parameters: {_count(params)}",
            f"recipe: {recipe}"]
    if n_ctx:
        rows.append(f"context: {n_ctx} tokens")
    return "\n".join(rows)
