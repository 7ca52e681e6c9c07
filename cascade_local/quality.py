"""How far a quantized GGUF is from a reference GGUF on the same text: KL divergence, top-1 agreement, perplexity.

Measured as llama.cpp's `llama-perplexity --kl-divergence` does: the text is cut into chunks of `n_ctx` tokens,
each evaluated from an empty state, and only the second half of each chunk is scored (every scored token has at
least n_ctx/2 tokens of context). The reference's log-probabilities at the scored positions can be saved once
and reused, so comparing many candidates costs one reference run.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from cascade_local.errors import CascadeError, UsageError
from cascade_local.gguf_meta import read_metadata

LOGITS_FORMAT = "cascade-local-reference-logits/1"
Progress = Callable[[str, int, int], None]  # (what, chunks done, chunks in all)


class EvalError(CascadeError):
    exit_code = 2


def default_text() -> str:
    """The text shipped for evaluation: written for this project (prose, code, maths, several languages)."""
    return resources.files("cascade_local").joinpath("data/eval_text.txt").read_text(encoding="utf-8")


def vocabulary_digest(metadata: dict[str, Any]) -> str:
    """A digest of the token list: two files compare only when their vocabularies are the same."""
    tokens = metadata.get("tokenizer.ggml.tokens") or []
    return hashlib.sha256("\x00".join(map(str, tokens)).encode("utf-8")).hexdigest()[:32]


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def chunks(tokens: list[int], n_ctx: int, max_tokens: int | None) -> list[list[int]]:
    usable = len(tokens) if max_tokens is None else min(len(tokens), max_tokens)
    n = usable // n_ctx
    if n == 0:
        raise UsageError(f"the text has {usable} tokens, less than one chunk of --ctx {n_ctx}: give a longer "
                         f"--text, a larger --tokens or a smaller --ctx")
    return [tokens[i * n_ctx:(i + 1) * n_ctx] for i in range(n)]


def scored(n_ctx: int) -> slice:
    """The positions whose next token is scored: the second half of the chunk, as llama-perplexity does."""
    return slice(n_ctx // 2, n_ctx - 1)


@dataclass
class ReferenceLogits:
    """The reference's log-probabilities at the scored positions, with what they were computed on."""

    source: str
    n_ctx: int
    vocab: str
    tokens: np.ndarray  # int32, every chunk's tokens, concatenated
    logprobs: np.ndarray  # float32 (scored positions, n_vocab)

    def save(self, path: Path) -> None:
        """Written under a temporary name in the target folder and renamed when complete."""
        path = Path(path)
        meta = json.dumps({"format": LOGITS_FORMAT, "source": self.source, "n_ctx": self.n_ctx, "vocab": self.vocab})
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
        try:
            with os.fdopen(fd, "wb") as fh:
                np.savez(fh, meta=np.array(meta), tokens=self.tokens, logprobs=self.logprobs)
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 is for the partial file, not the result
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: Path) -> ReferenceLogits:
        try:
            with np.load(path, allow_pickle=False) as data:
                meta = json.loads(str(data["meta"]))
                if meta.get("format") != LOGITS_FORMAT:
                    raise EvalError(f"{path} is not a reference-logits file saved by `cascade-local eval`")
                return cls(meta["source"], int(meta["n_ctx"]), meta["vocab"], data["tokens"], data["logprobs"])
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
            raise EvalError(f"cannot read reference logits from {path}: {exc}") from None


