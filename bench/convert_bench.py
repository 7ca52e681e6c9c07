"""Benchmark `cascade-local convert` on a real-width slice checkpoint, against baselines from the same run.

What it measures, each step in its own child process (wall time with `time.perf_counter`, peak RSS
from `os.wait4`'s `ru_maxrss`, so a step's RSS is its own and nothing else's):

* raw read: sequential read of the slice's shard files in 16 MB chunks into one reused buffer, the
  ceiling any converter that reads the checkpoint once can reach on this disk;
* raw write: as many bytes as the slice's tensors, in 16 MB chunks from one reused buffer, to a file in
  the output folder, then fsync (a BF16 conversion writes that much: its floor on this disk);
* quantize-only, for each quantized `--types` and `--recipes` entry: the converter's encoder on every
  block of the slice, each block copied into memory first, so no I/O is timed (bench/convert_profile.py
  --quantize-only); the wall time of the child's encoding alone;
* one conversion per `--types` and `--recipes` entry, through the installed CLI, into a GGUF that is
  deleted after its size is recorded;
* with `--compare-src DIR` (a `convert/` folder of another version, e.g. from `git archive`), the same
  conversions through that converter, for a before/after ratio measured in one run;
* llama.cpp's `convert_hf_to_gguf.py --outtype bf16` on the same slice, only when LLAMA_CPP_CONVERT
  (the script) and LLAMA_CPP_PYTHON (a Python with torch) are set.

Machines differ and are noisy, so the table reports ratios to baselines measured in this run:
converter read MB/s over raw read MB/s, wall time over the larger of the raw read and the same
recipe's quantize-only (the bound a converter whose stages overlap approaches), and peak RSS over
the BF16 size of one MoE layer's routed experts (the converter streams 32 MB blocks, so it should stay
far below one layer). Before every step the shard files are fsync'd and dropped from the page cache
with posix_fadvise(DONTNEED).

The slice (`MEM*E`: 3.4 B parameters, 6.8 GB) is generated on first use, which takes a few minutes,
and cached under bench/out/. The table is printed to stdout and written to bench/out/convert_bench.md.

    .venv/bin/python bench/convert_bench.py [--types bf16 q8_0] [--recipes q4-moe] [--pattern MEM*E]
        [--slice-dir DIR] [--compare-src DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import math
import os
import re
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT_DIR = ROOT / "bench" / "out"
CONVERTER_TYPES = ("bf16", "q8_0", "f16", "f32")
INDEX_NAME = "model.safetensors.index.json"
GB, MB = 1e9, 1e6
LOG_TAIL_CHARS = 3000

# Run as `python -c RAW_READ_CHILD SHARD...`: the same measurement path as the converters.
RAW_READ_CHILD = """
import sys
view = memoryview(bytearray(16 << 20))
total = 0
for path in sys.argv[1:]:
    with open(path, "rb", buffering=0) as fh:
        while n := fh.readinto(view):
            total += n
print(total)
"""

# Run as `python -c RAW_WRITE_CHILD FILE N`: N bytes in 16 MB chunks, fsync'd, the file removed afterwards.
RAW_WRITE_CHILD = """
import os, sys
path, n = sys.argv[1], int(sys.argv[2])
view = memoryview(bytearray(os.urandom(1 << 20)) * 16)
total = 0
try:
    with open(path, "wb", buffering=0) as fh:
        while total < n:
            total += fh.write(view[: min(len(view), n - total)])
        os.fsync(fh.fileno())
finally:
    os.unlink(path)
