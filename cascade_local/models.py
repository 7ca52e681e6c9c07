"""Local models: what is in the user's models folder, fetching (pull) and removing them.

Layout: `$CASCADE_LOCAL_HOME/models/<name>/<name>-<recipe>.gguf`. A model comes from the registry
(Hugging Face safetensors converted here with a recipe, or a prebuilt GGUF with `--gguf`) or from a
local checkpoint folder (converted the same way and named after the folder).
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cascade_local.convert import ConversionProgress, convert
from cascade_local.errors import ModelNotFoundError, UsageError
from cascade_local.output_lock import output_lock, temp_dir
from cascade_local.paths import models_dir
from cascade_local.registry import ModelEntry, load_registry

LOCAL_HINT = (
    # Said to chat, run, batch, serve and pull users alike: it names no command.
    "To use a local file instead, give its path in place of the model name (/path/to/model.gguf; "
    "make one from a downloaded checkpoint with: cascade-local convert CHECKPOINT_DIR -o model.gguf --recipe q4-moe)"
)


@dataclass(frozen=True)
class LocalModel:
    name: str
    path: Path
    variant: str  # the recipe it was converted with, or "gguf" for a downloaded file
    size: int
    modified: float


def list_local() -> list[LocalModel]:
    root = models_dir()
    found: list[LocalModel] = []
    if not root.is_dir():
        return found
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        for file in sorted(folder.glob("*.gguf")):
            variant = file.stem.removeprefix(f"{folder.name}-")
            stat = file.stat()
            found.append(LocalModel(folder.name, file, variant, stat.st_size, stat.st_mtime))
    return found


def find_local(name: str, variant: str | None = None) -> LocalModel | None:
    matches = [m for m in list_local() if m.name == name and (variant is None or m.variant == variant)]
    return max(matches, key=lambda m: m.modified) if matches else None


def target_path(name: str, variant: str) -> Path:
    return models_dir() / name / f"{name}-{variant}.gguf"


def pull(spec: str, *, recipe: str | None = None, gguf: bool = False, force: bool = False,
         progress: ConversionProgress | None = None) -> LocalModel:
    """Fetch (or import) a model into the models folder; returns it. Existing ones are kept unless `force`."""
    registry = load_registry()
    folder = Path(spec).expanduser()
    if folder.is_dir():
        if gguf:
            raise UsageError("--gguf downloads a prebuilt file; a local folder is converted instead")
        chosen = registry.recipe(recipe)
        return _install(folder.resolve().name, chosen.name, force,
                        lambda out: convert(folder, out, chosen, progress=progress, name=folder.resolve().name))
    entry = registry.get(spec)
    if gguf:
        return _install(entry.name, "gguf", force, lambda out: _download_gguf(entry, out))
    chosen = registry.recipe(recipe or entry.recipe or None)

    def fetch_and_convert(out: Path) -> None:
        from cascade_local.hub import download_checkpoint

        checkpoint = download_checkpoint(entry.hf_repo, hint=LOCAL_HINT)
        convert(checkpoint, out, chosen, progress=progress, name=entry.name)

    return _install(entry.name, chosen.name, force, fetch_and_convert)


def _install(name: str, variant: str, force: bool, make: Callable[[Path], object]) -> LocalModel:
    out = target_path(name, variant)
    out.parent.mkdir(parents=True, exist_ok=True)
    # One pull per model file at a time: a second (two first-run chats) waits, then finds the model there.
    with output_lock(out, f"pull of {name} ({variant})"):
        if force or not out.exists():
            _build(out, make)
        stat = out.stat()
    return LocalModel(name, out, variant, stat.st_size, stat.st_mtime)


def _build(out: Path, make: Callable[[Path], object]) -> None:
    # Build in a folder of this job's own beside the target, then swap: a failed pull never leaves the user
    # without their model, nor a half-made file under the model's name.
    folder = temp_dir(out)
    try:
        fresh = folder / out.name
        make(fresh)
        os.replace(fresh, out)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _download_gguf(entry: ModelEntry, out: Path) -> None:
    if not entry.gguf:
        raise ModelNotFoundError(f"no prebuilt GGUF is known for {entry.name}; "
                                 f"`cascade-local pull {entry.name}` converts it from safetensors instead")
    from cascade_local.hub import download_file

    repo, filename = entry.gguf[0]["repo"], entry.gguf[0]["file"]
    cached = download_file(repo, filename, hint=LOCAL_HINT)
    # Copy, not link: the Hub cache may be cleaned independently of the models folder. `out` is a
    # temporary name already (see _build), renamed only once the copy is complete.
    shutil.copyfile(cached, out)


def remove(name: str, variant: str | None = None) -> list[Path]:
    """Deletes a local model (one variant, or all of them); returns the files removed."""
    doomed = [m.path for m in list_local() if m.name == name and (variant is None or m.variant == variant)]
    if not doomed:
        have = sorted({m.name for m in list_local()})
        raise ModelNotFoundError(f"no local model {name!r}" + (f" ({variant})" if variant else "")
                                 + (f"; local models: {', '.join(have)}" if have else "; the models folder is empty"))
    for path in doomed:
        path.unlink()
    folder = doomed[0].parent
    if folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()
    return doomed


def age(seconds_since_epoch: float) -> str:
    days = (time.time() - seconds_since_epoch) / 86400
    return "today" if days < 1 else f"{int(days)} days ago"