def is_logits_file(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            return fh.read(2) == b"PK"  # a .npz is a zip archive; a GGUF starts with "GGUF"
    except OSError:
        return False


def model_logprobs(path: Path, token_chunks: list[list[int]], *, threads: int | None,
                   progress: Progress | None, what: str) -> Iterator[np.ndarray]:
    """Log-probabilities at the scored positions of each chunk, from the GGUF at `path`."""
    from cascade_local.llama_model import LoadedModel
    from cascade_local.logits import sequence_logits

    n_ctx = len(token_chunks[0])
    model = LoadedModel(path)
    try:
        for i, logits in enumerate(sequence_logits(model, token_chunks, threads=threads)):
            if progress:
                progress(what, i + 1, len(token_chunks))
            # Stored as float32 for the reference, so both sides are rounded alike: a file against itself is 0.
            yield log_softmax(logits[scored(n_ctx)]).astype(np.float32)
    finally:
        model.close()


def tokenize_for(path: Path, text: str) -> list[int]:
    """The text in the model's own tokens (the embedded exact tokenizer where there is one), BOS as the model asks."""
    from cascade_local.tokenization import HF_JSON_KEY, HFTokenizer

    meta = read_metadata(path)
    source = meta.get(HF_JSON_KEY)
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False))
    if isinstance(source, str) and source:
        bos = meta.get("tokenizer.ggml.bos_token_id")
        return HFTokenizer(source, bos if isinstance(bos, int) else None).encode(text, add_bos=add_bos)
    from cascade_local.llama_model import LoadedModel

    model = LoadedModel(path)
    try:
        return model.tokenize(text, add_bos=add_bos)
    finally:
        model.close()


def reference_logits(path: Path, text: str, *, n_ctx: int = 512, max_tokens: int | None = None,
                     threads: int | None = None, progress: Progress | None = None) -> ReferenceLogits:
    token_chunks = chunks(tokenize_for(path, text), n_ctx, max_tokens)
    parts = list(model_logprobs(path, token_chunks, threads=threads, progress=progress, what="reference"))
    return ReferenceLogits(Path(path).name, n_ctx, vocabulary_digest(read_metadata(path)),
                           np.array([t for c in token_chunks for t in c], dtype=np.int32),
                           np.concatenate(parts).astype(np.float32))


@dataclass(frozen=True)
class Comparison:
    model: str
    reference: str
    n_ctx: int
    chunks: int
    tokens_scored: int
    kl_mean: float
    kl_median: float
    kl_p99: float
    kl_max: float
    top1: float  # share of positions where both pick the same most likely token
    ppl_model: float
    ppl_reference: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def compare(path: Path, reference: ReferenceLogits, *, threads: int | None = None,
            progress: Progress | None = None) -> Comparison:
    """KL(reference || model) and the rest at every scored position of the reference's chunks."""
    vocab = vocabulary_digest(read_metadata(path))
    if vocab != reference.vocab:
        raise EvalError(f"{Path(path).name} and the reference ({reference.source}) have different vocabularies: "
                        "KL divergence compares two models of the same tokenizer")
    n_ctx = reference.n_ctx
    flat = reference.tokens.tolist()
    token_chunks = [flat[i:i + n_ctx] for i in range(0, len(flat), n_ctx)]
    kls, agree, nll_model, nll_ref = [], [], [], []
    done = 0
    for chunk, lq in zip(token_chunks, model_logprobs(path, token_chunks, threads=threads, progress=progress,
                                                      what=Path(path).name), strict=True):
        lp = reference.logprobs[done:done + len(lq)].astype(np.float64)
        lq = lq.astype(np.float64)
        done += len(lq)
        nexts = np.array(chunk[scored(n_ctx).start + 1:n_ctx], dtype=np.int64)
        if lp.shape != lq.shape:
            raise EvalError(f"{Path(path).name} has {lq.shape[1]} logits per token, the reference {lp.shape[1]}")
        kls.append((np.exp(lp) * (lp - lq)).sum(-1))
        agree.append(lp.argmax(-1) == lq.argmax(-1))
        rows = np.arange(len(nexts))
        nll_model.append(-lq[rows, nexts])
        nll_ref.append(-lp[rows, nexts])
    kl = np.maximum(np.concatenate(kls), 0.0)  # rounding can make an exact match a hair below zero
    return Comparison(
        model=Path(path).name, reference=reference.source, n_ctx=n_ctx, chunks=len(token_chunks),
        tokens_scored=int(kl.size), kl_mean=float(kl.mean()), kl_median=float(np.median(kl)),
        kl_p99=float(np.percentile(kl, 99)), kl_max=float(kl.max()), top1=float(np.concatenate(agree).mean()),
        ppl_model=float(np.exp(np.concatenate(nll_model).mean())),
        ppl_reference=float(np.exp(np.concatenate(nll_ref).mean())),
    )


__all__ = ["Comparison", "EvalError", "ReferenceLogits", "compare", "default_text", "is_logits_file",
           "reference_logits", "vocabulary_digest"]
