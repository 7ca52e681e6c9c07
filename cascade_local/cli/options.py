"""Options several commands share, declared once so their spelling and help never drift apart."""

from __future__ import annotations

import typer

THREADS = typer.Option(None, "--threads", min=1, help="CPU threads (default: the CPUs this process may use).")
GPU_MEM = typer.Option("auto", "--gpu-mem", help="GPU memory to use: auto, a size (8GiB), or 0.")
CPU_MOE = typer.Option(False, "--cpu-moe", help="Keep all expert weights in RAM.")
N_CPU_MOE = typer.Option(None, "--n-cpu-moe", help="Keep the first N layers' experts in RAM.")
OVERRIDE_TENSOR = typer.Option([], "--override-tensor", "-ot", help="REGEX=DEVICE (CPU, CUDA0...), as llama.cpp's "
                               "-ot. Repeatable.")

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
