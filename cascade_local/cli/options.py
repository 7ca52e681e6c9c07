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
