"""`cascade-local pull`, `list` and `rm`: the models in the user's models folder."""

from __future__ import annotations

import json
import sys

import typer

from cascade_local.cli.console import err_console, out_console


def pull(
    model: str = typer.Argument(..., help="A registry name (models.toml) or a local checkpoint folder."),
    recipe: str | None = typer.Option(None, "--recipe", "-r", help="Quantization recipe (default: the model's)."),
    gguf: bool = typer.Option(False, "--gguf", help="Download a prebuilt GGUF instead of converting safetensors."),
    force: bool = typer.Option(False, "--force", help="Fetch and convert again even if present."),
) -> None:
    """Download a model from the Hugging Face Hub (resumable) and convert it once, or import a checkpoint folder.

    The result lives in $CASCADE_LOCAL_HOME/models/NAME/; its path is printed on stdout.

    Example: cascade-local pull nemotron-cascade-2 --recipe q4-moe
    """
    from cascade_local.cli.progress_view import ConversionProgressBar, human_bytes
    from cascade_local.models import pull as pull_model

    with ConversionProgressBar(err_console) as bar:
        local = pull_model(model, recipe=recipe, gguf=gguf, force=force, progress=bar)
    err_console.print(f"{local.name} ({local.variant}): {human_bytes(local.size)}", highlight=False)
    out_console.print(str(local.path), highlight=False, soft_wrap=True)


def list_(json_: bool = typer.Option(False, "--json", help="Print a JSON array.")) -> None:
    """List the local models: name, variant (recipe), size, age and path.

    Example: cascade-local list --json
    """
    from rich.table import Table

    from cascade_local.cli.progress_view import human_bytes
    from cascade_local.models import age, list_local

    models = list_local()
    if json_:
        rows = [{"name": m.name, "variant": m.variant, "size": m.size, "path": str(m.path)} for m in models]
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
        return
    if not models:
        err_console.print("no local models yet: cascade-local pull nemotron-cascade-2", highlight=False)
        return
    table = Table(box=None, pad_edge=False)
    for column in ("name", "variant", "size", "modified", "path"):
        table.add_column(column)
    for m in models:
        table.add_row(m.name, m.variant, human_bytes(m.size), age(m.modified), str(m.path))
    out_console.print(table)


def rm(
    model: str = typer.Argument(..., help="A local model's name (see `cascade-local list`)."),
    variant: str | None = typer.Option(None, "--variant", help="Remove only this recipe's file."),
) -> None:
    """Delete a local model (all its variants unless --variant).

    Example: cascade-local rm nemotron-cascade-2 --variant q8
    """
    from cascade_local.models import remove

    for path in remove(model, variant):
        err_console.print(f"removed {path}", highlight=False)
