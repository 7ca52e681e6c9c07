"""Turns what the user typed (a registry name, a .gguf path, a checkpoint folder) into a local GGUF file."""

from __future__ import annotations

from pathlib import Path

from cascade_local.convert.recipes import Recipe
from cascade_local.errors import ModelNotFoundError, UsageError
from cascade_local.paths import models_dir
from cascade_local.registry import ModelEntry, load_registry

LOCAL_HINT = (
    "To use a local file instead: cascade-local chat /path/to/model.gguf "
    "(make one from a downloaded checkpoint with: cascade-local convert CHECKPOINT_DIR -o model.gguf --recipe q4-moe)"
)


def local_path(entry: ModelEntry, recipe: str) -> Path:
    return models_dir() / entry.name / f"{entry.name}-{recipe}.gguf"


def resolve_model(spec: str | None) -> Path:
    if spec:
        path = Path(spec).expanduser()
        if path.is_file():
            return path
        if path.is_dir():
            if (path / "config.json").exists():
                raise UsageError(f"{path} is a checkpoint folder; convert it first: "
                                 f"cascade-local convert {path} -o model.gguf")
            raise UsageError(f"{path} is a folder, not a model file")
        if path.suffix == ".gguf" or "/" in spec:
            raise ModelNotFoundError(f"model file {path} does not exist")
    registry = load_registry()
    entry = registry.get(spec)
    recipe = registry.recipe(entry.recipe or None)
    path = local_path(entry, recipe.name)
    if path.is_file():
        return path
    return fetch(entry, recipe, path)


def fetch(entry: ModelEntry, recipe: Recipe, target: Path) -> Path:
    """Download the checkpoint from the Hugging Face Hub and convert it to `target` with `recipe`."""
    from cascade_local.convert import convert
    from cascade_local.hub import download_checkpoint

    checkpoint = download_checkpoint(entry.hf_repo, hint=LOCAL_HINT)
    target.parent.mkdir(parents=True, exist_ok=True)
    convert(checkpoint, target, recipe, name=entry.name)
    return target

