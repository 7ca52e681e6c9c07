"""Rich renderings of long-running work: a progress bar on stderr and summary tables."""

from __future__ import annotations

import math
from collections import defaultdict
from types import TracebackType

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from cascade_local import gguf_info
from cascade_local.convert import ConversionResult


def human_bytes(n: float) -> str:
    """The conversion summary's sizes: two decimals, as its tables have always shown them."""
    return gguf_info.human_bytes(n, digits=2, kilo="KB")


class ConversionProgressBar:
    """Implements the converter's progress protocol: bytes read from the checkpoint, with bytes/s."""

    def __init__(self, console: Console):
        self._progress = Progress(
            TextColumn("[bold]{task.fields[tensor]:<32}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=console,
            transient=True,
        )
        self._task: TaskID | None = None

    def __enter__(self) -> ConversionProgressBar:
        self._progress.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._progress.stop()

    def start(self, total_bytes: int, n_tensors: int) -> None:
        self._task = self._progress.add_task("convert", total=total_bytes, tensor="")

    def tensor(self, name: str) -> None:
        if self._task is not None:
            self._progress.update(self._task, tensor=name)

    def advance(self, source_bytes: int) -> None:
        if self._task is not None:
            self._progress.advance(self._task, source_bytes)


def conversion_summary(result: ConversionResult) -> Table:
    groups: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0, 0])
    for t in result.tensors:
        row = groups[(t.cls.value, t.qtype.name)]
        row[0] += 1
        row[1] += math.prod(t.shape)
        row[2] += t.nbytes
    table = Table(title=f"{result.path.name}: {result.policy}", title_justify="left")
    for col, justify in (("class", "left"), ("type", "left"), ("tensors", "right"), ("params", "right"),
                         ("size", "right"), ("bits/weight", "right")):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for (cls, qtype), (count, params, nbytes) in sorted(groups.items()):
        table.add_row(cls, qtype, str(count), f"{params:,}", human_bytes(nbytes), f"{8 * nbytes / max(1, params):.2f}")
    total_tensor_bytes = sum(t.nbytes for t in result.tensors)
    rate = result.source_bytes / result.seconds if result.seconds else 0.0
    table.add_section()
    table.add_row("total", "", str(len(result.tensors)), f"{result.n_params:,}", human_bytes(result.file_bytes),
                  f"{8 * total_tensor_bytes / max(1, result.n_params):.2f}")
    table.caption = (f"{human_bytes(result.source_bytes)} read in {result.seconds:.1f} s "
                     f"({human_bytes(rate)}/s), {human_bytes(result.file_bytes)} written")
    return table
