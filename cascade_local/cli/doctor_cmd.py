"""`cascade-local doctor`: one screen that says what this machine will do with the model."""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING

import typer

from cascade_local.cli.console import out_console

if TYPE_CHECKING:
    from rich.table import Table

    from cascade_local.machine_report import MachineReport



def doctor(
    json_: bool = typer.Option(False, "--json", help="Print one JSON object instead of the table."),
    no_hub: bool = typer.Option(False, "--no-hub", help="Do not check whether the Hugging Face Hub answers."),
    refresh: bool = typer.Option(False, "--refresh", help="Probe the extra CPU buffer types again instead of "
                                 "reading the cached verdict."),
) -> None:
    """Report what this machine offers: CPU and instruction sets, AMX and weight repacking (used or not, and why),
    RAM, the llama.cpp build (CPU-only or which GPU backend) and each GPU's free memory, the models folder, and
    whether the Hugging Face Hub answers. A CPU-only build on a machine with a GPU gets the rebuild command.

    Example: cascade-local doctor --json
    """
    from cascade_local.machine_report import machine_report

    if refresh:
        from cascade_local.cpu_extra import cache_path

        cache_path().unlink(missing_ok=True)
    report = machine_report(check_hub=not no_hub)
    if json_:
        sys.stdout.write(json.dumps(report.to_dict(), indent=2) + "\n")
        return
    out_console.print(_table(report))


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def _table(r: MachineReport) -> Table:
    from rich import box
    from rich.table import Table

    from cascade_local.gguf_info import human_bytes
    from cascade_local.placement import fmt_bytes

    table = Table(box=box.SIMPLE, show_header=False, pad_edge=False)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    table.add_row("CPU", f"{r.cpu_model}, {r.cores} usable cores")
    table.add_row("instruction sets", " ".join(r.features) or "none that llama.cpp names")
    extras = ", ".join(r.extra_buffer_types) or "none in this build"
    table.add_row("extra buffer types", f"{extras}; load mode {r.cpu_extra_mode} ({r.cpu_extra_source})")
    table.add_row("AMX in use", _yes(r.amx_in_use) + ("" if r.amx_in_use or "AMX" in r.extra_buffer_types
                                                      else " (not in this build)"))
    table.add_row("weight repacking", _yes(r.repacking_in_use))
    table.add_row("why", r.cpu_extra_reason)
    ram = (f"{fmt_bytes(r.ram_total)} total, {fmt_bytes(r.ram_available)} available"
           if r.ram_total and r.ram_available else "unknown")
    table.add_row("RAM", ram)
    table.add_row("llama.cpp build", f"llama-cpp-python {r.llama_cpp_version}, {r.build} "
                                     f"(backends: {', '.join(r.backends)})")
    table.add_row("RPC backend", "yes (--rpc HOST:PORT, cascade-local rpc-server)" if r.rpc
                  else "no (rebuild with `make`, which adds -DGGML_RPC=ON)")
    if r.gpus:
        for gpu in r.gpus:
            table.add_row(f"GPU {gpu.name}", f"{gpu.description}: {fmt_bytes(gpu.free)} free of {fmt_bytes(gpu.total)}")
    else:
        seen = f"; the system shows an {r.gpu_present} GPU" if r.gpu_present else ""
        table.add_row("GPUs", f"none usable by this build{seen}")
    if r.rebuild_command:
        table.add_row("rebuild for it", r.rebuild_command)
    table.add_row("KV cache types", ", ".join(r.kv_types))
    table.add_row("models folder", f"{r.models_dir} ({r.models_count} GGUF, {human_bytes(r.models_bytes)})")
    table.add_row("Hugging Face Hub", f"{r.hub}" + (f" ({r.hub_endpoint})" if r.hub_endpoint else ""))
    for note in r.notes:
        table.add_row("note", note)
    return table
