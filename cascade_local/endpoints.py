"""Named OpenAI-compatible servers: the `[endpoints]` table of models.toml and the user's own file.

    [endpoints.vllm-box]
    url = "http://gpu-box:8000/v1"
    model = "nvidia/Nemotron-Cascade-2-30B-A3B"   # the served name; optional for one-model servers
    api_key_env = "VLLM_API_KEY"                  # the *name* of the variable holding the key

The user's file ($CASCADE_LOCAL_HOME/models.toml) adds endpoints or replaces shipped ones by name.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cascade_local.errors import CascadeError, UsageError
from cascade_local.paths import home

if TYPE_CHECKING:
    from cascade_local.remote import RemoteEngine


@dataclass(frozen=True)
class Endpoint:
    name: str
    url: str
    model: str | None = None
    api_key_env: str | None = None
    description: str = ""

    @classmethod
    def from_dict(cls, name: str, raw: Any, origin: str = "models.toml") -> Endpoint:
        if not isinstance(raw, dict) or not isinstance(raw.get("url"), str) or not raw["url"].strip():
            raise CascadeError(f"{origin}: endpoint {name!r} needs a url string, e.g. url = \"http://host:8000/v1\"")
        for key in ("model", "api_key_env", "description"):
            if key in raw and not isinstance(raw[key], str):
                raise CascadeError(f"{origin}: endpoint {name!r}: {key} must be a string")
        if "api_key" in raw:
            raise CascadeError(f"{origin}: endpoint {name!r}: do not write the key in the file; put it in an "
                               "environment variable and name that variable in api_key_env")
        return cls(name=name, url=raw["url"].strip(), model=raw.get("model") or None,
                   api_key_env=raw.get("api_key_env") or None, description=raw.get("description", ""))

    def engine(self, **kwargs: Any) -> RemoteEngine:
        """A RemoteEngine for this endpoint (the key read from `api_key_env` now)."""
        from cascade_local.remote import RemoteEngine

        return RemoteEngine(self.url, model=self.model, api_key_env=self.api_key_env, **kwargs)


def _parse(text: str, origin: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise CascadeError(f"{origin} is not valid TOML: {exc}") from None


def load_endpoints(user_file: Path | None = None) -> dict[str, Endpoint]:
    """Every named endpoint: the shipped ones, then the user's file's (which win by name)."""
    layers = [(_parse(resources.files("cascade_local").joinpath("models.toml").read_text(encoding="utf-8"),
                      "models.toml"), "models.toml")]
    user_file = user_file or home() / "models.toml"
    if user_file.is_file():
        layers.append((_parse(user_file.read_text(encoding="utf-8"), str(user_file)), str(user_file)))
    endpoints: dict[str, Endpoint] = {}
    for layer, origin in layers:
        table = layer.get("endpoints") or {}
        if not isinstance(table, dict):
            raise CascadeError(f"{origin}: [endpoints] must be a table of [endpoints.NAME] tables")
        for name, raw in table.items():
            endpoints[name] = Endpoint.from_dict(name, raw, origin)
    return endpoints


def resolve_endpoint(spec: str, user_file: Path | None = None) -> Endpoint:
    """A URL (http://..., https://...) as is, or the name of an `[endpoints.NAME]` table."""
    if spec.startswith(("http://", "https://")):
        return Endpoint(name=spec, url=spec)
    endpoints = load_endpoints(user_file)
    try:
        return endpoints[spec]
    except KeyError:
        known = ", ".join(sorted(endpoints)) or "none defined"
        raise UsageError(f"unknown endpoint {spec!r}: give a URL (http://host:8000/v1) or a name from "
                         f"[endpoints] in models.toml (known: {known})") from None
