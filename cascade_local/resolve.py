"""Turns what the user typed (a registry name, a local model name, a .gguf path) into a GGUF file."""

from __future__ import annotations

from pathlib import Path

from cascade_local.errors import ModelNotFoundError, UsageError
from cascade_local.models import find_local, list_local, pull
from cascade_local.registry import load_registry


def resolve_model(spec: str | None) -> Path:
    """A file path as given; else a model in the models folder; else a registry model, pulled on first use."""
    if spec:
        path = Path(spec).expanduser()
        if path.is_file():
            return path
        if path.is_dir():
            if (path / "config.json").exists():
                raise UsageError(f"{path} is a checkpoint folder; convert it once with: cascade-local pull {path}")
            raise UsageError(f"{path} is a folder, not a model file")
        if path.suffix == ".gguf" or "/" in spec:
            raise ModelNotFoundError(f"model file {path} does not exist")
    registry = load_registry()
    if spec and spec not in registry.models:
        local = find_local(spec)
        if local is not None:
            return local.path
        known = sorted(set(registry.models) | {m.name for m in list_local()})
        raise ModelNotFoundError(f"unknown model {spec!r}; known: {', '.join(known)}, or give a path to a .gguf file")
    entry = registry.get(spec)
    local = find_local(entry.name, registry.recipe(entry.recipe or None).name) or find_local(entry.name)
    if local is not None:
        return local.path
    return pull(entry.name).path

