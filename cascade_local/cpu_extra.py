"""Whether ggml's extra CPU buffer types run on this machine, decided once per machine and llama.cpp build.

llama.cpp puts weights in "extra" CPU buffer types when it can: AMX (Intel Xeons, when the build was made
on one) and CPU_REPACK (weights re-laid for the SIMD kernels). On virtual machines that advertise AMX but do
not deliver its tile state, the first AMX product dies with SIGILL, and nothing in the process can catch it.
So each extra buffer type is tried once in a child process (`cascade_local.ggml_probe`), and the verdict is
cached under the user's cache folder, keyed by CPU, kernel and llama.cpp build.

The load modes, from the verdict or from CASCADE_LOCAL_CPU_EXTRA=auto|on|repack|off:
- `all`: llama.cpp's default, every extra buffer type (AMX included where present).
- `repack`: AMX dropped, weight repacking kept. llama.cpp cannot exclude one extra buffer type, so the model
  loads without extras and the tensors the repack buffer can take are sent to it by name.
- `none`: no extra buffer type (the plain CPU buffer for everything); slower, runs everywhere.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path
from typing import Literal

import gguf

from cascade_local.errors import UsageError
from cascade_local.gguf_info import TensorInfo

Mode = Literal["all", "repack", "none"]
ENV = "CASCADE_LOCAL_CPU_EXTRA"
ENV_MODES: dict[str, Mode | None] = {"auto": None, "on": "all", "repack": "repack", "off": "none"}
REPACK = "CPU_REPACK"
PROBE_TIMEOUT_S = 120
NOT_STARTED = "the probe could not start"
CACHE_VERSION = 1

T = gguf.GGMLQuantizationType
# Which weights ggml's repack buffer re-lays on x86 (ggml-cpu/repack.cpp, ggml_repack_get_optimal_repack_type,
# in the llama.cpp that llama-cpp-python 0.3.36 vendors): type -> (CPU feature needed, rows must divide by).
# A tensor sent to CPU_REPACK that it has no layout for aborts the load, so this list stays conservative.
X86_REPACK_RULES: dict[T, tuple[str, int]] = {
    T.Q4_0: ("AVX2", 8),
    T.IQ4_NL: ("AVX2", 8),
    T.MXFP4: ("AVX2", 8),
    T.Q4_K: ("AVX2", 8),
}
# Weights llama.cpp reads with another op than a matrix product (a lookup), which repacked data cannot serve.
NOT_A_PRODUCT = re.compile(r"^token_embd\.")


@dataclass(frozen=True)
class Verdict:
    mode: Mode
    reason: str
    extras: tuple[str, ...]  # the extra buffer types this build has, in llama.cpp's order
    results: dict[str, str]  # buffer type -> "ok" or what went wrong, from the probe
    source: str  # "probe", "cache", or the environment variable

    @property
    def amx(self) -> bool:
        return "AMX" in self.extras and self.mode == "all"

    @property
    def repacking(self) -> bool:
        return REPACK in self.extras and self.mode in ("all", "repack")


def cache_dir() -> Path:
    """The user's cache folder: $XDG_CACHE_HOME/cascade-local, else ~/.cache/cascade-local."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "cascade-local"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith(("flags", "Features")):
                    return " ".join(sorted(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return ""


def system_info() -> str:
    """llama.cpp's own line of the instruction sets its CPU backend uses (AVX2 = 1 | AMX_INT8 = 1 | ...)."""
    import llama_cpp

    return (llama_cpp.llama_print_system_info() or b"").decode(errors="replace").strip()


def _build_id() -> str:
    """The llama.cpp build: llama-cpp-python's version and a digest of its CPU backend library."""
    import llama_cpp

    lib_dir = Path(llama_cpp.__file__).parent / "lib"
    digest = hashlib.sha256()
    for lib in sorted(lib_dir.glob("libggml-cpu*.so*")) + sorted(lib_dir.glob("libggml-cpu*.dylib")):
        digest.update(lib.name.encode())
        digest.update(lib.read_bytes())
    return f"{llama_cpp.__version__}-{digest.hexdigest()[:16]}"


def cache_key() -> str:
    parts = [cpu_model(), _cpu_flags(), platform.release(), _build_id(), system_info(), str(CACHE_VERSION)]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:24]


def cache_path() -> Path:
    return cache_dir() / f"cpu-extra-{cache_key()}.json"


def probe_buffer_type(name: str, *, command: list[str] | None = None) -> str:
    """Run the probe for one buffer type in a child process: "ok", or what went wrong."""
    command = command or [sys.executable, "-m", "cascade_local.ggml_probe", name]
    try:
        done = subprocess.run(command, capture_output=True,
                              text=True, timeout=PROBE_TIMEOUT_S, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return f"no answer within {PROBE_TIMEOUT_S} s"
    except OSError as exc:  # the child could not start (a sandbox, a user without exec rights): assume the worst
        return f"{NOT_STARTED}: {exc.strerror or exc}"
    if done.returncode < 0:
        try:
            return f"killed by {signal.Signals(-done.returncode).name}"
        except ValueError:
            return f"killed by signal {-done.returncode}"
    try:
        answer = json.loads(done.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        return f"exited {done.returncode} without an answer: {done.stderr.strip()[-200:]}"
    return "ok" if answer.get("ok") else str(answer.get("detail", "failed"))


def decide(extras: Iterable[str], results: dict[str, str]) -> tuple[Mode, str]:
    """The load mode from the probe results of each extra buffer type."""
    extras = tuple(extras)
    failed = {name: why for name, why in results.items() if why != "ok"}
    if not failed:
        if not extras:
            return "all", "this llama.cpp build has no extra CPU buffer types"
        return "all", f"{', '.join(extras)} ran a quantized matrix product correctly"
    said = "; ".join(f"{name}: {why}" for name, why in failed.items())
    if REPACK in extras and REPACK not in failed:
        return "repack", f"{said}; weight repacking runs, so only that is kept"
    return "none", f"{said}; loading without extra CPU buffer types"


def _read_cached(path: Path) -> Verdict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return Verdict(data["mode"], data["reason"], tuple(data["extras"]), dict(data["results"]), "cache")
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_cached(path: Path, verdict: Verdict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump({**asdict(verdict), "source": "probe"}, fh)
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache folder costs a probe per process, nothing worse


def env_mode() -> Mode | None:
    """CASCADE_LOCAL_CPU_EXTRA, checked: None for auto (or unset)."""
    raw = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if raw not in ENV_MODES:
        raise UsageError(f"{ENV}={raw} is not one of {', '.join(ENV_MODES)}")
    return ENV_MODES[raw]


def verdict(*, refresh: bool = False) -> Verdict:
    """This machine's verdict: from the environment, else the cache, else a probe (then cached)."""
    from cascade_local.devices import extra_buffer_types

    extras = tuple(name for name, _ in extra_buffer_types())
    forced = env_mode()
    if forced is not None:
        return Verdict(forced, f"set by {ENV}", extras, {}, ENV)
    path = cache_path()
    if not refresh:
        cached = _read_cached(path)
        if cached is not None:
            return cached
    results = {name: probe_buffer_type(name) for name in extras}
    mode, reason = decide(extras, results)
    found = Verdict(mode, reason, extras, results, "probe")
    if not any(why.startswith(NOT_STARTED) for why in results.values()):  # a machine fact, not a passing failure
        _write_cached(path, found)
    return found


@cache
def process_verdict() -> Verdict:
    """The verdict, found once per process."""
    return verdict()


def cpu_features() -> set[str]:
    """The features llama.cpp's system info marks `= 1` (AVX2, AVX512, AMX_INT8...)."""
    return {m.group(1) for m in re.finditer(r"(\w+) = 1", system_info())}


def repackable(tensors: Iterable[TensorInfo], features: set[str]) -> list[str]:
    """Names of the weights the repack buffer has a layout for on this CPU (see X86_REPACK_RULES)."""
    names = []
    for t in tensors:
        rule = X86_REPACK_RULES.get(t.qtype)
        if rule is None or NOT_A_PRODUCT.search(t.name) or len(t.shape) not in (2, 3):
            continue
        feature, rows = rule
        if feature in features and t.shape[1] % rows == 0:
            names.append(t.name)
    return names


__all__ = ["ENV", "Mode", "Verdict", "cache_path", "decide", "process_verdict", "repackable", "verdict"]
