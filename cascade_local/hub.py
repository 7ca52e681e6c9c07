"""Downloads from the Hugging Face Hub, with errors a person can act on."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from cascade_local.errors import ModelNotFoundError

CHECKPOINT_FILES = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model"]


def download_checkpoint(repo: str, *, hint: str) -> Path:
    """The repository's checkpoint files (resumable, shown with huggingface-hub's own progress bars)."""
    import huggingface_hub

    return _guarded(repo, hint, lambda: Path(huggingface_hub.snapshot_download(repo, allow_patterns=CHECKPOINT_FILES)))


def download_file(repo: str, filename: str, *, hint: str) -> Path:
    import huggingface_hub

    return _guarded(repo, hint, lambda: Path(huggingface_hub.hf_hub_download(repo, filename)))


def _guarded(repo: str, hint: str, fetch: Callable[[], Path]) -> Path:
    from huggingface_hub import errors as hub_errors

    try:
        return fetch()
    except hub_errors.RepositoryNotFoundError:
        raise ModelNotFoundError(f"the Hugging Face Hub has no repository {repo}. {hint}") from None
    except (hub_errors.OfflineModeIsEnabled, hub_errors.LocalEntryNotFoundError, OSError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelNotFoundError(
            f"cannot reach the Hugging Face Hub to download {repo} and it is not in the local cache "
            f"({reason[:160]}). {hint}"
        ) from None
    except Exception as exc:  # network stacks raise many types (httpx, ssl, socket); all mean "not reachable"
        raise ModelNotFoundError(
            f"cannot download {repo} from the Hugging Face Hub ({type(exc).__name__}: {str(exc)[:160]}). {hint}"
        ) from None
