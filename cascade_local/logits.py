"""The model's logits at every position of a token sequence: what fidelity checks and KL measurements compare.

It runs on a LoadedModel, so it loads the way the runtime does (the same placement and the same choice of
CPU buffer types), unlike llama-cpp-python's `Llama` class, which cannot be told to avoid a buffer type.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import numpy as np

from cascade_local.ggml import default_threads
from cascade_local.llama_model import LoadedModel


class LogitsError(RuntimeError):
    pass


def sequence_logits(model: LoadedModel, sequences: Iterable[Sequence[int]], *,
                    threads: int | None = None) -> Iterator[np.ndarray]:
    """For each token sequence, its logits (len x n_vocab, float32), each sequence evaluated from an empty state."""
    import llama_cpp

    seqs = [list(map(int, s)) for s in sequences]
    longest = max((len(s) for s in seqs), default=1)
    params = llama_cpp.llama_context_default_params()
    params.n_ctx = max(longest + 8, 64)
    params.n_batch = params.n_ubatch = max(longest, 1)
    params.n_threads = params.n_threads_batch = threads or default_threads()
    params.no_perf = True
    ctx = llama_cpp.llama_init_from_model(model.model, params)
    if not ctx:
        raise LogitsError(f"llama.cpp could not create a context of {params.n_ctx} tokens")
    batch = llama_cpp.llama_batch_init(params.n_batch, 0, 1)
    memory = llama_cpp.llama_get_memory(ctx)
    try:
        for ids in seqs:
            llama_cpp.llama_memory_clear(memory, True)
            for i, token in enumerate(ids):
                batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, i, 1
                batch.seq_id[i][0], batch.logits[i] = 0, True
            batch.n_tokens = len(ids)
            rc = llama_cpp.llama_decode(ctx, batch)
            if rc != 0:
                raise LogitsError(f"llama_decode failed ({rc}) on a sequence of {len(ids)} tokens")
            out = np.ctypeslib.as_array(llama_cpp.llama_get_logits(ctx), shape=(len(ids), model.n_vocab))
            yield out.copy()
    finally:
        llama_cpp.llama_batch_free(batch)
        llama_cpp.llama_free(ctx)
