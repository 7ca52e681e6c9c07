"""The model registry: the shipped models.toml, extended by the user's own."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from cascade_local.convert.recipes import Recipe, parse_recipe
from cascade_local.errors import CascadeError, ModelNotFoundError, UsageError
from cascade_local.paths import home


@dataclass(frozen=True)
class ModelEntry:
    name: str
    hf_repo: str
    description: str = ""
    recipe: str = ""
    gguf: list[dict[str, str]] = field(default_factory=list)  # prebuilt files: [{repo, file}]
    context_length: int = 0
    sampling: dict[str, dict[str, float]] = field(default_factory=dict)

    def sampling_defaults(self, thinking: bool) -> dict[str, float]:
        """The publisher's recommended sampling for the mode ([models.NAME.sampling] thinking / instruct)."""
        return dict(self.sampling.get("thinking" if thinking else "instruct", {}))

    @classmethod
    def from_dict(cls, name: str, raw: dict[str, Any]) -> ModelEntry:
        if not isinstance(raw.get("hf_repo"), str):
            raise CascadeError(f"models.toml: model {name!r} needs an hf_repo string")
        known = {k: raw[k] for k in ("hf_repo", "description", "recipe", "context_length", "sampling", "gguf")
                 if k in raw}
        return cls(name=name, **known)


@dataclass(frozen=True)
class Registry:
    default: str
    models: dict[str, ModelEntry]
    default_recipe: str = ""
    recipes: dict[str, Recipe] = field(default_factory=dict)

    def recipe(self, name: str | None) -> Recipe:
        key = name or self.default_recipe
        try:
            return self.recipes[key]
        except KeyError:
            raise UsageError(f"unknown recipe {key!r}; known: {', '.join(sorted(self.recipes))}") from None

    def get(self, name: str | None) -> ModelEntry:
        key = name or self.default
        try:
            return self.models[key]
        except KeyError:
            raise ModelNotFoundError(
                f"unknown model {key!r}; known: {', '.join(sorted(self.models))}, "
                "or give a path to a .gguf file"
            ) from None


def _parse(text: str, origin: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise CascadeError(f"{origin} is not valid TOML: {exc}") from None


def load_registry(user_file: Path | None = None) -> Registry:
    shipped = _parse(resources.files("cascade_local").joinpath("models.toml").read_text(), "models.toml")
    layers = [shipped]
    user_file = user_file or home() / "models.toml"
    if user_file.is_file():
        layers.append(_parse(user_file.read_text(encoding="utf-8"), str(user_file)))
    default, default_recipe = shipped.get("default", ""), shipped.get("default_recipe", "")
    models: dict[str, ModelEntry] = {}
    recipes: dict[str, Recipe] = {}
    for layer in layers:
        default = layer.get("default", default)
        default_recipe = layer.get("default_recipe", default_recipe)
        for name, raw in (layer.get("models") or {}).items():
            models[name] = ModelEntry.from_dict(name, raw)
        for name, raw in (layer.get("recipes") or {}).items():
            recipes[name] = parse_recipe(name, raw)
    return Registry(default, models, default_recipe, recipes)
