"""The `cascade-local` command (placeholder until the commands land)."""

import typer

app = typer.Typer()


def main() -> None:
    app()
