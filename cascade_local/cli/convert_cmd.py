"""`cascade-local convert`: a Hugging Face checkpoint folder to one GGUF file."""

from __future__ import annotations

from pathlib import Path

import typer

from cascade_local.cli.console import err_console, out_console


def convert(
    src: Path = typer.Argument(..., help="Checkpoint folder (config.json, *.safetensors, tokenizer.json)."),
    out: Path = typer.Option(..., "--output", "-o", help="GGUF file to write."),
    recipe: str | None = typer.Option(None, "--recipe", "-r", help="Quantization recipe from models.toml: "
                                      "q4-moe (default), q5-moe, q8, small, or one of your own."),
    type_: str | None = typer.Option(None, "--type", "-t", help="One type for every weight matrix instead of a "
                                     "recipe: f32, f16, bf16, q8_0, q5_1, q5_0, q4_1, q4_0, iq4_nl, mxfp4."),
    imatrix: Path | None = typer.Option(None, "--imatrix", help="Importance matrix from llama-imatrix (GGUF or .dat)."),
    force: bool = typer.Option(False, "--force", help="Overwrite the --output file if it exists."),
    name: str | None = typer.Option(None, "--name", help="Model name stored in the file (default: folder name)."),
    threads: int | None = typer.Option(None, "--threads", min=1, help="Quantization threads (default: the CPUs "
                                       "this process may use)."),
) -> None:
    """Convert a Nemotron-H MoE checkpoint to GGUF in one streaming pass, quantizing as it goes.

    Norms, router, Mamba conv and SSM parameters always stay F32. Progress goes to stderr,
    the output path to stdout.

    Example: cascade-local convert ./Nemotron-Cascade-2-30B-A3B -o cascade2-q4.gguf --recipe q4-moe
    """
    from cascade_local.cli.progress_view import ConversionProgressBar, conversion_summary
    from cascade_local.convert import convert as run_convert
    from cascade_local.convert import load_imatrix, uniform_recipe
    from cascade_local.errors import UsageError
    from cascade_local.registry import load_registry

    if recipe and type_:
        raise UsageError("give --recipe or --type, not both")
    chosen = uniform_recipe(type_) if type_ else load_registry().recipe(recipe)
    importance = load_imatrix(imatrix) if imatrix else None
    with ConversionProgressBar(err_console) as bar:
        result = run_convert(src, out, chosen, imatrix=importance, force=force, name=name, threads=threads,
                             progress=bar)
    err_console.print(conversion_summary(result))
    out_console.print(str(result.path), highlight=False, soft_wrap=True)
