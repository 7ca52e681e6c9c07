"""Sampling settings and the llama.cpp sampler chain that implements them."""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Any

from cascade_local.errors import UsageError


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 means greedy. The model card recommends 1.0 / top-p 0.95 with thinking."""

    temperature: float = 1.0
    top_p: float = 0.95
    top_k: int = 0  # 0: off
    min_p: float = 0.0
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    seed: int | None = None
    ignore_eos: bool = False  # never choose an end-of-generation token (benchmarks, stress tests)

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise UsageError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise UsageError("top-p must be in (0, 1]")
        if not 0 <= self.min_p < 1:
            raise UsageError("min-p must be in [0, 1)")
        if self.top_k < 0:
            raise UsageError("top-k must be >= 0")
        if self.repeat_penalty <= 0:
            raise UsageError("repeat penalty must be > 0")


class SamplerChain:
    """An owned llama.cpp sampler chain; `sample(ctx, i)` picks (and accepts) the token for output row i."""

    def __init__(self, params: SamplingParams, eog_tokens: tuple[int, ...] = (), n_vocab: int = 0):
        import llama_cpp

        self._lib = llama_cpp
        chain_params = llama_cpp.llama_sampler_chain_default_params()
        chain_params.no_perf = True
        self._chain = llama_cpp.llama_sampler_chain_init(chain_params)
        add = lambda s: llama_cpp.llama_sampler_chain_add(self._chain, s)  # noqa: E731
        if params.ignore_eos and eog_tokens:
            biases = (llama_cpp.llama_logit_bias * len(eog_tokens))(
                *[llama_cpp.llama_logit_bias(t, float("-inf")) for t in eog_tokens])
            add(llama_cpp.llama_sampler_init_logit_bias(n_vocab, len(eog_tokens), biases))
        if params.repeat_penalty != 1.0:
            # This llama.cpp still takes n_vocab first (llama.h); without it the call raised a TypeError.
            add(llama_cpp.llama_sampler_init_penalties(n_vocab, params.repeat_last_n, params.repeat_penalty, 0.0, 0.0))
        if params.temperature == 0:
            add(llama_cpp.llama_sampler_init_greedy())
            return
        if params.top_k > 0:
            add(llama_cpp.llama_sampler_init_top_k(params.top_k))
        if params.top_p < 1.0:
            add(llama_cpp.llama_sampler_init_top_p(params.top_p, 1))
        if params.min_p > 0.0:
            add(llama_cpp.llama_sampler_init_min_p(params.min_p, 1))
        add(llama_cpp.llama_sampler_init_temp(params.temperature))
        seed = params.seed if params.seed is not None else 0xFFFFFFFF  # LLAMA_DEFAULT_SEED: random
        add(llama_cpp.llama_sampler_init_dist(ctypes.c_uint32(seed).value))

    def sample(self, ctx: Any, output_index: int) -> int:
        return int(self._lib.llama_sampler_sample(self._chain, ctx, output_index))

    def accept(self, token: int) -> None:
        """Tell the chain about a token it did not choose (injected text), so penalties see it."""
        self._lib.llama_sampler_accept(self._chain, token)

    def close(self) -> None:
        if self._chain is not None:
            self._lib.llama_sampler_free(self._chain)
            self._chain = None

    def __del__(self) -> None:
        self.close()