print(total)
"""


@dataclass(frozen=True)
class SliceInfo:
    folder: Path
    pattern: str
    shards: list[Path]
    file_bytes: int  # shard files on disk: what the raw read reads
    tensor_bytes: int  # tensor data: what a converter reads
    n_params: int
    layer_expert_bytes: int  # one MoE layer's routed experts (up + down) in BF16


@dataclass(frozen=True)
class Row:
    step: str
    wall_s: float
    peak_rss_bytes: int
    read_bytes: int
    written_bytes: int | None
    bound_s: float | None = None  # max(raw read, quantize-only) for this row's types, when measured


# --- the slice ---------------------------------------------------------------------------------------


def slice_dir_name(pattern: str) -> str:
    # v2: calibrated scales (SLICE_SCALES); older slices were generated differently.
    return "slice-v2-" + pattern.replace("*", "_x_")


def is_complete_checkpoint(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (folder / INDEX_NAME).is_file()


def ensure_slice(folder: Path, pattern: str, seed: int) -> None:
    """Reuse a finished slice, else write one beside it and rename: a half-written slice is never reused."""
    if is_complete_checkpoint(folder):
        log(f"reusing slice {folder}")
        return
    if folder.exists():
        raise SystemExit(f"error: {folder} exists but is not a complete checkpoint; "
                         "remove it or pick another --slice-dir")
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    log(f"writing slice {pattern} to {folder} (a few minutes, once)")
    started = time.perf_counter()
    # In a child: a child's ru_maxrss starts at its parent's RSS, so this process must stay small.
    cmd = [sys.executable, "-m", "cascade_local.testing.checkpoint_fixture", "slice", str(partial),
           "--pattern", pattern, "--seed", str(seed)]
    if subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL).returncode != 0:
        raise SystemExit(f"error: writing the slice failed: {' '.join(cmd)}")
    partial.rename(folder)
    log(f"slice written in {time.perf_counter() - started:.0f} s")


def read_safetensors_header(path: Path) -> dict[str, dict]:
    with open(path, "rb") as fh:
        header_len = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(header_len))
    header.pop("__metadata__", None)
    return header


def describe_slice(folder: Path) -> SliceInfo:
    config = json.loads((folder / "config.json").read_text())
    weight_map = json.loads((folder / INDEX_NAME).read_text())["weight_map"]
    shards = [folder / name for name in sorted(set(weight_map.values()))]
    missing = [s.name for s in shards if not s.is_file()]
    if missing:
        raise SystemExit(f"error: {folder} lacks shards {', '.join(missing)}; "
                         "delete it to regenerate the slice")
    tensor_bytes = n_params = 0
    for shard in shards:
        try:
            entries = read_safetensors_header(shard).values()
        except (OSError, ValueError) as exc:
            raise SystemExit(f"error: cannot read the header of {shard} ({exc}); "
                             "delete the slice to regenerate it") from None
        for entry in entries:
            begin, end = entry["data_offsets"]
            tensor_bytes += end - begin
            n_params += math.prod(entry["shape"])
    layer_expert_bytes = (config["n_routed_experts"] * 2 * config["hidden_size"]
                          * config["moe_intermediate_size"] * 2)
    return SliceInfo(folder, config["hybrid_override_pattern"], shards, sum(s.stat().st_size for s in shards),
                     tensor_bytes, n_params, layer_expert_bytes)


# --- measurement -------------------------------------------------------------------------------------


def log(message: str) -> None:
    print(f"[convert_bench] {message}", file=sys.stderr, flush=True)


def page_cache_bytes() -> int:
    return meminfo_kb("Cached") * 1024


def drop_page_cache(paths: Sequence[Path]) -> int:
    """fsync and posix_fadvise(DONTNEED) each file; returns how much the system page cache shrank."""
    before = page_cache_bytes()
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return max(0, before - page_cache_bytes())


def run_child(cmd: Sequence[str], log_path: Path) -> tuple[float, int, int, str]:
    """Run `cmd` to completion: (wall seconds, peak RSS bytes, exit code, stdout+stderr)."""
    with open(log_path, "w+b") as out:
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - started
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here; keep Popen from waiting again
        out.seek(0)
        text = out.read().decode(errors="replace")
    return wall, usage.ru_maxrss * 1024, proc.returncode, text  # ru_maxrss is in KiB on Linux


class StepFailed(Exception):
    def __init__(self, step: str, code: int, output: str):
        self.step, self.code, self.output = step, code, output
        last = output.strip().splitlines()[-1:] or ["no output"]
        super().__init__(f"{step} failed with exit code {code}: {last[0]}")

    def message(self) -> str:
        tail = self.output[-LOG_TAIL_CHARS:]
        return f"error: {self.step} failed with exit code {self.code}; last output:\n{tail}"


def measure_raw_read(info: SliceInfo, out_dir: Path) -> Row:
    drop_page_cache(info.shards)
    cmd = [sys.executable, "-c", RAW_READ_CHILD, *map(str, info.shards)]
    wall, rss, code, output = run_child(cmd, out_dir / "raw_read.log")
    if code != 0 or output.split()[-1:] != [str(info.file_bytes)]:
        raise StepFailed("raw read", code, output)
    return Row("raw read (16 MB chunks)", wall, rss, info.file_bytes, None)


def measure_raw_write(info: SliceInfo, out_dir: Path) -> Row:
    cmd = [sys.executable, "-c", RAW_WRITE_CHILD, str(out_dir / "raw_write.tmp"), str(info.tensor_bytes)]
    log("timing the raw write baseline")
    wall, rss, code, output = run_child(cmd, out_dir / "raw_write.log")
    if code != 0 or output.split()[-1:] != [str(info.tensor_bytes)]:
        raise StepFailed("raw write", code, output)
    return Row("raw write (16 MB chunks, fsync)", wall, rss, 0, info.tensor_bytes)


def measure_conversion(step: str, cmd: Sequence[str], gguf: Path, info: SliceInfo, out_dir: Path) -> Row:
    """Run one converter from a dropped page cache, record the output's size, then delete the output."""
    gguf.unlink(missing_ok=True)
    drop_page_cache(info.shards)
    log(f"running {step}")
    try:
        wall, rss, code, output = run_child(cmd, out_dir / f"{gguf.stem}.log")
        if code != 0 or not gguf.is_file():
            raise StepFailed(step, code, output)
        written = gguf.stat().st_size
    finally:
        gguf.unlink(missing_ok=True)
    log(f"{step}: {wall:.1f} s, peak RSS {rss / GB:.2f} GB")
    return Row(step, wall, rss, info.tensor_bytes, written)


