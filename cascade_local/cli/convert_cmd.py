"""`cascade-local convert`: a Hugging Face checkpoint folder to one GGUF file."""

from __future__ import annotations

from pathlib import Path

import typer

from cascade_local.cli.console import err_console, out_console
from cascade_local.cli.progress_view import ConversionProgressBar, conversion_summary


def convert(
    src: Path = typer.Argument(..., help="Checkpoint folder (config.json, *.safetensors, tokenizer.json)."),
    out: Path = typer.Option(..., "--output", "-o", help="GGUF file to write."),
    type_: str = typer.Option("bf16", "--type", "-t", help="Weight matrix type: f32, f16, bf16, q8_0."),
    force: bool = typer.Option(False, "--force", "-f", help="Overwrite OUT if it exists."),
    name: str | None = typer.Option(None, "--name", help="Model name stored in the file (default: folder name)."),
    threads: int | None = typer.Option(None, "--threads", min=1, help="Quantization threads (default: all cores)."),
) -> None:
    """Convert a Nemotron-H MoE checkpoint to GGUF in one streaming pass.

    Norms, router, Mamba conv and SSM parameters always stay F32. Progress goes to stderr,
    the output path to stdout.

    Example: cascade-local convert ./Nemotron-Cascade-2-30B-A3B -o cascade2-q8_0.gguf --type q8_0
    """
    from cascade_local.convert import convert as run_convert
    from cascade_local.convert import uniform_policy

    policy = uniform_policy(type_)
    with ConversionProgressBar(err_console) as bar:
        result = run_convert(src, out, policy, force=force, name=name, threads=threads, progress=bar)
    err_console.print(conversion_summary(result))
    out_console.print(str(result.path), highlight=False, soft_wrap=True)
