"""`cascade-local info`: what a GGUF file holds. The tables (or the JSON object) are the payload, on stdout."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from cascade_local.cli.console import out_console

if TYPE_CHECKING:
    from rich.table import Table
    from rich.text import Text

    from cascade_local.model_summary import ModelSummary



def info(
    path: Path = typer.Argument(..., help="A .gguf file (ours or any other tool's), or a local model's name."),
    json_: bool = typer.Option(False, "--json", help="Print one JSON object instead of tables."),
    tensors: bool = typer.Option(False, "--tensors", help="Also list every tensor."),
) -> None:
    """Show a GGUF file's architecture, parameters, bits per weight per tensor class, types and metadata.

    Long metadata (the vocabulary, the chat template, the embedded tokenizer.json) is shown as a count.
    A missing, damaged or hostile file is refused with one line on stderr and exit code 2.

    Example: cascade-local info model.gguf --json
    """
    from cascade_local.gguf_info import read_gguf
    from cascade_local.model_summary import summarize
    from cascade_local.models import find_local

    if not path.exists() and (local := find_local(str(path))) is not None:
        path = local.path
    summary = summarize(read_gguf(path))
    if json_:
        sys.stdout.write(json.dumps(summary.to_dict(tensors=tensors), indent=2) + "\n")
        return
    out_console.print(_overview(summary))
    out_console.print(_classes(summary))
    if tensors:
        out_console.print(_tensors(summary))
    out_console.print(_metadata(summary))


def _cell(value: Any, limit: int = 120) -> Text:
    """File-supplied text, shown literally: no rich markup, no terminal control characters."""
    from rich.text import Text

    from cascade_local.gguf_info import printable

    text = value if isinstance(value, str) else json.dumps(_short_floats(value), ensure_ascii=False)
    return Text(printable(text, limit))


def _short_floats(value: Any) -> Any:
    """Show float32 metadata as written (1e-05), not as the double it widens to (9.999999747378752e-06)."""
    import numpy as np

    if isinstance(value, list):
        return [_short_floats(v) for v in value]
    if isinstance(value, float) and float(np.float32(value)) == value:
        return json.loads(str(np.float32(value))) if np.isfinite(value) else value
    return value


def _count(n: int) -> str:
    for unit, scale in (("T", 10**12), ("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return str(n)


def _types(types: dict[str, int]) -> str:
    return ", ".join(f"{name} ×{n}" for name, n in types.items())


def _overview(summary: ModelSummary) -> Table:
    from rich.table import Table

    from cascade_local.gguf_info import human_bytes

    g, tok = summary.gguf, summary.tokenizer
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold")
    table.add_column()
    tokenizer = [f"{tok.model or '?'} (pre: {tok.pre or '?'})", f"{tok.n_tokens} tokens"]
    if tok.chat_template_chars is not None:
        tokenizer.append(f"chat template ({tok.chat_template_chars} chars)")
    if tok.hf_json_chars is not None:
        tokenizer.append(f"embedded tokenizer.json ({tok.hf_json_chars} chars)")
    rows = [
        ("file", str(g.path)),
        ("architecture", g.architecture or "?"),
        ("name", g.metadata.get("general.name") or "?"),
        ("parameters", f"{_count(summary.params)} ({summary.params:,})"),
        ("size", f"{human_bytes(g.file_size)} (tensor data {human_bytes(summary.tensor_bytes)})"),
        ("bits per weight", f"{summary.bpw:.2f}"),
        ("types", _types(dict(summary.types.most_common()))),
        ("GGUF", f"version {g.version}, {len(g.tensors)} tensors, {len(g.metadata)} metadata keys, "
                 f"alignment {g.alignment}"),
        ("tokenizer", ", ".join(tokenizer)),
    ]
    for key, value in rows:
        table.add_row(key, _cell(value, 200))
    return table


def _classes(summary: ModelSummary) -> Table:
    from rich import box
    from rich.table import Table

    from cascade_local.gguf_info import human_bytes

    table = Table(title="tensor classes", box=box.SIMPLE, title_justify="left")
    for name, justify in (("class", "left"), ("tensors", "right"), ("params", "right"), ("size", "right"),
                          ("bits/weight", "right"), ("types", "left")):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for c in summary.classes:
        table.add_row(c.name, str(c.tensors), _count(c.params), human_bytes(c.nbytes), f"{c.bpw:.2f}",
                      _types(dict(c.types.most_common())))
    return table


def _tensors(summary: ModelSummary) -> Table:
    from rich import box
    from rich.table import Table

    from cascade_local.gguf_info import human_bytes
    from cascade_local.model_summary import tensor_class

    table = Table(title="tensors (shape in ggml order, innermost first)", box=box.SIMPLE, title_justify="left",
                  padding=(0, 1), pad_edge=False, collapse_padding=True)
    longest = max((len(t.name) for t in summary.gguf.tensors), default=4)
    table.add_column("name", overflow="fold", min_width=min(longest, 48))
    for name, justify in (("class", "left"), ("type", "left"), ("shape", "left"), ("params", "right"),
                          ("size", "right")):
        table.add_column(name, justify=justify, no_wrap=True)  # type: ignore[arg-type]
    for t in summary.gguf.tensors:
        table.add_row(_cell(t.name), tensor_class(t.name), t.qtype.name, "×".join(map(str, t.shape)),
                      _count(t.n_elements), human_bytes(t.nbytes))
    return table


def _metadata(summary: ModelSummary) -> Table:
    from rich import box
    from rich.table import Table

    table = Table(title="metadata", box=box.SIMPLE, title_justify="left")
    table.add_column("key", overflow="fold")
    table.add_column("value", overflow="fold")
    for key, value in summary.shown_metadata().items():
        table.add_row(_cell(key), _cell(value))
    return table