# Run as `python -c OTHER_CONVERTER_CHILD DIR ARGS...`: the CLI, with cascade_local.convert loaded from DIR.
OTHER_CONVERTER_CHILD = """
import importlib.util, sys
folder = sys.argv.pop(1)
spec = importlib.util.spec_from_file_location("cascade_local.convert", folder + "/__init__.py",
                                              submodule_search_locations=[folder])
module = importlib.util.module_from_spec(spec)
sys.modules["cascade_local.convert"] = module
spec.loader.exec_module(module)
import cascade_local
cascade_local.convert = module
from cascade_local.cli.app import main
sys.argv[0] = "cascade-local"
main()
"""


def choice_args(choice: str) -> list[str]:
    """`recipe:NAME` or a type name, as convert's options."""
    return ["--recipe", choice.split(":", 1)[1]] if choice.startswith("recipe:") else ["--type", choice]


def choice_label(choice: str) -> str:
    return " ".join(choice_args(choice))


def converter_command(info: SliceInfo, choice: str, gguf: Path, convert_src: Path | None = None) -> list[str]:
    args = ["convert", str(info.folder), "-o", str(gguf), *choice_args(choice), "--force"]
    if convert_src is not None:
        return [sys.executable, "-c", OTHER_CONVERTER_CHILD, str(convert_src), *args]
    cli = Path(sys.executable).with_name("cascade-local")
    exe = str(cli) if cli.exists() else shutil.which("cascade-local")
    if exe is None:
        raise SystemExit("error: the cascade-local CLI is not installed next to this Python or on PATH")
    return [exe, *args]


def measure_quantize_only(info: SliceInfo, choice: str, out_dir: Path) -> Row:
    """The converter's encoder alone on every block, from memory: the compute bound of a conversion."""
    script = Path(__file__).resolve().with_name("convert_profile.py")
    cmd = [sys.executable, str(script), str(info.folder), *choice_args(choice), "--quantize-only"]
    step = f"quantize-only {choice_label(choice)} (from memory, no I/O)"
    log(f"running {step}")
    _, rss, code, output = run_child(cmd, out_dir / f"quantize_only-{choice.replace(':', '-')}.log")
    try:
        seconds = float(output.split()[-1])
    except (IndexError, ValueError):
        raise StepFailed(step, code, output) from None
    if code != 0:
        raise StepFailed(step, code, output)
    log(f"{step}: {seconds:.1f} s")
    return Row(step, seconds, rss, info.tensor_bytes, None)


