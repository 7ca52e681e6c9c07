"""`cascade-local eval`: how far a GGUF is from a reference, as llama-perplexity --kl-divergence measures it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

from cascade_local.cli.console import err_console, out_console


def _progress(what: str, done: int, total: int) -> None:
    err_console.print(f"{what}: chunk {done}/{total}", highlight=False)


def eval_(
    model: str = typer.Argument(..., help="The GGUF to measure (a file or a registry name)."),
    reference: Path = typer.Option(..., "--reference", help="The reference: a GGUF of the same vocabulary "
                                   "(e.g. the BF16 conversion), or a logits file saved with --save-logits."),
    text: Path | None = typer.Option(None, "--text", help="Text to evaluate on (default: the multi-domain text "
                                     "shipped with cascade-local)."),
    tokens: int | None = typer.Option(None, "--tokens", min=1, help="Evaluate at most this many tokens of the "
                                      "text (whole chunks of --ctx)."),
    ctx: int = typer.Option(512, "--ctx", min=16, help="Chunk length; the second half of each chunk is scored."),
    save_logits: Path | None = typer.Option(None, "--save-logits", help="Save the reference's log-probabilities "
                                            "here, to pass as --reference next time (one reference run for "
                                            "many candidates)."),
    threads: int | None = typer.Option(None, "--threads", min=1, help="CPU threads (default: all usable)."),
    json_: bool = typer.Option(False, "--json", help="Print one JSON object instead of the table."),
) -> None:
    """Compare a GGUF with a reference on the same text: mean, median, 99th-percentile and largest KL divergence,
    top-1 agreement, and the perplexity of both. Progress goes to stderr.

    Example: cascade-local eval model-q4.gguf --reference model-bf16.gguf --save-logits ref.npz
    """
    from rich import box
    from rich.table import Table

    from cascade_local.errors import UsageError
    from cascade_local.quality import ReferenceLogits, compare, default_text, is_logits_file, reference_logits
    from cascade_local.resolve import resolve_model

    path = resolve_model(model)
    if not reference.exists():
        raise UsageError(f"reference {reference} does not exist")
    if is_logits_file(reference):
        if text is not None or tokens is not None:
            raise UsageError("--text and --tokens were fixed when the reference logits were saved; "
                             "give the reference GGUF to use other ones")
        ref = ReferenceLogits.load(reference)
    else:
        body = default_text() if text is None else _read(text)
        ref = reference_logits(reference, body, n_ctx=ctx, max_tokens=tokens, threads=threads, progress=_progress)
    if save_logits is not None:
        ref.save(save_logits)
        err_console.print(f"reference logits saved to {save_logits}", highlight=False)
    result = compare(path, ref, threads=threads, progress=_progress)
    if json_:
        sys.stdout.write(json.dumps(result.to_dict(), indent=2) + "\n")
        return
    table = Table(box=box.SIMPLE, show_header=False, pad_edge=False)
    table.add_column(style="bold")
    table.add_column(justify="right")
    table.add_row("model", result.model)
    table.add_row("reference", result.reference)
    table.add_row("scored tokens", f"{result.tokens_scored} ({result.chunks} chunks of {result.n_ctx})")
    table.add_row("mean KL divergence", f"{result.kl_mean:.6f}")
    table.add_row("median KL divergence", f"{result.kl_median:.6f}")
    table.add_row("99th percentile KL", f"{result.kl_p99:.6f}")
    table.add_row("largest KL", f"{result.kl_max:.6f}")
    table.add_row("same top token", f"{100 * result.top1:.2f}%")
    table.add_row("perplexity, model", f"{result.ppl_model:.4f}")
    table.add_row("perplexity, reference", f"{result.ppl_reference:.4f}")
    out_console.print(table)


def _read(path: Path) -> str:
    from cascade_local.errors import UsageError

    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"text file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read {path} as UTF-8 text: {exc}") from None
