"""Options several commands share, declared once so their spelling and help never drift apart."""

from __future__ import annotations

import typer

THREADS = typer.Option(None, "--threads", min=1, help="CPU threads (default: the CPUs this process may use).")
GPU_MEM = typer.Option("auto", "--gpu-mem", help="GPU memory to use: auto, a size (8GiB), or 0; with several --rpc "
                       "servers one size each is allowed (4GiB,2GiB).")
CPU_MOE = typer.Option(False, "--cpu-moe", help="Keep all expert weights in RAM.")
N_CPU_MOE = typer.Option(None, "--n-cpu-moe", help="Keep the first N layers' experts in RAM.")
OVERRIDE_TENSOR = typer.Option([], "--override-tensor", "-ot", help="REGEX=DEVICE (CPU, CUDA0...), as llama.cpp's "
                               "-ot. Repeatable.")
RPC = typer.Option(None, "--rpc", metavar="HOST:PORT[,HOST:PORT]", help="Pool other machines' memory: llama.cpp "
                   "RPC servers (`cascade-local rpc-server` there) whose devices take the GPU's part of the plan.")
CTX = typer.Option("auto", "--ctx", metavar="auto|N", help="Context length per sequence in tokens; auto: sized to "
                   "the prompt and --max-tokens (chat, batch, serve: room to grow), within what fits in memory and "
                   "the model's trained length.")
# The disk cache of prompt states (issue 12), shared by run and chat.
CACHE_SIZE = typer.Option("4GiB", "--cache-size", help="Disk for prompt states (read a long document once, ask "
                          "many): least recently used removed first; 0: off.")
CACHE_MIN_TOKENS = typer.Option(2048, "--cache-min-tokens", min=1, help="Keep the state of prompts of at least N "
                                "tokens (everything before the question).")
KV_TYPE = typer.Option("f16", "--kv-type", metavar="f16|q8_0|q4_0", help="KV cache type: q8_0 halves it, q4_0 "
                       "quarters it (both turn on flash attention).")

# Sampling: the same spelling and help in chat, run and batch. None means the thinking mode's default from models.toml.
TEMPERATURE = typer.Option(None, "--temperature", min=0.0, help="Sampling temperature, 0: greedy (default from "
                           "models.toml: 1.0 thinking, 0.6 without).")
TOP_P = typer.Option(None, "--top-p", min=0.0, max=1.0, help="Nucleus sampling threshold (default from models.toml: "
                     "0.95).")
TOP_K = typer.Option(None, "--top-k", min=0, help="Keep the K likeliest tokens (0: off).")
MIN_P = typer.Option(None, "--min-p", min=0.0, max=1.0, help="Drop tokens below P × the best.")
REPEAT_PENALTY = typer.Option(None, "--repeat-penalty", min=0.0, help="Penalty on repeats (1.0: off).")
SEED = typer.Option(None, "--seed", help="Sampling seed, for repeatable answers.")
IGNORE_EOS = typer.Option(False, "--ignore-eos", help="Keep generating past the end of the turn, up to --max-tokens "
                          "(as llama.cpp's --ignore-eos; for benchmarks and tests).")
# Where each command shows the reasoning by default differs (chat: yes, run: no); the spelling does not.
SHOW_THINKING = typer.Option(None, "--show-thinking/--hide-thinking", show_default=False, help="Show the reasoning "
                             "as it streams (chat: the default, on a terminal; run: to stderr), or hide it (chat: "
                             "only its one-line summary; run: the default).")