def llama_cpp_bf16_command(folder: Path, gguf: Path) -> list[str] | None:
    """llama.cpp's convert_hf_to_gguf.py to BF16, when LLAMA_CPP_CONVERT and LLAMA_CPP_PYTHON say where it is."""
    script, python = os.environ.get("LLAMA_CPP_CONVERT"), os.environ.get("LLAMA_CPP_PYTHON")
    if not (script and python):
        return None
    for name, value in (("LLAMA_CPP_CONVERT", script), ("LLAMA_CPP_PYTHON", python)):
        if not Path(value).is_file():
            raise SystemExit(f"error: {name}={value} is not a file")
    return [python, script, str(folder), "--outtype", "bf16", "--outfile", str(gguf)]


# --- report ------------------------------------------------------------------------------------------


def meminfo_kb(field: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def header_line(info: SliceInfo) -> str:
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    machine = f"{os.cpu_count()} CPUs ({cpu_model()}), {meminfo_kb('MemTotal') * 1024 / GB:.1f} GB RAM"
    return (f"Converter benchmark, {now}; machine: {machine}, load average at start {load}; "
            f"slice `{info.pattern}`: {info.n_params / 1e9:.2f} B params, {info.file_bytes / GB:.2f} GB "
            f"in {len(info.shards)} shards")


def format_table(rows: Sequence[Row], info: SliceInfo) -> list[str]:
    raw_mbps = rows[0].read_bytes / rows[0].wall_s / MB
    lines = ["| step | wall s | peak RSS GB | RSS / one layer's experts | bytes written GB | read MB/s "
             "| ratio to raw read | write MB/s | wall / max(raw read, quantize-only) |",
             "|---|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for row in rows:
        read_mbps = row.read_bytes / row.wall_s / MB
        read = f"{read_mbps:.0f} | {read_mbps / raw_mbps:.2f}" if row.read_bytes else "- | -"
        written = "-" if row.written_bytes is None else f"{row.written_bytes / GB:.2f}"
        write_mbps = "-" if row.written_bytes is None else f"{row.written_bytes / row.wall_s / MB:.0f}"
        lines.append(f"| {row.step} | {row.wall_s:.1f} | {row.peak_rss_bytes / GB:.2f} "
                     f"| {row.peak_rss_bytes / info.layer_expert_bytes:.3f} | {written} | {read} | {write_mbps} "
                     f"| {'-' if row.bound_s is None else f'{row.wall_s / row.bound_s:.2f}'} |")
    return lines


def own_peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def notes(info: SliceInfo, cache_dropped: int, llama_skipped: bool, llama_failure: str | None) -> list[str]:
    lines = [
        f"- Page cache: before every step the shard files were fsync'd and dropped with "
        f"posix_fadvise(DONTNEED) (the first drop shrank the page cache by {cache_dropped / GB:.2f} GB), "
        "so each step starts cold-ish; a hypervisor's cache below the VM is not dropped.",
        "- Each step runs in its own child process; peak RSS is its ru_maxrss from wait4, mapped shard "
        "pages included. Linux starts a child's ru_maxrss at its parent's RSS, so every row includes "
        f"this benchmark's own {own_peak_rss_bytes() / GB:.3f} GB as a floor.",
        f"- One layer's experts = routed experts x 2 matrices x hidden x expert width x 2 bytes (BF16) = "
        f"{info.layer_expert_bytes / GB:.2f} GB.",
        f"- read MB/s: bytes read / wall time (raw read: {info.file_bytes / GB:.2f} GB of shard files; "
        f"converters: {info.tensor_bytes / GB:.2f} GB of tensor data). GB and MB are 10^9 and 10^6 bytes.",
        "- quantize-only: the converter's encoder on every block already copied into memory (only the encoding "
        "is timed; its read MB/s is tensor bytes over that time). wall / max(...) compares a conversion with "
        "the larger of the raw read and its own recipe's quantize-only: 1.00 would be perfect overlap.",
        "- Output GGUFs were deleted after measuring.",
    ]
    if llama_skipped:
        lines.append("- llama.cpp's convert_hf_to_gguf.py not run: "
                     "set LLAMA_CPP_CONVERT and LLAMA_CPP_PYTHON to include it.")
    if llama_failure:
        lines.append(f"- llama.cpp's convert_hf_to_gguf.py did not finish: {llama_failure}")
    return lines


# --- main --------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--types", nargs="+", choices=CONVERTER_TYPES, default=["bf16", "q8_0"],
                        help="converter --type values to time (default: bf16 q8_0)")
    parser.add_argument("--recipes", nargs="+", default=["q4-moe"],
                        help="converter --recipe names to time, each with its quantize-only row (default: q4-moe)")
    parser.add_argument("--compare-src", type=Path, default=None,
                        help="a convert/ folder of another version: time its conversions too, in the same run")
    parser.add_argument("--pattern", default="MEM*E",
                        help="layer pattern of the slice to generate: M (Mamba), E (MoE), * (attention)")
    parser.add_argument("--slice-dir", type=Path, default=None,
                        help="slice checkpoint folder, reused if complete "
                             "(default: bench/out/slice-<pattern>, * spelled _x_)")
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR,
                        help="folder for the temporary GGUFs, logs and convert_bench.md (default: bench/out)")
    parser.add_argument("--seed", type=int, default=0, help="seed of a newly generated slice")
    args = parser.parse_args(argv)
    if not re.fullmatch(r"[ME*]+", args.pattern) or "E" not in args.pattern:
        parser.error(f"--pattern {args.pattern!r} must use only M, E and *, with at least one E")
    args.slice_dir = args.slice_dir or args.out_dir / slice_dir_name(args.pattern)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    try:
        run_benchmark(parse_args(argv))
    except StepFailed as exc:
        print(exc.message(), file=sys.stderr)
        return 1
    return 0


def run_benchmark(args: argparse.Namespace) -> None:
    args.out_dir.mkdir(parents=True, exist_ok=True)
    ensure_slice(args.slice_dir, args.pattern, args.seed)
    info = describe_slice(args.slice_dir)
    header = header_line(info)

    cache_dropped = drop_page_cache(info.shards)
    log("timing the raw read baseline")
    rows = [measure_raw_read(info, args.out_dir), measure_raw_write(info, args.out_dir)]
    raw_wall = rows[0].wall_s
    choices = [*args.types, *(f"recipe:{r}" for r in args.recipes)]
    bounds = {}
    for choice in choices:
        if choice in ("bf16", "f16", "f32"):
            bounds[choice] = raw_wall
        else:
            rows.append(measure_quantize_only(info, choice, args.out_dir))
            bounds[choice] = max(raw_wall, rows[-1].wall_s)
    for choice in choices:
        label = choice_label(choice)
        gguf = args.out_dir / f"convert_bench-{choice.replace(':', '-')}.gguf"
        if args.compare_src is not None:
            row = measure_conversion(f"previous converter {label}",
                                     converter_command(info, choice, gguf, args.compare_src), gguf, info, args.out_dir)
            rows.append(dataclasses.replace(row, bound_s=bounds[choice]))
        row = measure_conversion(f"cascade-local convert {label}", converter_command(info, choice, gguf), gguf,
                                 info, args.out_dir)
        rows.append(dataclasses.replace(row, bound_s=bounds[choice]))
    llama_gguf = args.out_dir / "convert_bench-llama.cpp-bf16.gguf"
    llama_cmd = llama_cpp_bf16_command(info.folder, llama_gguf)
    llama_failure = None
    if llama_cmd is not None:
        try:  # a third-party converter may reject the synthetic slice; that must not lose the table
            rows.append(measure_conversion("llama.cpp convert_hf_to_gguf.py bf16", llama_cmd, llama_gguf,
                                           info, args.out_dir))
        except StepFailed as exc:
            llama_failure = str(exc)
            log(exc.message())

    report = [header, "", *format_table(rows, info), "",
              *notes(info, cache_dropped, llama_cmd is None, llama_failure)]
    text = "\n".join(report) + "\n"
    (args.out_dir / "convert_bench.md").write_text(text)
    print(text, end="")


if __name__ == "__main__":
    sys.exit(main())
